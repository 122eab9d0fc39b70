//! A small, fast upstream: one tokio thread (the benchmark pins it to the
//! load generator's core), HTTP/1.1 keep-alive, a fixed JSON answer.
//! Request bodies (up to [`MAX_BODY`]) are read before answering, so POST
//! connections stay reusable; a larger body gets 413.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// An OIP v2 infer response of realistic size for a small classifier.
const BODY: &[u8] = br#"{"model_name":"digits-mlp","model_version":"1","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,10],"data":[0.01,0.02,0.01,0.85,0.01,0.02,0.03,0.02,0.02,0.01]}]}"#;

/// Largest request body read.
const MAX_BODY: usize = 1 << 20;

/// Path that reports hit counts instead of being counted.
const HITS_PATH: &str = "/__hits";

pub fn run(listen: &[SocketAddr]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(listen))
}

async fn serve(listen: &[SocketAddr]) -> anyhow::Result<()> {
    let hits: Hits = Rc::new(listen.iter().map(|a| (*a, Cell::new(0))).collect());
    for (index, addr) in listen.iter().enumerate() {
        let listener = TcpListener::bind(addr).await?;
        eprintln!("upstream: listening on {}", listener.local_addr()?);
        let hits = Rc::clone(&hits);
        tokio::task::spawn_local(accept_loop(listener, index, hits));
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Hit counts per listener, in `--listen` order.
type Hits = Rc<Vec<(SocketAddr, Cell<u64>)>>;

async fn accept_loop(listener: TcpListener, index: usize, hits: Hits) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("upstream: accept failed: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let hits = Rc::clone(&hits);
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let hits = Rc::clone(&hits);
                async move { Ok::<_, Infallible>(answer(req, index, &hits).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("upstream: connection error: {e}");
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    index: usize,
    hits: &[(SocketAddr, Cell<u64>)],
) -> Response<Full<Bytes>> {
    let is_hits = req.uri().path() == HITS_PATH;
    if Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .is_err()
    {
        let mut resp = json(Bytes::from_static(
            br#"{"error":"request body too large or broken"}"#,
        ));
        *resp.status_mut() = hyper::StatusCode::PAYLOAD_TOO_LARGE;
        return resp;
    }
    if is_hits {
        let counts: serde_json::Map<String, serde_json::Value> = hits
            .iter()
            .map(|(a, n)| (a.port().to_string(), n.get().into()))
            .collect();
        let body = serde_json::Value::Object(counts).to_string();
        return json(Bytes::from(body));
    }
    if let Some((_, n)) = hits.get(index) {
        n.set(n.get() + 1);
    }
    json(Bytes::from_static(BODY))
}

fn json(body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
