//! Failover under load, with real processes: three inference sidecars on
//! 127.0.0.2, .3 and .4 are three clouds (aws, gcp, azure) behind a real
//! Envoy (V8, two workers) running the failover filter. An open-loop
//! client POSTs digits-mlp infer requests at 200 req/s for 25–30 s and
//! records every status, latency and serving cloud while the primary (aws)
//! is killed and restarted, or frozen (SIGSTOP) and resumed.
//!
//! The scenarios run one after the other (a lock), not in parallel: on a
//! two-core machine two of them at once would measure the machine.
//! `bench/failover.sh` runs the long version (the primary frozen for over
//! a minute) next to Envoy's native failover.

use std::path::PathBuf;
use std::time::Duration;

use e2e::load::{self, Plan, Record};
use e2e::sidecar::Sidecar;
use e2e::{require_envoy, Bootstrap, Envoy, Req, WasmFilter};
use filter_core::headers::CLOUD;
use serde_json::json;

const RATE: f64 = 200.0;
const INFER: &str = "/v2/models/digits-mlp/infer";
const NAMES: [&str; 3] = ["aws", "gcp", "azure"];

/// One scenario at a time.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    e2e::repo_root()
}

fn config() -> serde_json::Value {
    json!({
        "clouds": [
            {"name": "aws", "cluster": "cloud-aws", "tags": ["eu"], "priority": 0},
            {"name": "gcp", "cluster": "cloud-gcp", "tags": ["eu"], "priority": 1},
            {"name": "azure", "cluster": "cloud-azure", "tags": ["us"], "priority": 2}
        ],
        "health": {
            "probe": {"interval_ms": 500, "timeout_ms": 300,
                      "healthy_threshold": 3, "unhealthy_threshold": 2},
            "passive": {"consecutive_failures": 3}
        },
        "replay": {"per_try_timeout_ms": 1000, "total_deadline_ms": 5000},
        // The hedge delay follows the debug sidecars' p95, capped at 50 ms
        // so that a hedged answer stays under 100 ms on a busy machine.
        "hedge": {"percentile": 95, "min_delay_ms": 20, "max_delay_ms": 50}
    })
}

/// A real digit from the model's reference cases.
fn infer_body() -> Vec<u8> {
    let path = repo().join("examples/models/digits-mlp/1/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    let input = &r["cases"][0]["inputs"]["input"];
    serde_json::to_vec(&json!({"inputs": [{
        "name": "input", "datatype": input["datatype"], "shape": input["shape"], "data": input["data"],
    }]}))
    .expect("infer body")
}

struct Rig {
    envoy: Envoy,
    clouds: Vec<Sidecar>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = e2e::sidecar::debug_bin();
        let models = repo().join("examples/models");
        let mut clouds = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let ip = [127, 0, 0, 2 + i as u8];
            let s = Sidecar::start(&bin, name, &models, ip, dir.path())
                .await
                .unwrap_or_else(|e| panic!("sidecar {name}: {e}"));
            clouds.push(s);
        }
        let mut b = Bootstrap::new();
        for s in &clouds {
            let cluster = format!("cloud-{}", s.name);
            b = b
                .cluster(&cluster, s.addr)
                .route_header(CLOUD, &s.name, &cluster);
        }
        b = b.default_route("cloud-aws").wasm(WasmFilter::new(
            "infermesh",
            &e2e::wasm::module(),
            serde_json::json!({ "failover": config() }).to_string(),
        ));
        let envoy = Envoy::start(&b).await;
        let rig = Rig {
            envoy,
            clouds,
            _dir: dir,
        };
        // Warm-up, not measured: connections, the sidecars' first
        // inferences, the filter's latency samples.
        let warm = load(&rig, 2).finish().await.expect("warm-up");
        assert!(
            warm.iter().all(Record::ok),
            "warm-up failed\n{}",
            describe(&warm)
        );
        rig
    }

    fn aws(&mut self) -> &mut Sidecar {
        self.clouds.first_mut().expect("aws")
    }

    fn plan(&self, secs: u64) -> Plan {
        let mut plan = Plan::new(self.envoy.listener, RATE, Duration::from_secs(secs));
        plan.timeout = Duration::from_secs(10);
        plan
    }
}

