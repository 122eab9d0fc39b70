//! Mirroring in a real Envoy: the canary stage copies a fraction of the
//! baseline's infer requests to a shadow version's cluster, from the root
//! context, and the client never sees the copy: not its answer, not its
//! failure, not its delay.

use std::collections::HashSet;
use std::time::Duration;

use e2e::load::{self, Plan, Record};
use e2e::upstream::{digest, Mode};
use e2e::{require_envoy, Bootstrap, Envoy, FailurePolicy, Req, Stats, Upstream, WasmFilter};
use filter_core::stats::shadow::{ERRORS, REQUESTS, SKIPPED};
use serde_json::json;

const MODEL: &str = "digits-mlp";
const INFER: &str = "/v2/models/digits-mlp/infer";

/// All traffic on version 1; `shadow` copies to version 2's cluster.
fn config(shadow: serde_json::Value) -> serde_json::Value {
    json!({"splits": [{
        "model": MODEL,
        "versions": [{"name": "1", "weight": 100}, {"name": "2", "weight": 0}],
        "shadow": shadow,
    }]})
}

struct Rig {
    envoy: Envoy,
    stable: Upstream,
    candidate: Upstream,
    _default: Upstream,
}

impl Rig {
    async fn start(cfg: &serde_json::Value) -> Rig {
        filter_core::config::canary::parse(cfg.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the test's own config is invalid: {e}"));
        let stable = Upstream::start("v1").await;
        let candidate = Upstream::start("v2").await;
        let default = Upstream::start("default").await;
        let envoy = Envoy::start(
            &Bootstrap::new()
                .version_subsets(&[("1", &stable), ("2", &candidate)], &default)
                .wasm(WasmFilter::new(
                    "infermesh",
                    &e2e::wasm::module(),
                    json!({ "canary": cfg }).to_string(),
                )),
        )
        .await;
        Rig {
            envoy,
            stable,
            candidate,
            _default: default,
        }
    }

    /// `n` infer requests at `rate` req/s, each with its own body.
    async fn load(&self, n: u64, rate: f64) -> Vec<Record> {
        let mut plan = Plan::new(
            self.envoy.listener,
            rate,
            Duration::from_secs_f64(n as f64 / rate),
        );
        plan.timeout = Duration::from_secs(10);
        load::start(plan, |seq| Req::post(INFER, body(seq)))
            .expect("load starts")
            .finish()
            .await
            .expect("load ran")
    }
}

fn body(seq: u64) -> Vec<u8> {
    format!(r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"INT64","data":[{seq}]}}]}}"#)
        .into_bytes()
}

fn stat(stats: &Stats, name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("model", MODEL), ("version", "2")];
    labels.extend_from_slice(extra);
    stats.sum(name, &labels)
}

/// Every client answer came from version 1, unchanged.
fn assert_untouched(records: &[Record]) {
    for r in records {
        assert_eq!(r.status, Some(200), "#{}: {r:?}", r.seq);
        assert_eq!(r.served_by.as_deref(), Some("digits-mlp/1"), "#{}", r.seq);
    }
}

fn percentiles(records: &[Record]) -> (f64, f64) {
    let s = load::summarize(records);
    (s.p50_ms, s.p99_ms)
}

