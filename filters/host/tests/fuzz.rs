//! Random-input smoke of the shipped module through the wasmtime host:
//! arbitrary configs (valid ones with random parameters, and mangled
//! ones), header maps (non-UTF-8 values, duplicates, huge values), bodies
//! in arbitrary chunking, trailers, upstream and callout answers (status,
//! reset, hang, latency) and timer orders (time passing between chunks
//! and requests), on a VM with a memory limit.
//!
//! Invariants, per request: the VM never traps, the stream ends (no
//! stall), the client gets exactly one answer (at most one local reply;
//! a held response is resumed or replaced), and a configure either
//! succeeds or is refused (never traps).
//!
//! Runs for `INFERMESH_FUZZ_SECS` (default 20) seconds; the seed is
//! printed, and `INFERMESH_FUZZ_SEED` replays a run.

use std::time::{Duration, Instant};

use filter_host::{Headers, Options, Plugin, Reply, Request, Sent};
use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

const MODELS: &[&str] = &["digits-mlp", "tiny-cnn", "m", "a.b", "x-y_z"];
const VERSIONS: &[&str] = &["1", "2", "3", "v1", "canary", "latest", "10"];

fn header_names() -> Vec<&'static str> {
    vec![
        "x-user-id",
        "cookie",
        "x-model-name",
        "x-model-version",
        "x-canary-version",
        "x-data-residency",
        "x-infermesh-version",
        "x-infermesh-model",
        "x-infermesh-cloud",
        "x-infermesh-debug",
        "content-type",
        "content-length",
        "x-request-id",
        "te",
        "transfer-encoding",
        "connection",
        "expect",
        "x-other",
    ]
}

fn text(r: &mut Rng) -> String {
    let pool = [
        "digits-mlp",
        "tiny-cnn",
        "1",
        "2",
        "canary",
        "stable",
        "eu",
        "us",
        "mars",
        "",
        "9",
        "uid=u1",
        "uid=; a=b",
        "application/json",
        "%2F",
        "..",
        "latest",
    ];
    if r.chance(70) {
        r.pick(&pool).to_string()
    } else {
        (0..r.below(12))
            .map(|_| (b'a' + r.below(26) as u8) as char)
            .collect()
    }
}

/// A header value: mostly plausible text, sometimes raw bytes (never NUL,
/// CR or LF: Envoy's codec rejects those), sometimes huge.
fn value(r: &mut Rng) -> Vec<u8> {
    match r.below(10) {
        0 => (0..r.below(64))
            .map(|_| loop {
                let b = r.next() as u8;
                if !matches!(b, 0 | b'\r' | b'\n') {
                    break b;
                }
            })
            .collect(),
        1 if r.chance(30) => vec![b'k'; 1 + r.below(96 << 10) as usize],
        2 | 3 => {
            let t = text(r).into_bytes();
            odd(r, t)
        }
        _ => text(r).into_bytes(),
    }
}

/// `bytes` with one byte outside ASCII at a random place (not UTF-8,
/// or a stray continuation byte).
fn odd(r: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    let at = r.below(bytes.len() as u64 + 1) as usize;
    bytes.insert(at, 0x80 | r.next() as u8);
    bytes
}

fn path(r: &mut Rng) -> String {
    let m = if r.chance(80) {
        r.pick(MODELS).to_string()
    } else {
        text(r)
    };
    let v = r.pick(VERSIONS);
    match r.below(9) {
        0 => format!("/v2/models/{m}/infer"),
        1 => format!("/v2/models/{m}/versions/{v}/infer"),
        2 => format!("/v2/models/{m}/versions/{v}/ready?x=1"),
        3 => "/predict".into(),
        4 => format!("/v2/models/{m}%2F{v}/infer"),
        5 => "/v2/models//infer".into(),
        6 => format!("/v2/models/{m}/versions/%{:02x}/infer", r.below(256)),
        7 => "/healthz".into(),
        _ => format!("/v2/models/{m}/{}", text(r)),
    }
}

