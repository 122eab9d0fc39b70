//! The admission webhook: HTTPS (rustls) in front of [`review::handle`].
//!
//! `POST /inject` injects pods that opt in themselves (the object-selector
//! webhook); `POST /inject/namespace` also injects pods that do not opt out
//! (the namespace-selector webhook); `GET /healthz` is for the kubelet.
//! Bodies are capped (413), slow clients cut (408 or a closed connection),
//! connections bounded; a bad request never takes the server down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use super::review;
use super::{Options, Scope};

/// What the webhook server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// PEM: the certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    pub options: Options,
    /// 413 above. The API server sends at most ~3 MiB (etcd's object limit
    /// is 1.5 MiB, in an AdmissionReview that carries it twice at most).
    pub max_body_bytes: usize,
    /// Deadline for the TLS handshake, the request headers and the body.
    pub read_timeout: Duration,
    pub max_connections: usize,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, cert_pem: Vec<u8>, key_pem: Vec<u8>, options: Options) -> Self {
        ServerConfig {
            listen,
            cert_pem,
            key_pem,
            options,
            max_body_bytes: 4 << 20,
            read_timeout: Duration::from_secs(10),
            max_connections: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running webhook server.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ServeError::Tls("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServeError::Tls(format!("private key: {e}")))?;
    let provider = Arc::new(ring_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// rustls' *ring* provider. rustls 0.23.48 deprecated it for lacking
/// post-quantum key exchange (aws-lc-rs has it, at the price of a large C
/// build); X25519 and the AES-GCM/ChaCha20 suites are what the API server
/// negotiates with a webhook today.
#[allow(deprecated)] // see above: ring is chosen on purpose
pub fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Binds and serves in the background.
pub async fn start(cfg: ServerConfig) -> Result<Server, ServeError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&cfg.cert_pem, &cfg.key_pem)?));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let (stop, mut stopped) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let cfg = Arc::new(cfg);
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stopped.changed() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let tcp = tokio::select! {
                _ = stopped.changed() => break,
                a = listener.accept() => match a {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        eprintln!("infermesh inject: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(Ok(tls)) =
                    tokio::time::timeout(cfg.read_timeout, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let svc_cfg = cfg.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let cfg = svc_cfg.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(req, &cfg).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(cfg.read_timeout)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(Server { addr, stop, task })
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    reply(status, &json!({ "error": msg }))
}

async fn route(req: Request<Incoming>, cfg: &ServerConfig) -> Response<Full<Bytes>> {
    let scope = match req.uri().path() {
        "/healthz" if req.method() == Method::GET => {
            return reply(StatusCode::OK, &json!({"ok": true}))
        }
        "/healthz" => return error(StatusCode::METHOD_NOT_ALLOWED, "use GET".into()),
        "/inject" => Scope::OptIn,
        "/inject/namespace" => Scope::Namespace,
        p => return error(StatusCode::NOT_FOUND, format!("no route {p}")),
    };
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST".into());
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {} bytes", cfg.max_body_bytes),
        )
    };
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return too_large();
    }
    let body = Limited::new(req.into_body(), cfg.max_body_bytes).collect();
    let body = match tokio::time::timeout(cfg.read_timeout, body).await {
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "body read timed out".into()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let answer = review::handle(&body, scope, &cfg.options);
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(status, &answer.body)
}
