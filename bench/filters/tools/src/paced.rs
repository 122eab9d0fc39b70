//! Open-loop paced load over HTTP/1.1 keep-alive connections.
//!
//! Request `i` is due at `start + i / rate`, whatever happened before it;
//! connection `k` of `C` sends requests `k, k + C, k + 2C, …` (the wrk2
//! scheme). Latency is measured from the due time, so when a response is
//! slow the requests queued behind it count that wait too (no coordinated
//! omission). `send_lag` (actual send − due time) shows how well the client
//! itself kept the schedule.
//!
//! By default every request is `GET path` with `key_header: user-K`, K
//! cycling over `keys`. With a requests file (see [`parse_requests`]) line
//! K gives request K's method, path and optional JSON body instead, still
//! with `key_header: user-K`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Most requests one run may schedule (bounds sample memory to ~160 MB).
const MAX_REQUESTS: f64 = 20_000_000.0;
/// Largest response head or body the client accepts.
const MAX_RESPONSE: usize = 1 << 20;
/// Most lines in a requests file (the same bound as `keys`).
pub const MAX_SPECS: usize = 1_000_000;
/// Largest request body in a requests file.
pub const MAX_BODY: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past the end of the schedule a run may go on. An overloaded
/// target leaves the rest of the schedule unsent (counted in `unsent`)
/// instead of stretching the run without bound.
const OVERRUN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub connections: usize,
    pub path: String,
    pub key_header: String,
    pub keys: usize,
    /// Request shapes from a requests file; empty: `GET path` × `keys`.
    pub requests: Vec<Spec>,
}

/// One request shape: line K of a requests file is request K.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub method: String,
    pub path: String,
    /// Sent with `content-type: application/json` and its length.
    pub body: Option<String>,
}

/// Parses a requests file: one request per line, `METHOD<TAB>PATH` or
/// `METHOD<TAB>PATH<TAB>BODY` (the body is the rest of the line). Empty
/// lines are skipped. Errors name the 1-based line.
pub fn parse_requests(text: &str) -> Result<Vec<Spec>, PacedError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if out.len() == MAX_SPECS {
            return Err(invalid("requests file (more than 1000000 lines)", n + 1));
        }
        let mut parts = line.splitn(3, '\t');
        let method = parts.next().unwrap_or_default();
        let Some(path) = parts.next() else {
            return Err(invalid(
                "requests file line (METHOD<TAB>PATH[<TAB>BODY])",
                format!("line {}: {line:.80}", n + 1),
            ));
        };
        let spec = Spec {
            method: method.to_owned(),
            path: path.to_owned(),
            body: parts.next().map(str::to_owned),
        };
        spec.check()
            .map_err(|e| invalid("requests file", format!("line {}: {e}", n + 1)))?;
        out.push(spec);
    }
    if out.is_empty() {
        return Err(invalid("requests file", "no requests"));
    }
    Ok(out)
}

impl Spec {
    fn check(&self) -> Result<(), PacedError> {
        let upper = |b: u8| b.is_ascii_uppercase();
        if self.method.is_empty() || self.method.len() > 16 || !self.method.bytes().all(upper) {
            return Err(invalid("method (upper-case letters)", &self.method));
        }
        check_path(&self.path)?;
        if let Some(body) = &self.body {
            if body.len() > MAX_BODY {
                return Err(invalid("body (bytes, at most 1 MiB)", body.len()));
            }
        }
        Ok(())
    }

    /// The request bytes for key `k`.
    fn render(&self, key_header: &str, k: usize) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: bench\r\nuser-agent: bench-tools\r\n{key_header}: user-{k}\r\n",
            self.method, self.path
        );
        if let Some(body) = &self.body {
            head.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            head.push_str("\r\n");
        }
        head.into_bytes()
    }
}

