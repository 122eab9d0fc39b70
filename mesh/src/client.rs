//! An HTTP/1.1 client for driving Envoy: keep-alive connections, raw header
//! bytes (any octet a header value may carry), many requests in parallel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request to send.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Req {
    pub fn get(path: impl Into<String>) -> Req {
        Req {
            method: Method::GET,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Req {
        Req {
            method: Method::POST,
            body: body.into(),
            ..Req::get(path)
        }
    }

    /// Adds a header with raw value bytes. Panics if the name is not a
    /// header name or the bytes cannot appear in a header value (control
    /// characters other than tab); bytes ≥ 0x80 are allowed.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        let n = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|e| panic!("bad header name {name:?}: {e}"));
        let v = HeaderValue::from_bytes(value.as_ref())
            .unwrap_or_else(|e| panic!("bad header value for {name}: {e}"));
        self.headers.push((n, v));
        self
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// Header value as (lossy) text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends requests to one address over keep-alive HTTP/1.1 connections.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    connections: usize,
}

/// Headers accepted per response.
const MAX_HEADERS: usize = 1_000;

impl Client {
    /// A client using up to 8 concurrent connections.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            connections: 8,
        }
    }

    /// Sets how many connections [`Client::send_all`] uses in parallel.
    pub fn connections(mut self, n: usize) -> Client {
        self.connections = n.max(1);
        self
    }

    /// Sends one request on a fresh connection; panics on a transport
    /// failure.
    pub async fn send(&self, req: Req) -> Resp {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends one request on a fresh connection.
    pub async fn try_send(&self, req: Req) -> Result<Resp, String> {
        Conn::default().send(self.addr, req).await
    }

    /// Sends every request and returns the responses in request order.
    /// Requests are spread over the client's connections; a connection the
    /// server closed (e.g. after an error reply) is reopened before the next
    /// request. A transport failure of a request panics with its index: in
    /// these tests every request must be answered.
    pub async fn send_all(&self, reqs: Vec<Req>) -> Vec<Resp> {
        let total = reqs.len();
        let reqs: Arc<Vec<Req>> = Arc::new(reqs);
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(self.connections);
        for _ in 0..self.connections.min(total.max(1)) {
            let reqs = reqs.clone();
            let next = next.clone();
            let addr = self.addr;
            workers.push(tokio::spawn(async move {
                let mut conn = Conn::default();
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { break };
                    match conn.send(addr, req.clone()).await {
                        Ok(resp) => out.push((i, resp)),
                        Err(e) => return Err(format!("request #{i}: {e}")),
                    }
                }
                Ok(out)
            }));
        }
        let mut slots: Vec<Option<Resp>> = vec![None; total];
        for w in workers {
            let answered = w
                .await
                .unwrap_or_else(|e| panic!("client task failed: {e}"))
                .unwrap_or_else(|e| panic!("{e}"));
            for (i, resp) in answered {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = Some(resp);
                }
            }
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| panic!("request #{i} got no response")))
            .collect()
    }
}

/// One keep-alive connection, opened lazily and reopened when closed.
#[derive(Default)]
struct Conn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    async fn send(&mut self, addr: SocketAddr, req: Req) -> Result<Resp, String> {
        let mut sender = match self.sender.take() {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                // The server closed it (normal after an error reply).
                Err(_) => connect(addr).await?,
            },
            None => connect(addr).await?,
        };
        let (parts, body, reusable) = exchange(&mut sender, addr, req).await?;
        if reusable {
            self.sender = Some(sender);
        }
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// An HTTP/1.1 client connection.
pub(crate) type Sender = SendRequest<Full<Bytes>>;

/// Sends `req` on `sender` and reads the whole answer: its head, its
/// body, and whether the connection may be used again (the server did
/// not say `connection: close`).
pub(crate) async fn exchange(
    sender: &mut Sender,
    addr: SocketAddr,
    req: Req,
) -> Result<(hyper::http::response::Parts, Bytes, bool), String> {
    let mut builder = Request::builder().method(req.method).uri(&req.path);
    // A `host` header in the request replaces the default one.
    if !req.headers.iter().any(|(n, _)| n == hyper::header::HOST) {
        builder = builder.header(hyper::header::HOST, "infermesh.test");
    }
    if let Some(h) = builder.headers_mut() {
        h.extend(req.headers);
    }
    let request = builder
        .body(Full::new(req.body))
        .map_err(|e| format!("cannot build request for {}: {e}", req.path))?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending to {addr} failed: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body from {addr} failed: {e}"))?
        .to_bytes();
    let closing = parts
        .headers
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    Ok((parts, body, !closing))
}

/// Opens a connection to `addr` (no Nagle, Envoy-sized header limit).
pub(crate) async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.max_headers(MAX_HEADERS);
    let (sender, conn) = builder
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake with {addr} failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
