//! Accept loop and graceful drain. `start` binds, answers liveness at once
//! and loads the repository in the background; readiness follows the load.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{self, AppState};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::object_repo::{self, Mirror, SyncLimits};
use crate::registry::{Limits, Registry};

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("model repository {0} is not a readable directory")]
    Repository(String),
    #[error("{0}")]
    Remote(String),
    #[error("metrics registry")]
    Metrics(#[from] prometheus::Error),
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<JoinSet<()>>,
    /// A default object store cache, deleted on shutdown.
    owned_cache: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

/// Binds `settings.listen` and starts serving; models load in the
/// background (readiness stays false until that is done).
pub async fn start(settings: Settings) -> Result<Server, ServeError> {
    let mut owned_cache = None;
    let (root, mirror) = match &settings.repository_url {
        Some(url) => {
            let parsed = object_repo::parse_url(url).map_err(|reason| {
                ServeError::Remote(format!("{}: {reason}", object_repo::shown(url)))
            })?;
            let cache = match &settings.repository_cache {
                Some(dir) => dir.clone(),
                None => {
                    // Ours alone: removed again on shutdown.
                    let dir = std::env::temp_dir()
                        .join(format!("infermesh-sidecar-cache-{}", std::process::id()));
                    owned_cache = Some(dir.clone());
                    dir
                }
            };
            let limits = SyncLimits {
                max_object_bytes: settings.repository_max_object_bytes,
                max_total_bytes: settings.repository_max_bytes,
            };
            let mirror = Mirror::new(parsed, cache.clone(), limits)
                .map_err(|e| ServeError::Remote(e.to_string()))?;
            (cache, Some(mirror))
        }
        None => {
            if !settings.model_repository.is_dir() {
                return Err(ServeError::Repository(
                    settings.model_repository.display().to_string(),
                ));
            }
            (settings.model_repository.clone(), None)
        }
    };
    let metrics = Metrics::new()?;
    let registry = Arc::new(Registry::new(
        root,
        Limits {
            queue_capacity: settings.queue_capacity,
            instances: settings.instances,
        },
        metrics.clone(),
    ));
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.listen,
        source,
    })?;
    let state = Arc::new(AppState::new(settings, registry.clone(), metrics));
    if let Some(mirror) = mirror {
        tracing::info!(url = %mirror.url(), cache = %mirror.cache().display(), "model repository in object storage");
        tokio::spawn(object_repo::run(mirror, state.clone()));
    } else {
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.load_all().await {
                tracing::error!(error = %e, "model repository scan failed");
            }
            state.loaded.store(true, Ordering::SeqCst);
            tracing::info!("startup model load finished");
        });
    }
    let (shutdown, rx) = watch::channel(false);
    let accept = tokio::spawn(accept_loop(listener, state.clone(), rx));
    tracing::info!(addr = %addr, "listening");
    Ok(Server {
        addr,
        state,
        shutdown,
        accept,
        owned_cache,
    })
}

impl Server {
    /// Readiness goes false, the listener closes, idle connections close,
    /// in-flight requests finish. Returns false if the grace period ran out
    /// first.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.state.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let Ok(mut conns) = self.accept.await else {
            return false;
        };
        let drained =
            tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
                .await
                .is_ok();
        if !drained {
            conns.abort_all();
        }
        if let Some(dir) = &self.owned_cache {
            let _ = std::fs::remove_dir_all(dir);
        }
        drained
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let header_timeout = state.settings.header_read_timeout;
        let mut shutdown = shutdown.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| api::handle(state.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "connection ended");
                    }
                }
                _ = stopped(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    conns
}

/// Resolves once shutdown was requested (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
