//! Stub upstreams: tiny HTTP/1 servers that record what they receive.
//!
//! Each answers every request with `200`, body `upstream=<name>\n`, and the
//! response headers [`UPSTREAM_HEADER`] (its name) and
//! [`SAW_VERSION_HEADER`] (the `x-infermesh-version` it received, or `-`),
//! so a test can check per request where Envoy sent it and what it carried.
//!
//! A [`Mode`] turns it into a failing cloud: answering 5xx, hanging
//! without an answer, or resetting every connection; or a bad version:
//! failing a share of requests, or answering late; [`Upstream::kill`]
//! stops it listening (connect refused). Requests are recorded in every
//! mode.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-upstream";
/// Response header echoing the `x-infermesh-version` the upstream received
/// (`-` when absent).
pub const SAW_VERSION_HEADER: &str = "x-upstream-saw-version";

/// Headers accepted per request; above Envoy's limits so the upstream never
/// is the one that rejects a large request.
const MAX_HEADERS: usize = 1_000;

/// How an upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `200` with the body and headers described above.
    Ok,
    /// This status (e.g. 503), same body and headers.
    Status(u16),
    /// Reads the request, never answers (a hung process).
    Hang,
    /// Reads the request, then closes the connection without an answer.
    Reset,
    /// This status for `percent` of the requests, spread evenly (of any
    /// 100 consecutive requests in this mode, exactly `percent` fail); the
    /// others are answered as in `Ok`.
    Flaky { status: u16, percent: u8 },
    /// Answers as in `Ok`, this many ms late.
    Delay(u32),
}

#[derive(Debug, Default)]
struct ModeCell {
    kind: AtomicU8,
    status: AtomicU16,
    param: AtomicU32,
    /// Requests answered in `Flaky` mode so far.
    flaky_seq: AtomicU64,
    /// `Some(v)`: `Flaky` fails only requests whose `x-infermesh-version`
    /// is `v` (one version of a model is bad on this upstream).
    flaky_version: Mutex<Option<String>>,
}

impl ModeCell {
    fn set(&self, m: Mode) {
        let (k, s, p) = match m {
            Mode::Ok => (0, 200, 0),
            Mode::Status(s) => (1, s, 0),
            Mode::Hang => (2, 0, 0),
            Mode::Reset => (3, 0, 0),
            Mode::Flaky { status, percent } => (4, status, u32::from(percent.min(100))),
            Mode::Delay(ms) => (5, 200, ms),
        };
        self.flaky_seq.store(0, Ordering::SeqCst);
        self.param.store(p, Ordering::SeqCst);
        self.status.store(s, Ordering::SeqCst);
        self.kind.store(k, Ordering::SeqCst);
    }

    fn get(&self) -> Mode {
        match self.kind.load(Ordering::SeqCst) {
            1 => Mode::Status(self.status.load(Ordering::SeqCst)),
            2 => Mode::Hang,
            3 => Mode::Reset,
            4 => Mode::Flaky {
                status: self.status.load(Ordering::SeqCst),
                percent: u8::try_from(self.param.load(Ordering::SeqCst)).unwrap_or(100),
            },
            5 => Mode::Delay(self.param.load(Ordering::SeqCst)),
            _ => Mode::Ok,
        }
    }

    /// Whether the next `Flaky` request fails: request `n` fails when
    /// `floor((n + 1) p / 100)` steps past `floor(n p / 100)`.
    fn flaky_fails(&self, percent: u8) -> bool {
        let n = self.flaky_seq.fetch_add(1, Ordering::SeqCst);
        let p = u64::from(percent);
        (n + 1) * p / 100 > n * p / 100
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// Body length, and an FNV-1a 64 digest of the body, so a test can
    /// check a body arrived intact without keeping megabytes around.
    pub body_len: usize,
    pub body_digest: u64,
    /// When the request's body had arrived.
    pub at: Instant,
    /// Whether this upstream answered it with an error status (or a
    /// reset) because of its [`Mode`].
    pub failed: bool,
}

/// FNV-1a 64 of `bytes`: cheap and good enough to tell bodies apart.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Seen {
    /// The value of `name` as (lossy) text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// A running stub upstream; stops when killed or dropped.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<ModeCell>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and serves until killed.
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` (a loopback address; port 0 for an ephemeral one) and
    /// serves until killed.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("upstream {name}: cannot bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("upstream {name}: no local address: {e}"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let mode: Arc<ModeCell> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn({
            let name = name.to_owned();
            let seen = seen.clone();
            let mode = mode.clone();
            async move {
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = stopped.changed() => return,
                    };
                    let Ok((tcp, _)) = accepted else { continue };
                    let name = name.clone();
                    let seen = seen.clone();
                    let mode = mode.clone();
                    let mut conn_stopped = stopped.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            handle(name.clone(), seen.clone(), mode.clone(), req)
                        });
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder.max_headers(MAX_HEADERS);
                        let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                        tokio::select! {
                            _ = conn => {}
                            _ = conn_stopped.changed() => {}
                        }
                    });
                }
            }
        });
        Upstream {
            name: name.to_owned(),
            addr,
            seen,
            mode,
            stop,
            task: Some(task),
        }
    }

    /// Changes how it answers from now on (requests already waiting in
    /// `Hang` stay hung).
    pub fn set_mode(&self, mode: Mode) {
        self.mode.set(mode);
    }

    /// Restricts `Flaky` failures to requests for `version` (by their
    /// `x-infermesh-version`); `None`: every request may fail.
    pub fn set_flaky_version(&self, version: Option<&str>) {
        *self
            .mode
            .flaky_version
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = version.map(str::to_owned);
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Stops accepting and closes every open connection.
    pub fn kill(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handle(
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<ModeCell>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let saw = parts
        .headers
        .get(filter_core::headers::VERSION)
        .cloned()
        .unwrap_or(HeaderValue::from_static("-"));
    let mode_now = mode.get();
    let failed = match mode_now {
        Mode::Ok | Mode::Delay(_) => false,
        Mode::Status(s) => s >= 500,
        Mode::Hang | Mode::Reset => true,
        Mode::Flaky { percent, .. } => {
            let scope = mode
                .flaky_version
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let in_scope = scope.is_none_or(|v| saw.as_bytes() == v.as_bytes());
            in_scope && mode.flaky_fails(percent)
        }
    };
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts.headers,
        body_len: body.len(),
        body_digest: digest(&body),
        at: Instant::now(),
        failed,
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("upstream={name}\n"))));
    match mode_now {
        Mode::Ok => {}
        Mode::Flaky { status, .. } => {
            if failed {
                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
            }
        }
        Mode::Delay(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
        Mode::Status(s) => {
            *resp.status_mut() = hyper::StatusCode::from_u16(s).unwrap_or_default();
        }
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Reset => {
            // An error from the service makes hyper close the connection
            // without a response.
            return Err(std::io::Error::other("reset by test"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&name) {
        resp.headers_mut().insert(UPSTREAM_HEADER, v);
    }
    resp.headers_mut().insert(SAW_VERSION_HEADER, saw);
    Ok::<_, std::io::Error>(resp)
}
