//! Test helpers: an in-process server on 127.0.0.1:0, a minimal raw HTTP/1.1
//! client (so malformed requests can be sent too), reference loading.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sidecar::config::Settings;
use sidecar::server::{self, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

pub fn settings(repo: &Path) -> Settings {
    Settings {
        model_repository: repo.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Settings::default()
    }
}

/// Starts a server and waits until it is ready.
pub async fn start(settings: Settings) -> Result<Server> {
    let server = server::start(settings).await?;
    wait_ready(server.addr).await?;
    Ok(server)
}

pub async fn wait_ready(addr: std::net::SocketAddr) -> Result<()> {
    for _ in 0..600 {
        if let Ok(r) = get(addr, "/v2/health/ready").await {
            if r.status == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server at {addr} never became ready")
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "infermesh-sidecar-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies example model `name` (all versions) into `repo`, optionally with
/// another config.json.
pub fn copy_model(repo: &Path, name: &str, config: Option<&str>) {
    let src = examples().join(name);
    let dst = repo.join(name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            let v = entry.file_name();
            std::fs::create_dir_all(dst.join(&v)).unwrap();
            std::fs::copy(
                entry.path().join("model.onnx"),
                dst.join(&v).join("model.onnx"),
            )
            .unwrap();
        }
    }
    match config {
        Some(c) => std::fs::write(dst.join("config.json"), c).unwrap(),
        None => {
            std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    /// The `error` text of an error response (fails if there is none).
    pub fn error(&self) -> String {
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {v}"))
            .to_string()
    }
}

/// Sends raw bytes and reads the whole response (the request should carry
/// `Connection: close`).
pub async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<Resp> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    read_response(&mut s).await
}

pub async fn read_response(s: &mut TcpStream) -> Result<Resp> {
    let mut buf = Vec::new();
    let fut = s.read_to_end(&mut buf);
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .context("response timed out")??;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Result<Resp> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {:?}", String::from_utf8_lossy(buf)))?;
    let head = std::str::from_utf8(&buf[..end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| anyhow!("empty response"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow!("bad status line"))?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if let Some((_, n)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        body.truncate(n.parse()?);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

pub async fn get(addr: std::net::SocketAddr, path: &str) -> Result<Resp> {
    request(addr, "GET", path, &[], b"").await
}

pub async fn post_json(addr: std::net::SocketAddr, path: &str, v: &Value) -> Result<Resp> {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(v)?,
    )
    .await
}

/// reference.json of a model version.
pub fn reference(model: &str, version: &str) -> Value {
    let p = examples().join(model).join(version).join("reference.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// A JSON inference request for a reference case.
pub fn case_request(case: &Value) -> Value {
    let inputs: Vec<Value> = case["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            serde_json::json!({"name": name, "datatype": t["datatype"], "shape": t["shape"], "data": t["data"]})
        })
        .collect();
    serde_json::json!({ "inputs": inputs })
}

/// Asserts every output of `resp` matches the reference case within the
/// reference's tolerance (|a-b| <= atol + rtol*|b|); labels exactly.
pub fn assert_matches(resp: &Value, case: &Value, tol: &Value, what: &str) {
    let atol = tol["atol"].as_f64().unwrap_or(1e-5);
    let rtol = tol["rtol"].as_f64().unwrap_or(1e-4);
    let outs = resp["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no outputs in {resp}"));
    let want = case["outputs"].as_object().unwrap();
    assert_eq!(outs.len(), want.len(), "{what}: output count");
    for o in outs {
        let name = o["name"].as_str().unwrap();
        let w = &want[name];
        assert_eq!(o["shape"], w["shape"], "{what}: {name} shape");
        assert_eq!(o["datatype"], w["datatype"], "{what}: {name} datatype");
        let got = o["data"].as_array().unwrap();
        let exp = w["data"].as_array().unwrap();
        assert_eq!(got.len(), exp.len(), "{what}: {name} length");
        for (i, (g, e)) in got.iter().zip(exp).enumerate() {
            if e.is_i64() || e.is_string() {
                assert_eq!(g, e, "{what}: {name}[{i}]");
            } else {
                let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
                assert!(
                    (g - e).abs() <= atol + rtol * e.abs(),
                    "{what}: {name}[{i}] = {g}, reference {e}"
                );
            }
        }
    }
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics(addr: std::net::SocketAddr) -> String {
    String::from_utf8(get(addr, "/metrics").await.unwrap().body).unwrap()
}