fn load(rig: &Rig, secs: u64) -> load::Running {
    let body = infer_body();
    load::start(rig.plan(secs), move |_| {
        Req::post(INFER, body.clone()).header("content-type", "application/json")
    })
    .expect("load starts")
}

fn describe(records: &[Record]) -> String {
    let mut out = String::new();
    for (sec, clouds) in load::per_second(records) {
        out.push_str(&format!("  t={sec:>2}s {clouds:?}\n"));
    }
    let slow: Vec<String> = records
        .iter()
        .filter(|r| r.latency_ms > 100.0 || !r.ok())
        .take(20)
        .map(|r| {
            format!(
                "  #{} at {:.0} ms: {:.0} ms {:?} {:?} {:?}",
                r.seq, r.start_ms, r.latency_ms, r.status, r.cloud, r.error
            )
        })
        .collect();
    format!("{out}slow or failed:\n{}", slow.join("\n"))
}

/// The filter's health transitions, from Envoy's log.
fn transitions(envoy: &Envoy) -> String {
    envoy
        .log()
        .lines()
        .filter(|l| l.contains("infermesh failover: cloud"))
        .map(|l| {
            let at = l.get(12..23).unwrap_or("");
            let what = l.rsplit("infermesh failover: ").next().unwrap_or(l);
            format!("  {at} {what}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Answered by a cloud other than aws.
fn away_from_aws(r: &Record) -> bool {
    r.ok() && r.cloud.as_deref().is_some_and(|c| c != "aws")
}

/// Traffic is back on aws from `from_ms` on: at least 99 % of the
/// requests due in `[from_ms, to_ms)` (a hedge to gcp may still win one
/// now and then). Returns the share.
fn returned(records: &[Record], from_ms: f64, to_ms: f64, why: &str) -> f64 {
    let win = load::window(records, from_ms, to_ms);
    let on_aws = win.iter().filter(|r| r.served_by_cloud("aws")).count();
    let share = on_aws as f64 / win.len().max(1) as f64;
    assert!(
        !win.is_empty() && share >= 0.99,
        "{on_aws} of {} requests on aws after the return\n{why}",
        win.len()
    );
    share
}

/// aws's health changed exactly twice (out, then back), and the other
/// clouds' never: hysteresis, no flapping. (Single requests around the
/// return may still be answered by gcp when a hedge wins.)
async fn assert_no_flapping(rig: &Rig, why: &str) {
    let stats = rig.envoy.stats().await;
    let count = |cloud: &str, outcome: &str| {
        stats.sum(
            "infermesh_failover_transitions_total",
            &[("cloud", cloud), ("outcome", outcome)],
        )
    };
    assert_eq!(count("aws", "unhealthy"), 1.0, "{why}");
    assert_eq!(count("aws", "healthy"), 1.0, "{why}");
    for other in ["gcp", "azure"] {
        assert_eq!(count(other, "unhealthy"), 0.0, "{other}\n{why}");
    }
}

/// aws is killed 8 s in and restarted on the same port 15 s in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_killed_and_returns() {
    let _bin = require_envoy!("the_primary_is_killed_and_returns");
    let _one = LOCK.lock().await;
    let mut rig = Rig::start().await;
    let run = load(&rig, 25);
    run.sleep_until(Duration::from_secs(8)).await;
    let kill_ms = run.elapsed_ms();
    rig.aws().kill();
    run.sleep_until(Duration::from_secs(15)).await;
    let back_ms = run.elapsed_ms();
    rig.aws().restart().await.expect("aws restarts");
    let records = run.finish().await.expect("load finishes");
    let all = load::summarize(&records);
    let why = format!("{}\n{}", describe(&records), transitions(&rig.envoy));
    assert_eq!(records.len(), 5_000);
    assert_eq!(all.errors, 0, "client-visible errors\n{why}");
    // Every request due 1 s after the kill (until the restart) is answered
    // by another cloud (gcp, or azure when a hedge wins).
    let switch = load::settle_ms(&records, kill_ms, back_ms, away_from_aws)
        .unwrap_or_else(|| panic!("traffic never left aws\n{why}"));
    assert!(switch <= 1_000.0, "switch took {switch:.0} ms\n{why}");
    // Back on aws after the probes' healthy threshold (3 × 500 ms, plus
    // the restart's own start-up), and no flapping: one switch away and
    // one back.
    let ret = returned(&records, back_ms + 6_000.0, 25_000.0, &why);
    assert_no_flapping(&rig, &why).await;
    eprintln!(
        "kill: {} requests, {} errors, switch {switch:.0} ms, {:.1} % on aws after the return, p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms\n{why}",
        all.requests, all.errors, ret * 100.0, all.p50_ms, all.p99_ms, all.max_ms
    );
}

/// aws is frozen (SIGSTOP) 8 s in and resumed 20 s in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_hangs_and_resumes() {
    let _bin = require_envoy!("the_primary_hangs_and_resumes");
    let _one = LOCK.lock().await;
    let mut rig = Rig::start().await;
    let run = load(&rig, 30);
    run.sleep_until(Duration::from_secs(8)).await;
    let stop_ms = run.elapsed_ms();
    rig.aws().stop().expect("SIGSTOP");
    run.sleep_until(Duration::from_secs(20)).await;
    let cont_ms = run.elapsed_ms();
    rig.aws().cont().expect("SIGCONT");
    let records = run.finish().await.expect("load finishes");
    let all = load::summarize(&records);
    let why = format!("{}\n{}", describe(&records), transitions(&rig.envoy));
    assert_eq!(records.len(), 6_000);
    assert_eq!(all.errors, 0, "client-visible errors\n{why}");
    // Latency from the freeze to the end: the fault, the resume and the
    // return of traffic. The target (at most 5 requests over 100 ms, none
    // over 250 ms) is what bench/failover.sh measures and BENCHMARKS.md
    // reports; this shared two-core machine stalls for 100-200 ms now and
    // then whatever the filter does, so the test allows for one stall
    // while still failing on any real regression: without hedging every
    // request to the frozen cloud waits for the 1 s try timeout (about
    // 200 of them), and Envoy's native failover puts ~100 over 100 ms and
    // its worst near 530 ms.
    let fault = load::summarize(load::window(&records, stop_ms, 30_000.0));
    assert!(
        fault.over_100ms <= 40,
        "{} requests over 100 ms\n{why}",
        fault.over_100ms
    );
    assert!(
        fault.max_ms < 400.0,
        "slowest {:.0} ms\n{why}",
        fault.max_ms
    );
    let switch = load::settle_ms(&records, stop_ms, cont_ms, away_from_aws)
        .unwrap_or_else(|| panic!("traffic never left aws\n{why}"));
    assert!(switch <= 1_000.0, "switch took {switch:.0} ms\n{why}");
    let ret = returned(&records, cont_ms + 4_000.0, 30_000.0, &why);
    assert_no_flapping(&rig, &why).await;
    eprintln!(
        "hang: {} requests, {} errors; from the freeze on: {} > 100 ms, {} > 250 ms, \
         max {:.0} ms; whole run: {} > 100 ms, max {:.0} ms; switch {switch:.0} ms, \
         {:.1} % on aws after the return\n{why}",
        all.requests,
        all.errors,
        fault.over_100ms,
        fault.over_250ms,
        fault.max_ms,
        all.over_100ms,
        all.max_ms,
        ret * 100.0
    );
}