fn body(r: &mut Rng) -> Vec<u8> {
    match r.below(8) {
        0 => Vec::new(),
        1 => (0..r.below(300)).map(|_| r.next() as u8).collect(),
        2 => {
            let mut b = br#"{"model":"tiny-cnn","pad":""#.to_vec();
            b.resize(r.below(300_000) as usize, b'x');
            b
        }
        3 => format!(r#"{{"model":{},"parameters":{{"model_version":{}}}}}"#,
            json!(r.pick(MODELS)), if r.chance(50) { json!(r.pick(VERSIONS)) } else { json!(1.5) }).into_bytes(),
        4 => {
            // Truncated or nested JSON.
            let s = format!(r#"{{"parameters":{{"model_version":"{}","x":[[[[{{}}]]]]}}, "model":"digits-mlp"}}"#, r.pick(VERSIONS));
            let cut = r.below(s.len() as u64 + 1) as usize;
            s.as_bytes()[..cut].to_vec()
        }
        5 => "[".repeat(r.below(5000) as usize).into_bytes(),
        6 => {
            let valid = serde_json::to_vec(&json!({"model": r.pick(MODELS),
                "parameters": {"model_version": r.pick(VERSIONS)}}))
            .unwrap_or_default();
            odd(r, valid)
        }
        _ => serde_json::to_vec(&json!({
            "id": "r", "model": r.pick(MODELS),
            "parameters": {"model_version": r.pick(VERSIONS)},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}]
        }))
        .unwrap_or_default(),
    }
}

fn config(r: &mut Rng) -> Value {
    let mut m = json!({});
    if r.chance(60) {
        let models: Vec<Value> = (0..1 + r.below(3))
            .map(|i| json!({"name": MODELS[i as usize], "versions": ["1", "2"], "aliases": {"stable": "1", "canary": "2"}}))
            .collect();
        let mut router = json!({"models": models, "model_header": "x-model-name", "version_header": "x-model-version", "rewrite_path": r.chance(50)});
        if r.chance(70) {
            router["body"] = json!({"model_pointer": "/model", "version_pointer": "/parameters/model_version",
                                    "max_wait_ms": 1 + r.below(300), "max_bytes": 1 + r.below(200_000)});
        }
        m["router"] = router;
    }
    if r.chance(60) {
        let w = r.below(101) as f64;
        let mut canary = json!({
            "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": w}, {"name": "2", "weight": 100.0 - w}]}],
            "sticky_key": [{"header": "x-user-id"}, {"cookie": "uid"}],
            "override_header": "x-canary-version",
            "trust_downstream_headers": r.chance(30),
        });
        if r.chance(20) {
            // The VM clock starts at 2027-01-15T08:00:00Z.
            canary["splits"][0]["schedule"] = json!({
                "start": "2027-01-15T08:00:00Z",
                "steps": [{"after_s": 0, "weights": {"2": 1}}, {"after_s": 1 + r.below(5), "weights": {"2": 50}}]
            });
        }
        m["canary"] = canary;
    }
    if r.chance(50) || m.as_object().is_some_and(|o| o.is_empty()) {
        let interval = 100 + r.below(500);
        let try_ms = 10 + r.below(1000);
        m["failover"] = json!({
            "clouds": [
                {"name": "aws", "cluster": "cloud-aws", "tags": ["eu"], "priority": 0},
                {"name": "gcp", "cluster": "cloud-gcp", "tags": ["eu"], "priority": 1},
                {"name": "azure", "cluster": "cloud-azure", "tags": ["us"], "priority": 2}
            ],
            "residency": {"header": "x-data-residency", "rules": {"eu": ["eu"], "us": ["us"]},
                          "default": ["*"], "on_unknown": if r.chance(50) { "reject" } else { "default" }},
            "health": {"probe": {"interval_ms": interval, "timeout_ms": 10 + r.below(interval - 10)},
                       "passive": {"consecutive_failures": 1 + r.below(5)}},
            "replay": {"max_attempts": 1 + r.below(3), "max_body_bytes": r.below(100_000),
                       "per_try_timeout_ms": try_ms, "total_deadline_ms": try_ms + r.below(3000)},
            "hedge": if r.chance(70) { json!({"delay_ms": 1 + r.below(try_ms.min(100) - 1)}) } else { json!({"enabled": false}) },
            "trust_downstream_headers": r.chance(30),
        });
    }
    if r.chance(20) {
        m["hosts"] = json!(["digits-mlp.models.svc.cluster.local", "*.example.com"]);
    }
    if r.chance(15) {
        // Canary alone: checked against filter-core decision by decision.
        if let Some(c) = m.get("canary").cloned() {
            m = json!({ "canary": c });
        }
    }
    m
}

/// A config mangled at random: deleted, retyped or garbage fields.
fn mangle(r: &mut Rng, v: &mut Value) {
    match v {
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                if r.chance(15) {
                    o.remove(&k);
                } else if r.chance(10) {
                    o.insert(
                        k,
                        match r.below(5) {
                            0 => json!(null),
                            1 => json!(-1),
                            2 => json!("x"),
                            3 => json!([]),
                            _ => json!(1e300),
                        },
                    );
                } else if let Some(x) = o.get_mut(&k) {
                    mangle(r, x);
                }
            }
        }
        Value::Array(a) => {
            if r.chance(10) {
                a.clear();
            }
            for x in a.iter_mut() {
                mangle(r, x);
            }
        }
        _ => {}
    }
}