/// Waits until the candidate has answered every copy it received (the
/// metric counts answers, which arrive after the client's).
async fn settled(rig: &Rig, want: impl Fn(&Stats) -> bool) -> Stats {
    for _ in 0..100 {
        let stats = rig.envoy.stats().await;
        if want(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.envoy.stats().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_of_the_baselines_requests_are_copied_and_clients_see_none() {
    let _bin = require_envoy!("a_fifth_of_the_baselines_requests_are_copied_and_clients_see_none");
    let n = 2_000;
    let rig = Rig::start(&config(
        json!({"version": "2", "fraction": 0.2, "cluster": "v2"}),
    ))
    .await;
    let records = rig.load(n, 400.0).await;
    assert_untouched(&records);
    assert_eq!(rig.stable.count(), n as usize);

    let stats = settled(&rig, |s| {
        stat(s, REQUESTS, &[]) >= rig.candidate.count() as f64
    })
    .await;
    let copies = rig.candidate.seen();
    // 20% of 2 000: σ ≈ 18; ±90 is 5σ.
    assert!(
        (310..=490).contains(&copies.len()),
        "{} copies of {n}",
        copies.len()
    );
    let sent: HashSet<u64> = (0..n).map(|i| digest(&body(i))).collect();
    let mut seen_bodies = HashSet::new();
    for c in &copies {
        assert_eq!(c.method, "POST");
        assert_eq!(c.path, "/v2/models/digits-mlp/versions/2/infer");
        assert_eq!(c.header("x-infermesh-version").as_deref(), Some("2"));
        assert_eq!(c.header("x-infermesh-shadow").as_deref(), Some("1"));
        assert!(sent.contains(&c.body_digest), "a copy's body was not sent");
        assert!(seen_bodies.insert(c.body_digest), "a request copied twice");
    }
    assert_eq!(stat(&stats, REQUESTS, &[]), copies.len() as f64);
    assert_eq!(stat(&stats, ERRORS, &[]), 0.0);
    assert_eq!(stat(&stats, SKIPPED, &[]), 0.0);

    // The same load without the shadow, for the client-side figures.
    let plain = Rig::start(&json!({"splits": [{
        "model": MODEL,
        "versions": [{"name": "1", "weight": 100}, {"name": "2", "weight": 0}],
    }]}))
    .await;
    let without = plain.load(n, 400.0).await;
    assert_untouched(&without);
    assert_eq!(plain.candidate.count(), 0);
    let (p50, p99) = percentiles(&records);
    let (p50_without, p99_without) = percentiles(&without);
    eprintln!(
        "client latency at 400 req/s, {n} requests: mirrored 20%: p50 {p50:.2} ms p99 {p99:.2} ms; \
         without: p50 {p50_without:.2} ms p99 {p99_without:.2} ms (a report, not a benchmark)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_dead_candidate_has_no_client_effect() {
    let _bin = require_envoy!("a_hanging_or_dead_candidate_has_no_client_effect");
    let rig = Rig::start(&config(json!({
        "version": "2", "fraction": 1, "cluster": "v2",
        "timeout_ms": 300, "max_in_flight": 8
    })))
    .await;
    rig.candidate.set_mode(Mode::Hang);
    let records = rig.load(400, 200.0).await;
    assert_untouched(&records);
    let slow = records.iter().filter(|r| r.latency_ms > 250.0).count();
    assert_eq!(slow, 0, "a client waited for the hung copy");
    // Each worker holds at most 8 copies for up to 300 ms: at 200 req/s
    // most requests find the bound full.
    let stats = settled(&rig, |s| {
        stat(s, ERRORS, &[]) >= rig.candidate.count() as f64
    })
    .await;
    let hung = rig.candidate.count() as f64;
    assert!(hung > 0.0);
    assert_eq!(stat(&stats, ERRORS, &[]), hung, "each hung copy timed out");
    assert_eq!(stat(&stats, REQUESTS, &[]), 0.0);
    let skipped = stat(&stats, SKIPPED, &[("reason", "in_flight")]);
    assert_eq!(skipped + hung, 400.0, "every request was copied or skipped");
    assert!(skipped > 200.0, "{skipped}");

    // The candidate's process is gone: still nothing for the client.
    let mut rig = rig;
    rig.candidate.kill();
    let before = stat(&rig.envoy.stats().await, ERRORS, &[]);
    let records = rig.load(100, 200.0).await;
    assert_untouched(&records);
    let stats = settled(&rig, |s| stat(s, ERRORS, &[]) - before >= 100.0).await;
    assert_eq!(
        stat(&stats, ERRORS, &[]) - before + stat(&stats, SKIPPED, &[]) - skipped,
        100.0,
        "every copy to the dead candidate failed or was skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_outside_the_split_is_refused_with_the_field_named() {
    let _bin = require_envoy!("a_shadow_outside_the_split_is_refused_with_the_field_named");
    let bad = config(json!({"version": "3", "fraction": 0.2, "cluster": "v3"}));
    let stable = Upstream::start("v1").await;
    let candidate = Upstream::start("v2").await;
    let default = Upstream::start("default").await;
    let bootstrap = Bootstrap::new()
        .version_subsets(&[("1", &stable), ("2", &candidate)], &default)
        .wasm(
            WasmFilter::new(
                "infermesh",
                &e2e::wasm::module(),
                json!({ "canary": bad }).to_string(),
            )
            .failure_policy(FailurePolicy::FailClosed),
        );
    let want = "infermesh: invalid pluginConfig: canary.splits[0].shadow.version: \"3\" is not one of the split's versions";
    match Envoy::try_start(&bootstrap).await {
        Err(failure) => assert!(failure.log.contains(want), "{}", failure.log),
        Ok(envoy) => panic!("Envoy started with a refused shadow:\n{}", envoy.log()),
    }
}
