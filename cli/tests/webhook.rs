//! The injector's admission webhook over real HTTPS (a certificate made
//! here): AdmissionReview round trips, and hostile input: each bad request
//! gets its documented answer and the server keeps answering good ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use infermesh::inject::server::{self, Server, ServerConfig};
use infermesh::inject::{self, Options, Scope};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

struct Tls {
    connector: TlsConnector,
    cert_pem: String,
    key_pem: String,
}

/// A self-signed certificate for 127.0.0.1 and a client that trusts it.
fn tls() -> Tls {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(server::ring_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        connector: TlsConnector::from(Arc::new(client)),
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    }
}

/// A server; `read_timeout` short only where slow clients are tested (a
/// busy machine can take longer than that for a TLS handshake).
async fn start(tls: &Tls, read_timeout: Duration) -> Server {
    let mut cfg = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        tls.cert_pem.clone().into_bytes(),
        tls.key_pem.clone().into_bytes(),
        Options::default(),
    );
    cfg.read_timeout = read_timeout;
    server::start(cfg).await.unwrap()
}

struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await
}

/// Sends `head` + `body` over TLS and reads the response to the end
/// (requests carry `Connection: close`).
async fn exchange(tls: &Tls, addr: SocketAddr, head: &str, body: &[u8]) -> std::io::Result<Resp> {
    let mut s = connect(&tls.connector, addr).await?;
    s.write_all(head.as_bytes()).await?;
    // The server may answer (413) and close before the whole body is sent.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    let (head, _) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    Ok(Resp {
        status,
        body: raw[start..].to_vec(),
    })
}

async fn post(tls: &Tls, addr: SocketAddr, path: &str, body: &[u8]) -> Resp {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    exchange(tls, addr, &head, body).await.unwrap()
}

fn pod(containers: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "digits-mlp-v2-7d9c-", "namespace": "models",
                     "labels": {"app": "digits-mlp", "version": "2", "infermesh.io/inject": "true"}},
        "spec": {
            "containers": containers,
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "digits-mlp-models"}}],
        },
    })
}

fn app() -> Value {
    json!([{"name": "feature-api", "image": "example/api:1", "ports": [{"containerPort": 8080}]}])
}

fn review(object: &Value, uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "models",
            "object": object,
        },
    }))
    .unwrap()
}