fn check_path(path: &str) -> Result<(), PacedError> {
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid("path", path));
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 18080)),
            rate: 3_000.0,
            duration_s: 10.0,
            warmup_s: 2.0,
            connections: 8,
            path: "/v2/models/digits-mlp/infer".to_owned(),
            key_header: "x-user-id".to_owned(),
            keys: 1_000,
            requests: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PacedError {
    #[error("invalid {what}: {value}")]
    Invalid { what: &'static str, value: String },
    #[error("a client thread panicked")]
    Thread,
}

fn invalid(what: &'static str, value: impl ToString) -> PacedError {
    PacedError::Invalid {
        what,
        value: value.to_string(),
    }
}

impl Config {
    fn check(&self) -> Result<u64, PacedError> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(invalid("rate (req/s, > 0)", self.rate));
        }
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return Err(invalid("duration (s, > 0)", self.duration_s));
        }
        if !(self.warmup_s.is_finite() && self.warmup_s >= 0.0) {
            return Err(invalid("warmup (s, >= 0)", self.warmup_s));
        }
        if !(1..=256).contains(&self.connections) {
            return Err(invalid("connections (1..=256)", self.connections));
        }
        if !(1..=1_000_000).contains(&self.keys) {
            return Err(invalid("keys (1..=1000000)", self.keys));
        }
        check_path(&self.path)?;
        if self.requests.len() > MAX_SPECS {
            return Err(invalid("requests (at most 1000000)", self.requests.len()));
        }
        for spec in &self.requests {
            spec.check()?;
        }
        let token = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if self.key_header.is_empty() || !self.key_header.bytes().all(token) {
            return Err(invalid("key header", &self.key_header));
        }
        let total = self.rate * (self.warmup_s + self.duration_s);
        if total > MAX_REQUESTS {
            return Err(invalid("rate × time (too many requests)", total));
        }
        // Bounded above, so the conversion is exact enough and cannot wrap.
        Ok(total.ceil() as u64)
    }
}

/// One connection's results.
#[derive(Default)]
struct Samples {
    latency_us: Vec<u32>,
    service_us: Vec<u32>,
    send_lag_us: Vec<u32>,
    errors: u64,
    non_2xx: u64,
    unsent: u64,
    last_done: Option<Instant>,
}

pub fn run(cfg: &Config) -> Result<Value, PacedError> {
    let total = cfg.check()?;
    let warmup_n = (cfg.rate * cfg.warmup_s).ceil() as u64;
    let requests: Vec<Vec<u8>> = if cfg.requests.is_empty() {
        let get = Spec {
            method: "GET".to_owned(),
            path: cfg.path.clone(),
            body: None,
        };
        (0..cfg.keys)
            .map(|k| get.render(&cfg.key_header, k))
            .collect()
    } else {
        cfg.requests
            .iter()
            .enumerate()
            .map(|(k, spec)| spec.render(&cfg.key_header, k))
            .collect()
    };
    // Time to start the threads and connect before the first request is due.
    let start = Instant::now() + Duration::from_millis(200);
    let per_conn = total / cfg.connections as u64 + 1;
    let results: Vec<Samples> = thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.connections)
            .map(|k| {
                let requests = &requests;
                s.spawn(move || connection(cfg, k, start, total, warmup_n, per_conn, requests))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| PacedError::Thread))
            .collect::<Result<_, _>>()
    })?;

    let mut latency = Vec::new();
    let mut service = Vec::new();
    let mut lag = Vec::new();
    let (mut errors, mut non_2xx, mut unsent) = (0, 0, 0);
    let mut last_done = None;
    for r in results {
        latency.extend(r.latency_us);
        service.extend(r.service_us);
        lag.extend(r.send_lag_us);
        errors += r.errors;
        non_2xx += r.non_2xx;
        unsent += r.unsent;
        last_done = last_done.max(r.last_done);
    }
    let measured_start = start + Duration::from_secs_f64(warmup_n as f64 / cfg.rate);
    let window = last_done
        .map(|t| t.saturating_duration_since(measured_start).as_secs_f64())
        .unwrap_or(0.0);
    let completed = latency.len();
    Ok(json!({
        "rate_target": cfg.rate,
        "connections": cfg.connections,
        "scheduled": total.saturating_sub(warmup_n),
        "completed": completed,
        "errors": errors,
        "non_2xx": non_2xx,
        "unsent": unsent,
        "rate_achieved": if window > 0.0 { completed as f64 / window } else { 0.0 },
        "latency_us": summary(&mut latency),
        "service_us": summary(&mut service),
        "send_lag_us": summary(&mut lag),
    }))
}