fn reply(r: &mut Rng, s: &Sent) -> Reply {
    let latency = r.below(200);
    match r.below(12) {
        0 => Reply::Reset {
            latency_ms: latency,
        },
        1 if r.chance(50) => Reply::Hang,
        2 | 3 => Reply::status(*r.pick(&[500, 502, 503, 504, 429, 404]), "upstream failed")
            .after(latency),
        _ => {
            let mut headers: Headers = vec![("content-type".into(), b"application/json".to_vec())];
            if r.chance(10) {
                headers.push(("x-odd".into(), value(r)));
            }
            if r.chance(5) {
                headers.push(("x-infermesh-served-by".into(), b"spoof".to_vec()));
            }
            let _ = s;
            Reply::Respond {
                status: 200,
                headers,
                body: body(r),
                latency_ms: latency,
            }
        }
    }
}

fn request(r: &mut Rng) -> Request {
    let method = *r.pick(&["GET", "POST", "POST", "PUT"]);
    let mut req = Request::new(method, &path(r));
    if r.chance(20) {
        req.headers.retain(|(n, _)| n != ":authority");
        let host = *r.pick(&[
            "digits-mlp.models.svc.cluster.local",
            "other.svc:8000",
            "a.example.com",
            "",
        ]);
        req.headers
            .push((":authority".into(), host.as_bytes().to_vec()));
    }
    let names = header_names();
    if r.chance(50) {
        // Most users send a key.
        req.headers.push((
            "x-user-id".into(),
            format!("user-{}", r.below(1000)).into_bytes(),
        ));
    }
    for _ in 0..r.below(8) {
        let name = if r.chance(90) {
            r.pick(&names).to_string()
        } else {
            text(r).to_ascii_lowercase()
        };
        if name.is_empty() {
            continue;
        }
        req.headers.push((name, value(r)));
    }
    let b = if method == "GET" && r.chance(80) {
        Vec::new()
    } else {
        body(r)
    };
    if r.chance(70) {
        req.headers
            .push(("content-length".into(), b.len().to_string().into_bytes()));
    }
    // Arbitrary chunking.
    let mut rest = b.as_slice();
    while !rest.is_empty() {
        let n = (1 + r.below(rest.len() as u64)) as usize;
        let n = if r.chance(30) {
            n.min(1 + r.below(16) as usize)
        } else {
            n
        };
        req.chunks.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    if r.chance(10) {
        req.trailers = Some(vec![("x-trailer".into(), value(r))]);
    }
    req.chunk_gap_ms = if r.chance(20) { r.below(50) } else { 0 };
    req
}

#[test]
fn random_configs_requests_and_answers_never_trap_or_stall() {
    let secs: u64 = std::env::var("INFERMESH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("INFERMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("fuzz: INFERMESH_FUZZ_SEED={seed} for {secs} s");
    let plugin = Plugin::shipped().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let mut rng = Rng(seed);
    let (mut vms, mut refused, mut requests, mut fuel) = (0u64, 0u64, 0u64, 0u64);
    // Why unmangled configs were refused (the generator should make few).
    let mut reasons: Vec<String> = Vec::new();
    let mut checked = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        // One VM: a config, then a run of requests on it.
        let vm_seed = rng.next();
        let mut r = Rng(vm_seed);
        let mut cfg = config(&mut r);
        let mangled = r.chance(15);
        if mangled {
            mangle(&mut r, &mut cfg);
        }
        let bytes = if r.chance(3) {
            (0..r.below(200)).map(|_| r.next() as u8).collect()
        } else {
            cfg.to_string().into_bytes()
        };
        let opts = Options {
            allow_stop: r.chance(50),
            memory_limit: 48 << 20,
            ..Options::default()
        };
        let mut vm = match plugin.start(&bytes, opts) {
            Ok(vm) => vm,
            Err(e) => match e.downcast_ref::<filter_host::Failure>() {
                Some(filter_host::Failure::Refused { logs }) => {
                    refused += 1;
                    if !mangled && bytes.first() == Some(&b'{') && reasons.len() < 5 {
                        reasons.push(logs.join(" | "));
                    }
                    continue;
                }
                _ => panic!(
                    "configure trapped (INFERMESH_FUZZ_SEED={seed}, vm seed {vm_seed}): {e:?}\nconfig: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            },
        };
        vms += 1;
        // A canary-only config: its decisions must be filter-core's.
        let oracle = (!mangled && cfg.as_object().is_some_and(|o| o.len() == 1))
            .then(|| filter_core::config::canary::parse(cfg["canary"].to_string().as_bytes()).ok())
            .flatten();
        let mut answers = Rng(r.next());
        for i in 0..1 + r.below(40) {
            let req = request(&mut r);
            let mut up = |s: &Sent| reply(&mut answers, s);
            if r.chance(20) {
                let ms = r.below(2_000);
                if let Err(e) = vm.advance(ms, &mut up) {
                    panic!(
                        "trap while idle (seed {seed}, vm seed {vm_seed}): {e:?}\nconfig: {cfg}"
                    );
                }
            }
            // The canary decides in the request headers callback, first
            // thing in the exchange.
            let decided_at = vm.now_ms();
            let ex = match vm.exchange(&req, &mut up) {
                Ok(ex) => ex,
                Err(e) => panic!(
                    "trap after {:.1} s and {requests} requests (INFERMESH_FUZZ_SEED={seed}, vm seed \
                     {vm_seed}, request #{i}): {e:?}\nconfig: {cfg}\nrequest: {:?}",
                    t0.elapsed().as_secs_f64(),
                    short(&req)
                ),
            };
            requests += 1;
            fuel += ex.fuel;
            let what = || {
                format!(
                    "seed {seed}, vm seed {vm_seed}, request #{i}: {:?}\nconfig: {cfg}",
                    short(&req)
                )
            };
            assert!(!ex.stalled, "stalled: {}", what());
            assert!(
                ex.local_replies <= 1,
                "{} local replies: {}",
                ex.local_replies,
                what()
            );
            assert!(
                ex.status >= 100,
                "no answer (status {}): {}",
                ex.status,
                what()
            );
            assert!(
                ex.local_reply || ex.upstream.is_some(),
                "answered neither by the upstream nor the module: {}",
                what()
            );
            if let (Some(c), Some(up)) = (&oracle, &ex.upstream) {
                if let Some(want) = canary_says(c, &req, decided_at) {
                    assert_eq!(
                        filter_host::header(&up.headers, "x-infermesh-version"),
                        Some(want.as_bytes()),
                        "the module's canary decision is not filter-core's: {}",
                        what()
                    );
                    checked += 1;
                }
            }
        }
    }
    let took = t0.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {vms} VMs ({refused} configs refused), {requests} requests in {took:.1} s \
         ({:.0} req/s), {:.0} fuel/request",
        requests as f64 / took,
        fuel as f64 / requests.max(1) as f64
    );
    eprintln!("fuzz: {checked} canary decisions checked against filter-core");
    for r in &reasons {
        eprintln!("fuzz: refused: {r}");
    }
    assert!(requests > 0);
}

fn short(req: &Request) -> String {
    let headers: Vec<String> = req
        .headers
        .iter()
        .map(|(n, v)| {
            let v = String::from_utf8_lossy(v);
            let v: String = v.chars().take(60).collect();
            format!("{n}: {v}")
        })
        .collect();
    format!(
        "{headers:?} chunks {:?} trailers {}",
        req.chunks.iter().map(Vec::len).collect::<Vec<_>>(),
        req.trailers.is_some()
    )
}

/// The version filter-core's canary picks for `req`, when the pick does
/// not depend on the random word (keyed, override, pinned).
fn canary_says(
    cfg: &filter_core::config::canary::CanaryConfig,
    req: &Request,
    now_ms: u64,
) -> Option<String> {
    use filter_core::canary::{self, Decision, How};
    let first = |name: &str| filter_host::header(&req.headers, name);
    // Client x-infermesh-* headers are removed unless the config trusts
    // them, so they count only then.
    let trusted = |name: &str| {
        if cfg.trust_downstream_headers {
            first(name)
        } else {
            None
        }
    };
    let key = canary::sticky_key(&cfg.sticky_key, |h| first(h).map(<[u8]>::to_vec));
    let r = canary::Request {
        path: first(":path").unwrap_or_default(),
        trusted_model: trusted("x-infermesh-model"),
        trusted_version: trusted("x-infermesh-version"),
        override_version: cfg.override_header.as_deref().and_then(first),
        sticky_key: key.as_deref(),
    };
    let (split, version) = match canary::decide(cfg, &r, now_ms, 0) {
        Decision::Split {
            how: How::Unkeyed, ..
        }
        | Decision::Unmatched => return None,
        Decision::Split { split, version, .. } => (split, version),
        Decision::Pinned { split, version } => (split, version?),
    };
    cfg.splits.get(split)?.versions.get(version).cloned()
}