/// The patch of an allowed review, decoded.
fn patch_of(r: &Resp, uid: &str) -> Option<Value> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], uid);
    assert_eq!(v["response"]["allowed"], true, "{v}");
    let p = v["response"].get("patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

async fn good_request_still_works(tls: &Tls, addr: SocketAddr, after: &str) {
    let r = post(tls, addr, "/inject", &review(&pod(app()), "good")).await;
    let ops = patch_of(&r, "good").unwrap_or_else(|| panic!("after {after}: no patch"));
    assert_eq!(ops.as_array().unwrap().len(), 2, "after {after}: {ops}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_round_trip_matches_the_offline_injection() {
    let tls = tls();
    let server = start(&tls, Duration::from_secs(10)).await;
    let object = pod(app());
    let r = post(&tls, server.addr, "/inject", &review(&object, "u1")).await;
    let ops = patch_of(&r, "u1").expect("a patch");
    let ops = ops.as_array().unwrap();
    assert_eq!(ops[0]["path"], "/metadata/annotations");
    assert_eq!(ops[1]["op"], "add");
    assert_eq!(ops[1]["path"], "/spec/initContainers");
    // The webhook's patch adds exactly what the offline mode writes.
    let inject::Outcome::Injected(offline) =
        inject::inject(&object, None, Scope::OptIn, &Options::default()).unwrap()
    else {
        panic!("offline did not inject");
    };
    assert_eq!(ops[0]["value"], offline["metadata"]["annotations"]);
    assert_eq!(ops[1]["value"], offline["spec"]["initContainers"]);

    // Opted out, not opted in (on the opt-in path), already injected: allowed, no patch.
    let mut out = pod(app());
    out["metadata"]["labels"]["infermesh.io/inject"] = json!("false");
    let mut plain = pod(app());
    plain["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("infermesh.io/inject");
    for (name, obj, path) in [
        ("opted out", &out, "/inject/namespace"),
        ("not opted in", &plain, "/inject"),
        ("already injected", &offline, "/inject"),
    ] {
        let r = post(&tls, server.addr, path, &review(obj, name)).await;
        assert_eq!(patch_of(&r, name), None, "{name}");
    }
    // The namespace path injects pods that do not opt out.
    let r = post(
        &tls,
        server.addr,
        "/inject/namespace",
        &review(&plain, "ns"),
    )
    .await;
    assert!(patch_of(&r, "ns").is_some());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_answer_and_the_server_survives() {
    let tls = tls();
    let server = start(&tls, Duration::from_secs(10)).await;
    let addr = server.addr;
    let review_of = |containers: Value| review(&pod(containers), "bad");
    let ten_mib = {
        let mut v = review(&pod(app()), "big");
        let pad = format!(",\"pad\":\"{}\"}}", "x".repeat(10 << 20));
        v.pop();
        v.extend(pad.into_bytes());
        v
    };
    // (name, path, body, status, what the answer says)
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/inject", b"{\"apiVersion\": ".to_vec(), 400, "not JSON"),
        ("not JSON", "/inject", b"\x00\xff garbage".to_vec(), 400, "not JSON"),
        ("empty body", "/inject", Vec::new(), 400, "not JSON"),
        ("JSON array", "/inject", b"[1,2]".to_vec(), 400, "expected apiVersion"),
        ("v1beta1 review", "/inject",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(), 400, "expected apiVersion"),
        ("wrong kind", "/inject", serde_json::to_vec(&pod(app())).unwrap(), 400, "expected apiVersion"),
        ("no uid", "/inject", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"object":{}}}"#.to_vec(), 400, "uid"),
        ("deep nesting", "/inject", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(), 400, "not JSON"),
        ("10 MiB body", "/inject", ten_mib, 413, "larger than"),
        ("unknown path", "/mutate", review_of(app()), 404, "no route"),
        ("container name taken", "/inject",
            review_of(json!([{"name": "infermesh-sidecar", "image": "x"}])), 200, "container name \"infermesh-sidecar\" is already taken"),
        ("port taken", "/inject",
            review_of(json!([{"name": "a", "image": "x", "ports": [{"containerPort": 8000}]}])), 200, "port 8000 is already taken by container \"a\""),
        ("containers not a list", "/inject", review_of(json!({"a": 1})), 200, "/spec/containers is not a list"),
    ];
    for (name, path, body, want, says) in cases {
        let r = post(&tls, addr, path, &body).await;
        assert_eq!(
            r.status,
            want,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let msg = if want == 200 {
            assert_eq!(v["response"]["allowed"], false, "{name}: {v}");
            assert_eq!(v["response"]["uid"], "bad");
            v["response"]["status"]["message"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        } else {
            v["error"].as_str().unwrap_or("").to_owned()
        };
        assert!(msg.contains(says), "{name}: {msg}");
        good_request_still_works(&tls, addr, name).await;
    }

    // Over the cap without a Content-Length: cut while reading.
    let head = "POST /inject HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let mut chunked = format!("{:x}\r\n", 5 << 20).into_bytes();
    chunked.extend(vec![b' '; 5 << 20]);
    chunked.extend(b"\r\n0\r\n\r\n");
    let r = exchange(&tls, addr, head, &chunked).await.unwrap();
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    good_request_still_works(&tls, addr, "chunked 5 MiB").await;

    // GET on the review path, and a health check.
    let head = "GET /inject HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(exchange(&tls, addr, head, b"").await.unwrap().status, 405);
    let head = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(exchange(&tls, addr, head, b"").await.unwrap().status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_broken_clients_never_hang_the_server() {
    let tls = tls();
    let server = start(&tls, Duration::from_millis(800)).await;
    let addr = server.addr;

    // Plain HTTP on the TLS port: the handshake fails, the connection closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "plain HTTP connection left open");
    good_request_still_works(&tls, addr, "plain HTTP").await;

    // A TCP connection that never starts the handshake is cut after the
    // read timeout (800 ms here), not held forever.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut one)).await;
    assert!(r.is_ok(), "idle connection kept open");
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Headers that never finish, and a body shorter than its length: the
    // server answers or closes within its timeouts, and serves others
    // meanwhile.
    let slow_head = tokio::spawn({
        let connector = tls.connector.clone();
        async move {
            let mut s = connect(&connector, addr).await.unwrap();
            s.write_all(b"POST /inject HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .is_ok()
        }
    });
    let head =
        "POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n";
    let slow_body = {
        let connector = tls.connector.clone();
        let head = head.to_owned();
        tokio::spawn(async move {
            let mut s = connect(&connector, addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(b"{\"apiVersion\"").await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    good_request_still_works(&tls, addr, "slow clients in flight").await;
    assert!(slow_head.await.unwrap(), "unfinished headers kept open");
    let answer = slow_body.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reviews_all_get_answers() {
    let tls = tls();
    let server = start(&tls, Duration::from_secs(10)).await;
    let addr = server.addr;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let connector = tls.connector.clone();
        let body = review(&pod(app()), &format!("c{i}"));
        tasks.push(tokio::spawn(async move {
            let t = Tls {
                connector,
                cert_pem: String::new(),
                key_pem: String::new(),
            };
            post(&t, addr, "/inject", &body).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    good_request_still_works(&tls, addr, "32 concurrent reviews").await;
    server.shutdown().await;
}