/// Runs connection `k`'s share of the schedule.
fn connection(
    cfg: &Config,
    k: usize,
    start: Instant,
    total: u64,
    warmup_n: u64,
    per_conn: u64,
    requests: &[Vec<u8>],
) -> Samples {
    // Wake within microseconds of the due time instead of the default
    // 50 µs timer slack; without it every latency grows by up to 50 µs.
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        eprintln!("paced: cannot lower timer slack ({e}); latencies include up to 50 µs of it");
    }
    let cap = usize::try_from(per_conn).unwrap_or(0);
    let mut out = Samples {
        latency_us: Vec::with_capacity(cap),
        service_us: Vec::with_capacity(cap),
        send_lag_us: Vec::with_capacity(cap),
        ..Samples::default()
    };
    let mut conn: Option<Conn> = None;
    let step = cfg.connections as u64;
    let mut i = k as u64;
    let deadline = start + Duration::from_secs_f64(total as f64 / cfg.rate) + OVERRUN;
    while i < total {
        if Instant::now() > deadline {
            out.unsent = (total - i).div_ceil(step);
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / cfg.rate);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let req = requests
            .get((i % requests.len() as u64) as usize)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let c = match conn.take() {
            Some(c) => Ok(c),
            None => Conn::open(cfg.addr),
        };
        let sent = Instant::now();
        let outcome = c.and_then(|mut c| c.exchange(req).map(|status| (c, status)));
        let done = Instant::now();
        match outcome {
            Ok((c, status)) => {
                conn = Some(c);
                if i >= warmup_n {
                    if !(200..300).contains(&status) {
                        out.non_2xx += 1;
                    }
                    out.latency_us
                        .push(micros(done.saturating_duration_since(due)));
                    out.service_us
                        .push(micros(done.saturating_duration_since(sent)));
                    out.send_lag_us
                        .push(micros(sent.saturating_duration_since(due)));
                    out.last_done = Some(done);
                }
            }
            Err(e) => {
                if out.errors < 5 {
                    eprintln!("paced: connection {k}, request {i}: {e}");
                }
                out.errors += 1;
            }
        }
        i += step;
    }
    out
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn summary(v: &mut [u32]) -> Value {
    v.sort_unstable();
    let q = |p: f64| -> u32 {
        if v.is_empty() {
            return 0;
        }
        let idx = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v.get(idx).copied().unwrap_or(0)
    };
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
    };
    json!({
        "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
        "max": v.last().copied().unwrap_or(0), "mean": mean,
    })
}

/// A keep-alive HTTP/1.1 client connection that reads one
/// `content-length` response per request.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends `req` and reads the whole response; returns its status.
    fn exchange(&mut self, req: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(req)?;
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(self.buf.get(..head_end).unwrap_or_default())
            .map_err(|_| bad("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut length = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(bad("chunked responses are not supported"));
                }
            }
        }
        let length = length.ok_or_else(|| bad("response has no content-length"))?;
        if length > MAX_RESPONSE {
            return Err(bad("response body too large"));
        }
        while self.buf.len() < head_end + length {
            self.fill()?;
        }
        self.buf.drain(..head_end + length);
        Ok(status)
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.len() > MAX_RESPONSE + 64 * 1024 {
            return Err(bad("response too large"));
        }
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn config_rejects_bad_values() {
        let ok = Config::default();
        assert_eq!(ok.check().ok(), Some(36_000));
        let cases: Vec<Config> = vec![
            Config {
                rate: 0.0,
                ..ok.clone()
            },
            Config {
                rate: f64::NAN,
                ..ok.clone()
            },
            Config {
                duration_s: -1.0,
                ..ok.clone()
            },
            Config {
                connections: 0,
                ..ok.clone()
            },
            Config {
                keys: 0,
                ..ok.clone()
            },
            Config {
                path: "no-slash".into(),
                ..ok.clone()
            },
            Config {
                key_header: "bad header".into(),
                ..ok.clone()
            },
            Config {
                rate: 1e9,
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(c.check().is_err(), "accepted {c:?}");
        }
    }

    /// A real server on loopback that answers after a fixed delay: the
    /// paced client must keep its schedule and see at least that delay.
    #[test]
    fn paced_run_counts_and_times_real_responses() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve_slowly(stream));
            }
        });
        let cfg = Config {
            addr,
            rate: 200.0,
            duration_s: 1.0,
            warmup_s: 0.25,
            connections: 2,
            ..Config::default()
        };
        let r = run(&cfg).expect("run");
        assert_eq!(r["errors"], 0);
        assert_eq!(r["non_2xx"], 0);
        assert_eq!(r["completed"], 200, "{r}");
        let p50 = r["latency_us"]["p50"].as_u64().unwrap_or(0);
        assert!(
            (2_000..50_000).contains(&p50),
            "p50 {p50} µs for a 2 ms server"
        );
        let rate = r["rate_achieved"].as_f64().unwrap_or(0.0);
        assert!((150.0..250.0).contains(&rate), "achieved {rate} req/s");
    }

    #[test]
    fn requests_file_lines_parse_and_bad_lines_are_refused() {
        let specs = parse_requests("GET\t/a\n\nPOST\t/predict\t{\"x\":\t1}\n").expect("parse");
        assert_eq!(
            specs,
            vec![
                Spec {
                    method: "GET".into(),
                    path: "/a".into(),
                    body: None
                },
                Spec {
                    method: "POST".into(),
                    path: "/predict".into(),
                    body: Some("{\"x\":\t1}".into())
                },
            ]
        );
        for bad in [
            "",
            "\n\n",
            "GET /a",
            "get\t/a",
            "GET\tno-slash",
            "GET\t/a b",
            "GET\t/ok\nPOST",
        ] {
            let err = parse_requests(bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid "), "{bad:?}: {err}");
        }
        let huge = format!("POST\t/p\t{}", "x".repeat(MAX_BODY + 1));
        assert!(parse_requests(&huge).is_err());
    }

    /// Request K of a requests file goes out with line K's method, path and
    /// body, framed so that a keep-alive server reads every one.
    #[test]
    fn requests_file_bodies_reach_a_real_server_intact() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = std::sync::Arc::clone(&log);
                thread::spawn(move || serve_recording(stream, &log));
            }
        });
        let requests = parse_requests(concat!(
            "POST\t/predict\t{\"parameters\":{\"model_version\":\"1\"}}\n",
            "POST\t/predict\t{\"parameters\":{\"model_version\":\"2\"},\"pad\":\"\u{e9}\"}\n",
            "GET\t/v2/models/m/versions/2/infer\n",
        ))
        .expect("parse");
        let cfg = Config {
            addr,
            rate: 300.0,
            duration_s: 0.5,
            warmup_s: 0.0,
            connections: 2,
            requests: requests.clone(),
            ..Config::default()
        };
        let r = run(&cfg).expect("run");
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["non_2xx"], 0, "{r}");
        assert_eq!(r["completed"], 150, "{r}");
        let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(seen.len(), 150);
        for (method, path, key, body) in seen {
            let k: usize = key
                .strip_prefix("user-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            let spec = requests.get(k).expect("key names a line");
            assert_eq!((&method, &path), (&spec.method, &spec.path));
            assert_eq!(body, spec.body.clone().unwrap_or_default().into_bytes());
        }
    }

    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, Vec<u8>)>>>;

    /// Reads requests with `content-length` bodies, records (method, path,
    /// x-user-id, body) and answers 200.
    fn serve_recording(mut s: TcpStream, log: &Seen) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..p]).into_owned();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap_or_default().split(' ');
                let method = first.next().unwrap_or_default().to_owned();
                let path = first.next().unwrap_or_default().to_owned();
                let (mut len, mut key) = (0, String::new());
                for line in lines {
                    if let Some((n, v)) = line.split_once(':') {
                        if n.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        } else if n.eq_ignore_ascii_case("x-user-id") {
                            key = v.trim().to_owned();
                        }
                    }
                }
                if buf.len() >= p + 4 + len {
                    let body = buf[p + 4..p + 4 + len].to_vec();
                    buf.drain(..p + 4 + len);
                    if let Ok(mut v) = log.lock() {
                        v.push((method, path, key, body));
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                    if s.write_all(ok).is_err() {
                        return;
                    }
                    continue;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn serve_slowly(mut s: TcpStream) {
        let _ = s.set_nodelay(true);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(p) = find(&buf, b"\r\n\r\n") {
                buf.drain(..p + 4);
                thread::sleep(Duration::from_millis(2));
                let body = b"{\"ok\":true}";
                let mut resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                    .into_bytes();
                resp.extend_from_slice(body);
                if s.write_all(&resp).is_err() {
                    return;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
