//! The failover filter (`filter-failover`) in a real Envoy on V8 (two
//! workers), routed like an Istio sidecar: a VirtualService-style match on
//! `x-infermesh-cloud` to one cluster per cloud. Three stub upstreams on
//! 127.0.0.2, .3 and .4 stand for the clouds; each can be made to answer
//! 5xx, hang, reset or die. Each case asserts what an outsider sees: the
//! status and body the client got, which cloud answered, what that cloud
//! received, and Envoy's counters.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::upstream::{digest, Mode, UPSTREAM_HEADER};
use e2e::{
    assert_vm_healthy, require_envoy, Bootstrap, Envoy, Req, Resp, Stats, Upstream, WasmFilter,
};
use filter_core::headers::{CLOUD, SERVED_BY};
use filter_core::stats::failover::{
    FAILURES, GIVE_UPS, NOT_BUFFERED, NO_CLOUD, PROBES, REQUESTS, TRANSITIONS, TRIES,
};
use serde_json::json;

const INFER: &str = "/v2/models/digits-mlp/infer";
const PROBE_INTERVAL_MS: u64 = 200;

/// aws and gcp in the eu, azure in the us; pick order aws, gcp, azure.
fn config() -> serde_json::Value {
    json!({
        "clouds": [
            {"name": "aws", "cluster": "cloud-aws", "tags": ["eu"], "priority": 0},
            {"name": "gcp", "cluster": "cloud-gcp", "tags": ["eu"], "priority": 1},
            {"name": "azure", "cluster": "cloud-azure", "tags": ["us"], "priority": 2}
        ],
        "residency": {
            "header": "x-data-residency",
            "rules": {"eu": ["eu"], "us": ["us"]},
            "default": ["*"],
            "on_unknown": "reject"
        },
        "health": {
            "probe": {"interval_ms": PROBE_INTERVAL_MS, "timeout_ms": 100,
                      "healthy_threshold": 3, "unhealthy_threshold": 2},
            "passive": {"consecutive_failures": 3}
        },
        "replay": {"max_attempts": 3, "max_body_bytes": 65536,
                   "per_try_timeout_ms": 1000, "total_deadline_ms": 3000},
        "hedge": {"delay_ms": 50}
    })
}

struct Rig {
    envoy: Envoy,
    clouds: Vec<Upstream>,
}

const NAMES: [&str; 3] = ["aws", "gcp", "azure"];

/// The three stub clouds on 127.0.0.2, .3 and .4, and `b` with a
/// cluster `cloud-<name>` and an `x-infermesh-cloud: <name>` route each.
async fn clouds(mut b: Bootstrap) -> (Vec<Upstream>, Bootstrap) {
    let mut clouds = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let ip = [127, 0, 0, 2 + i as u8];
        let up = Upstream::start_on(name, SocketAddr::from((ip, 0))).await;
        let cluster = format!("cloud-{name}");
        b = b
            .cluster(&cluster, up.addr)
            .route_header(CLOUD, name, &cluster);
        clouds.push(up);
    }
    (clouds, b)
}

impl Rig {
    async fn start(config: serde_json::Value) -> Rig {
        Rig::start_with(config, false).await
    }

    /// `allow_stop`: the Wasm filter's `allow_on_headers_stop_iteration`,
    /// under which Envoy honours a StopIteration from the headers callback
    /// instead of turning it into StopAll.
    async fn start_with(config: serde_json::Value, allow_stop: bool) -> Rig {
        filter_core::config::failover::parse(config.to_string().as_bytes())
            .expect("the test's failover config");
        Rig::start_module(json!({ "failover": config }), allow_stop).await
    }

    /// The module with the config `module` (sections and all).
    async fn start_module(module: serde_json::Value, allow_stop: bool) -> Rig {
        filter_core::config::module::parse(module.to_string().as_bytes())
            .expect("the test's module config");
        let (clouds, b) = clouds(Bootstrap::new()).await;
        let b = b.default_route("cloud-aws").wasm(
            WasmFilter::new("infermesh", &e2e::wasm::module(), module.to_string())
                .allow_on_headers_stop_iteration(allow_stop),
        );
        let envoy = Envoy::start(&b).await;
        Rig { envoy, clouds }
    }

    fn cloud(&self, name: &str) -> &Upstream {
        self.clouds
            .iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no cloud {name}"))
    }

    fn cloud_mut(&mut self, name: &str) -> &mut Upstream {
        self.clouds
            .iter_mut()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no cloud {name}"))
    }

    /// Infer requests that are not probes, per cloud.
    fn infers(&self, name: &str) -> usize {
        self.cloud(name)
            .seen()
            .iter()
            .filter(|s| s.path == INFER)
            .count()
    }

    async fn send(&self, req: Req) -> Resp {
        let client = self.envoy.client();
        match tokio::time::timeout(Duration::from_secs(10), client.send(req)).await {
            Ok(r) => r,
            Err(_) => panic!(
                "no answer within 10 s\n{}",
                e2e::envoy::tail(&self.envoy.log(), 40)
            ),
        }
    }

    async fn stats(&self) -> Stats {
        self.envoy.stats().await
    }

    /// Waits until Envoy's gauge says `cloud` is (not) healthy.
    async fn wait_health(&self, cloud: &str, healthy: bool, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let v = self
                .stats()
                .await
                .get("infermesh_failover_cloud_healthy", &[("cloud", cloud)]);
            if v == Some(if healthy { 1.0 } else { 0.0 }) {
                let took = t0.elapsed();
                // The gauge shows the first VM that saw the change; every
                // worker re-reads the shared records within 50 ms.
                tokio::time::sleep(Duration::from_millis(120)).await;
                return took;
            }
            assert!(
                t0.elapsed() < within,
                "cloud {cloud} not {} within {within:?} (gauge {v:?})",
                if healthy { "healthy" } else { "unhealthy" }
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn infer_body() -> Vec<u8> {
    let data: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    serde_json::to_vec(&json!({
        "id": "req-7",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": data}]
    }))
    .unwrap_or_default()
}

fn infer(residency: Option<&str>) -> Req {
    let r = Req::post(INFER, infer_body()).header("content-type", "application/json");
    match residency {
        Some(v) => r.header("x-data-residency", v),
        None => r,
    }
}

/// The filter's non-zero counters, for failure messages.
fn dump(stats: &Stats) -> String {
    [
        REQUESTS,
        TRIES,
        FAILURES,
        GIVE_UPS,
        TRANSITIONS,
        PROBES,
        NO_CLOUD,
    ]
    .iter()
    .flat_map(|n| stats.matching(n, &[]))
    .filter(|s| s.value != 0.0)
    .map(|s| format!("{}{:?} = {}", s.name, s.labels, s.value))
    .collect::<Vec<_>>()
    .join("\n")
}

fn answered_by(r: &Resp) -> String {
    r.header(UPSTREAM_HEADER).unwrap_or_else(|| "-".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_by_priority_and_says_who_served() {
    let _bin = require_envoy!("picks_by_priority_and_says_who_served");
    let rig = Rig::start(config()).await;
    let mut resps = Vec::new();
    for residency in [None, Some("eu"), Some("us")] {
        let r = rig
            .send(
                infer(residency)
                    .header(CLOUD, "azure")
                    .header("x-infermesh-version", "9"),
            )
            .await;
        resps.push(r);
    }
    let want = ["aws", "aws", "azure"];
    for (r, want) in resps.iter().zip(want) {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(answered_by(r), want);
        assert_eq!(
            r.header(SERVED_BY).as_deref(),
            Some(format!("@{want}").as_str())
        );
        assert_eq!(r.header("x-infermesh-failover"), None);
    }
    // What aws received: the filter's cloud header, not the client's, and
    // no other spoofed x-infermesh-* header; the body intact.
    let seen = rig.cloud("aws").seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.path == INFER)
        .expect("aws saw the request");
    assert_eq!(last.header(CLOUD).as_deref(), Some("aws"));
    assert_eq!(last.header("x-infermesh-version"), None);
    assert_eq!(last.body_digest, digest(&infer_body()));
    let stats = rig.stats().await;
    assert_eq!(
        stats.get(REQUESTS, &[("cloud", "aws"), ("outcome", "served")]),
        Some(2.0)
    );
    assert_eq!(
        stats.get(REQUESTS, &[("cloud", "azure"), ("outcome", "served")]),
        Some(1.0)
    );
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_wait_that_runs_out_still_fails_over_with_the_body() {
    // Router with body routing and failover, loaded without
    // allow_on_headers_stop_iteration (as a WasmPlugin would be): the
    // router's wait for the body runs out on the root's tick, the stages
    // decide from there, and the request resumes. Failover must still have
    // the whole body for a replay when the first cloud fails.
    let _bin = require_envoy!("a_body_wait_that_runs_out_still_fails_over_with_the_body");
    // aws stays in the pick (no probe round during the test, no ejection
    // by four failures), so each request is routed there, fails, and is
    // replayed.
    let mut failover = config();
    failover["health"]["probe"]["interval_ms"] = json!(60_000);
    failover["health"]["passive"]["consecutive_failures"] = json!(10);
    let module = json!({
        "router": {
            "models": [{"name": "digits-mlp", "versions": ["1", "2"]}],
            "body": {"version_pointer": "/parameters/model_version", "max_wait_ms": 100}
        },
        "failover": failover,
    });
    let rig = Rig::start_module(module, false).await;
    rig.cloud("aws").set_mode(Mode::Status(500));
    for i in 0..4 {
        let r = tokio::time::timeout(Duration::from_secs(5), rig.send(infer(Some("eu"))))
            .await
            .expect("a request hung");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(answered_by(&r), "gcp", "request {i}");
        assert_eq!(
            r.header("x-infermesh-failover").as_deref(),
            Some("replayed"),
            "request {i}"
        );
    }
    let seen = rig.cloud("gcp").seen();
    let replays: Vec<_> = seen.iter().filter(|s| s.path == INFER).collect();
    assert_eq!(replays.len(), 4);
    for got in replays {
        assert_eq!(
            got.body_digest,
            digest(&infer_body()),
            "the replay lost the body"
        );
        assert_eq!(
            got.header("x-infermesh-model").as_deref(),
            Some("digits-mlp")
        );
    }
    assert_vm_healthy(&[], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_replayed_to_the_next_cloud() {
    let _bin = require_envoy!("a_5xx_is_replayed_to_the_next_cloud");
    for allow_stop in [false, true] {
        replay_a_5xx(allow_stop).await;
    }
}

/// With or without `allow_on_headers_stop_iteration` (a user may set it
/// for every filter): the held failure, body included, must not escape
/// while the replay runs.
async fn replay_a_5xx(allow_stop: bool) {
    let rig = Rig::start_with(config(), allow_stop).await;
    rig.cloud("aws").set_mode(Mode::Status(500));
    let r = rig
        .send(infer(Some("eu")).header("x-request-id", "abc-1"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r), "gcp");
    assert_eq!(r.header(SERVED_BY).as_deref(), Some("@gcp"));
    assert_eq!(
        r.header("x-infermesh-failover").as_deref(),
        Some("replayed")
    );
    assert_eq!(r.text(), "upstream=gcp\n");
    // gcp got the same request: body, content type, request id, and its
    // own cloud header.
    let seen = rig.cloud("gcp").seen();
    let got = seen
        .iter()
        .find(|s| s.path == INFER)
        .expect("gcp saw the replay");
    assert_eq!(got.method, "POST");
    assert_eq!(got.body_digest, digest(&infer_body()));
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(got.header("x-request-id").as_deref(), Some("abc-1"));
    assert_eq!(got.header(CLOUD).as_deref(), Some("gcp"));
    assert_eq!(
        rig.infers("aws"),
        1,
        "aws was tried once (500 is not retried by Envoy)"
    );
    let stats = rig.stats().await;
    assert_eq!(
        stats.get(REQUESTS, &[("cloud", "gcp"), ("outcome", "replayed")]),
        Some(1.0)
    );
    assert_eq!(
        stats.get(TRIES, &[("cloud", "gcp"), ("decision", "replay")]),
        Some(1.0)
    );
    assert_eq!(
        stats.get(FAILURES, &[("cloud", "aws"), ("failure", "status_5xx")]),
        Some(1.0)
    );
    assert_vm_healthy(&[r], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cloud_is_replayed_then_taken_out() {
    let _bin = require_envoy!("a_dead_cloud_is_replayed_then_taken_out");
    let mut rig = Rig::start(config()).await;
    rig.cloud_mut("aws").kill();
    let mut resps = Vec::new();
    for _ in 0..20 {
        resps.push(rig.send(infer(None)).await);
    }
    for r in &resps {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(answered_by(r), "gcp");
    }
    let stats = rig.stats().await;
    let replayed = stats.sum(REQUESTS, &[("cloud", "gcp"), ("outcome", "replayed")]);
    let direct = stats.sum(REQUESTS, &[("cloud", "gcp"), ("outcome", "served")]);
    // Istio's route retries connect failures with a backoff, so a first try
    // can outlast the 50 ms hedge delay: then the hedge answers.
    let hedged = stats.sum(REQUESTS, &[("cloud", "gcp"), ("outcome", "hedged")]);
    assert_eq!(replayed + hedged + direct, 20.0, "{}", dump(&stats));
    // Passive health (3 consecutive failures, both workers feeding one
    // shared record) or the probes take aws out within a second; after
    // that requests go to gcp directly: no failover header.
    assert!(
        replayed + hedged <= 8.0,
        "{} replays and hedges: aws was not taken out",
        replayed + hedged
    );
    rig.wait_health("aws", false, Duration::from_secs(1)).await;
    for i in 0..10 {
        let r = rig.send(infer(None)).await;
        assert_eq!(answered_by(&r), "gcp");
        assert_eq!(
            r.header("x-infermesh-failover"),
            None,
            "request {i} after the ejection still failed over"
        );
        resps.push(r);
    }
    let stats = rig.stats().await;
    assert_eq!(
        stats.sum(TRANSITIONS, &[("cloud", "aws"), ("outcome", "unhealthy")]),
        1.0
    );
    // Every live failure seen on the dead cloud is a connect failure
    // (hedges may have answered first, so there may be few of them).
    assert_eq!(
        stats.sum(FAILURES, &[("cloud", "aws")]),
        stats.sum(
            FAILURES,
            &[("cloud", "aws"), ("failure", "connect_failure")]
        ),
        "{}",
        dump(&stats)
    );
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cloud_is_hedged() {
    let _bin = require_envoy!("a_hung_cloud_is_hedged");
    let rig = Rig::start(config()).await;
    rig.cloud("aws").set_mode(Mode::Hang);
    let mut slowest = Duration::ZERO;
    let mut resps = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let r = rig.send(infer(None)).await;
        slowest = slowest.max(t0.elapsed());
        resps.push(r);
    }
    for r in &resps {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(answered_by(r), "gcp");
    }
    let stats = rig.stats().await;
    let hedged = stats.sum(REQUESTS, &[("cloud", "gcp"), ("outcome", "hedged")]);
    assert!(hedged >= 1.0, "no request was hedged");
    assert_eq!(
        resps
            .iter()
            .filter(|r| r.header("x-infermesh-failover").as_deref() == Some("hedged"))
            .count() as f64,
        hedged
    );
    // 50 ms hedge delay + a 10 ms tick + the loopback answer; generous for
    // a loaded machine, far below the 1 s try timeout.
    assert!(slowest < Duration::from_millis(400), "slowest {slowest:?}");
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_is_never_crossed() {
    let _bin = require_envoy!("residency_is_never_crossed");
    let rig = Rig::start(config()).await;
    for up in ["aws", "gcp"] {
        rig.cloud(up).set_mode(Mode::Status(503));
    }
    rig.wait_health("aws", false, Duration::from_secs(3)).await;
    rig.wait_health("gcp", false, Duration::from_secs(3)).await;
    let before = rig.infers("azure");
    let t0 = Instant::now();
    let r = rig.send(infer(Some("eu"))).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let body: serde_json::Value = serde_json::from_str(&r.text()).expect("JSON body");
    assert_eq!(body["model"], "digits-mlp");
    assert_eq!(body["residency"]["header"], "x-data-residency");
    assert_eq!(body["residency"]["value"], "eu");
    assert_eq!(body["residency"]["tags"], json!(["eu"]));
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("none healthy"),
        "{body}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A us request still goes to azure; an unknown value is rejected.
    let us = rig.send(infer(Some("us"))).await;
    assert_eq!(answered_by(&us), "azure");
    let unknown = rig.send(infer(Some("mars"))).await;
    assert_eq!(unknown.status, 503);
    assert!(
        unknown.text().contains("which no rule lists"),
        "{}",
        unknown.text()
    );
    assert_eq!(
        rig.infers("azure"),
        before + 1,
        "only the us request reached azure"
    );
    let stats = rig.stats().await;
    assert_eq!(
        stats.get(NO_CLOUD, &[("reason", "none_healthy")]),
        Some(1.0)
    );
    assert_eq!(
        stats.get(NO_CLOUD, &[("reason", "none_allowed")]),
        Some(1.0)
    );
    assert_vm_healthy(&[r, us, unknown], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_clouds_down_answer_503_at_once() {
    let _bin = require_envoy!("all_clouds_down_answer_503_at_once");
    let mut rig = Rig::start(config()).await;
    for name in NAMES {
        rig.cloud_mut(name).kill();
    }
    for name in NAMES {
        rig.wait_health(name, false, Duration::from_secs(3)).await;
    }
    let mut took = Vec::new();
    let mut resps = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        let r = rig.send(infer(None)).await;
        took.push(t0.elapsed());
        resps.push(r);
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    for r in &resps {
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_str(&r.text()).expect("JSON body");
        assert_eq!(body["model"], "digits-mlp");
    }
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_model_header_names_no_model() {
    // Trusted x-infermesh-model on a non-OIP path: the 503 names the model
    // it gives, and an empty one names none (as `infermesh explain` says).
    let _bin = require_envoy!("an_empty_model_header_names_no_model");
    let mut cfg = config();
    cfg["trust_downstream_headers"] = json!(true);
    let rig = Rig::start(cfg).await;
    let send = |model: &'static str| {
        rig.send(
            Req::post("/predict", infer_body())
                .header("x-data-residency", "mars")
                .header("x-infermesh-model", model),
        )
    };
    let (named, empty) = (send("digits-mlp").await, send("").await);
    for (r, model) in [(&named, json!("digits-mlp")), (&empty, json!(null))] {
        assert_eq!(r.status, 503, "{}", r.text());
        let body: serde_json::Value = serde_json::from_str(&r.text()).expect("JSON body");
        assert_eq!(body["model"], model, "{body}");
    }
    assert!(empty.text().contains("this request"), "{}", empty.text());
    assert_vm_healthy(&[named, empty], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_cloud_gets_traffic_back_once() {
    let _bin = require_envoy!("a_returning_cloud_gets_traffic_back_once");
    let rig = Rig::start(config()).await;
    rig.cloud("aws").set_mode(Mode::Status(503));
    rig.wait_health("aws", false, Duration::from_secs(3)).await;
    let r = rig.send(infer(None)).await;
    assert_eq!(answered_by(&r), "gcp");
    rig.cloud("aws").set_mode(Mode::Ok);
    let back = rig.wait_health("aws", true, Duration::from_secs(5)).await;
    // healthy_threshold 3 rounds of 200 ms: not before ~400 ms.
    assert!(
        back >= Duration::from_millis(300),
        "back after {back:?}: no hysteresis"
    );
    let r = rig.send(infer(None)).await;
    assert_eq!(answered_by(&r), "aws");
    // Probes alternate ok/failed faster than the thresholds: no flapping.
    let stats = rig.stats().await;
    assert_eq!(
        stats.sum(TRANSITIONS, &[("cloud", "aws"), ("outcome", "healthy")]),
        1.0
    );
    assert_eq!(
        stats.sum(TRANSITIONS, &[("cloud", "aws"), ("outcome", "unhealthy")]),
        1.0
    );
    assert!(stats.sum(PROBES, &[("cloud", "aws"), ("outcome", "failed")]) >= 2.0);
    assert_vm_healthy(&[r], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_per_interval_per_process() {
    let _bin = require_envoy!("one_probe_per_interval_per_process");
    let rig = Rig::start(config()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = |rig: &Rig| {
        rig.cloud("gcp")
            .seen()
            .iter()
            .filter(|s| s.path == "/v2/health/ready")
            .count()
    };
    let a = ready(&rig);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let n = ready(&rig) - a;
    let expected = window.as_millis() as f64 / PROBE_INTERVAL_MS as f64;
    // Two workers tick independently; claiming through shared data keeps
    // it at ~one round per interval (a tick is 50 ms, so a round starts up
    // to 50 ms late: between 0.75× and 1.1× of the nominal count).
    assert!(
        (n as f64) >= expected * 0.75 && (n as f64) <= expected * 1.1,
        "{n} probes in {window:?}, expected ~{expected}"
    );
    let seen = rig.cloud("gcp").seen();
    let probe = seen
        .iter()
        .find(|s| s.path == "/v2/health/ready")
        .expect("a probe");
    assert_eq!(probe.method, "GET");
    assert_eq!(
        probe.header("user-agent").as_deref(),
        Some("infermesh-failover-probe")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_replayed_is_not() {
    let _bin = require_envoy!("what_must_not_be_replayed_is_not");
    let rig = Rig::start(config()).await;
    rig.cloud("aws").set_mode(Mode::Status(500));
    // Not idempotent (a repository load), reached the upstream: the 500
    // stands.
    let load = rig
        .send(Req::post(
            "/v2/repository/models/digits-mlp/load",
            b"{}".to_vec(),
        ))
        .await;
    assert_eq!(load.status, 500);
    assert_eq!(answered_by(&load), "aws");
    assert_eq!(load.header(SERVED_BY).as_deref(), Some("@aws"));
    // Over max_body_bytes: not buffered, so not replayed; the response
    // says so.
    let big = vec![b' '; 70_000];
    let r = rig
        .send(Req::post(INFER, big).header("content-type", "application/json"))
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.header("x-infermesh-replay").as_deref(),
        Some("off; body over max_body_bytes")
    );
    let stats = rig.stats().await;
    assert_eq!(
        stats.get(GIVE_UPS, &[("reason", "not_idempotent")]),
        Some(1.0)
    );
    assert_eq!(
        stats.get(GIVE_UPS, &[("reason", "body_not_buffered")]),
        Some(1.0)
    );
    assert_eq!(stats.get(NOT_BUFFERED, &[]), Some(1.0));
    assert_eq!(rig.infers("gcp"), 0);
    assert_vm_healthy(&[load, r], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_field() {
    let _bin = require_envoy!("a_bad_config_is_refused_naming_the_field");
    let mut cfg = config();
    cfg["clouds"][1]["cluster"] = json!("cloud-aws");
    let b = Bootstrap::new()
        .cluster("cloud-aws", SocketAddr::from(([127, 0, 0, 2], 9)))
        .default_route("cloud-aws")
        .wasm(WasmFilter::new(
            "infermesh",
            &e2e::wasm::module(),
            json!({ "failover": cfg }).to_string(),
        ));
    let failure = match Envoy::try_start(&b).await {
        Ok(_) => panic!("Envoy started with a bad failover config"),
        Err(f) => f,
    };
    assert!(
        failure.log.contains(
            "infermesh: invalid pluginConfig: failover.clouds[1].cluster: \
             cluster \"cloud-aws\" is already used by cloud \"aws\""
        ),
        "{}",
        e2e::envoy::tail(&failure.log, 20)
    );
}

/// The module with all three stages (model-router, canary, failover) behind
/// a Lua filter that computes the route before the module runs.
async fn chain_rig() -> Rig {
    let router = json!({
        "models": [{"name": "digits-mlp", "versions": ["1", "2"],
                    "aliases": {"stable": "1", "canary": "2"}}]
    });
    let canary = json!({
        "splits": [{"model": "digits-mlp", "versions": [
            {"name": "1", "weight": 50}, {"name": "2", "weight": 50}]}],
        "sticky_key": [{"header": "x-user-id"}],
        "trust_downstream_headers": true
    });
    let mut failover = config();
    failover["trust_downstream_headers"] = json!(true);
    let lua = e2e::bootstrap::route_seen_ahead_filter();
    let (clouds, b) = clouds(Bootstrap::new().filter_ahead(lua)).await;
    let b = b.default_route("cloud-azure").wasm(WasmFilter::new(
        "infermesh",
        &e2e::wasm::module(),
        json!({ "router": router, "canary": canary, "failover": failover }).to_string(),
    ));
    let envoy = Envoy::start(&b).await;
    Rig { envoy, clouds }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_router_and_canary_routing_follows_the_cloud_header() {
    let _bin = require_envoy!("behind_router_and_canary_routing_follows_the_cloud_header");
    let rig = chain_rig().await;
    let mut resps = Vec::new();
    for user in 0..40 {
        let r = rig
            .send(infer(Some("eu")).header("x-user-id", format!("user-{user}")))
            .await;
        resps.push(r);
    }
    for r in &resps {
        assert_eq!(r.status, 200, "{}", r.text());
        // The Lua filter ahead computed the default route (azure); the
        // request still went where failover's header says.
        assert_eq!(r.header("x-route-seen-ahead").as_deref(), Some("default"));
        assert_eq!(answered_by(r), "aws");
        let v = r.header("x-upstream-saw-version").expect("a version");
        assert_eq!(
            r.header(SERVED_BY),
            Some(format!("digits-mlp/{v}@aws")),
            "canary completes failover's served-by"
        );
    }
    let versions: std::collections::BTreeSet<String> = resps
        .iter()
        .filter_map(|r| r.header("x-upstream-saw-version"))
        .collect();
    assert_eq!(versions.len(), 2, "40 users split over both versions");

    // A replay carries the canary's version into the path, and the reply
    // names version and cloud.
    rig.cloud("aws").set_mode(Mode::Status(503));
    let r = rig
        .send(infer(Some("eu")).header("x-user-id", "user-7"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r), "gcp");
    let v = r.header("x-upstream-saw-version").expect("a version");
    assert_eq!(r.header(SERVED_BY), Some(format!("digits-mlp/{v}@gcp")));
    let seen = rig.cloud("gcp").seen();
    let got = seen
        .iter()
        .rev()
        .find(|s| s.method == "POST")
        .expect("gcp saw the replay");
    assert_eq!(
        got.path,
        format!("/v2/models/digits-mlp/versions/{v}/infer")
    );
    assert_eq!(
        got.header("x-infermesh-model").as_deref(),
        Some("digits-mlp")
    );
    resps.push(r);
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_cloud_fails_the_first_failure_is_passed_on() {
    let _bin = require_envoy!("when_every_cloud_fails_the_first_failure_is_passed_on");
    let rig = Rig::start(config()).await;
    for name in NAMES {
        rig.cloud(name).set_mode(Mode::Status(500));
    }
    let r = rig.send(infer(None)).await;
    // Held while gcp and azure were tried, then released unchanged.
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "upstream=aws\n");
    assert_eq!(r.header(SERVED_BY).as_deref(), Some("@aws"));
    for name in NAMES {
        assert_eq!(rig.infers(name), 1, "{name} tried once");
    }
    let stats = rig.stats().await;
    assert_eq!(
        stats.get(GIVE_UPS, &[("reason", "attempts_exhausted")]),
        Some(1.0),
        "{}",
        dump(&stats)
    );
    assert_eq!(
        stats.get(REQUESTS, &[("cloud", "aws"), ("outcome", "failed")]),
        Some(1.0)
    );
    assert_vm_healthy(&[r], &rig.envoy.log());
}

/// Hedging off: a hung cloud is left after the try timeout and the
/// request replayed; when every cloud hangs, the filter answers 504 by
/// the total deadline instead of leaving the client waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_timeouts_replay_and_the_deadline_holds() {
    let _bin = require_envoy!("try_timeouts_replay_and_the_deadline_holds");
    let mut cfg = config();
    cfg["hedge"] = json!({"enabled": false});
    cfg["replay"] = json!({"max_attempts": 3, "per_try_timeout_ms": 300, "total_deadline_ms": 700});
    // Probes slow enough not to take aws out during the test.
    cfg["health"]["probe"] = json!({"interval_ms": 10000, "timeout_ms": 5000});
    let rig = Rig::start(cfg).await;
    rig.cloud("aws").set_mode(Mode::Hang);
    let t0 = Instant::now();
    let r = rig.send(infer(None)).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r), "gcp");
    assert_eq!(
        r.header("x-infermesh-failover").as_deref(),
        Some("replayed")
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(600),
        "{took:?}"
    );

    rig.cloud("gcp").set_mode(Mode::Hang);
    rig.cloud("azure").set_mode(Mode::Hang);
    let t0 = Instant::now();
    let r = rig.send(infer(None)).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    let body: serde_json::Value = serde_json::from_str(&r.text()).expect("JSON body");
    assert_eq!(body["model"], "digits-mlp");
    let tries: Vec<&str> = body["tries"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["cloud"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(tries.first(), Some(&"aws"), "{body}");
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_millis(1_000),
        "{took:?}: the 700 ms deadline"
    );
    let stats = rig.stats().await;
    assert!(
        stats.sum(FAILURES, &[("failure", "timeout")]) >= 2.0,
        "{}",
        dump(&stats)
    );
    assert_vm_healthy(&[r], &rig.envoy.log());
}

/// Hostile requests: odd residency values, bytes that are not UTF-8,
/// huge headers, broken OIP paths, spoofed cloud headers, replayed while
/// the first cloud fails. Each gets an answer; none traps the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_answers_and_never_trap_the_vm() {
    let _bin = require_envoy!("hostile_requests_get_answers_and_never_trap_the_vm");
    // aws answers 503 throughout and stays in (no hedging, no ejection),
    // so every case meets the replay decision.
    let mut cfg = config();
    cfg["hedge"] = json!({"enabled": false});
    cfg["health"] = json!({"probe": {"interval_ms": 10000, "timeout_ms": 5000},
                           "passive": {"consecutive_failures": 1000}});
    let rig = Rig::start(cfg).await;
    rig.cloud("aws").set_mode(Mode::Status(503));
    let long = "e".repeat(8_000);
    // (request, status wanted, cloud wanted or "-")
    let cases: Vec<(Req, u16, &str)> = vec![
        (infer(Some(" EU ")), 200, "gcp"),
        (infer(Some(&long)), 503, "-"),
        (
            infer(None).header("x-data-residency", b"\xff\xfeeu"),
            503,
            "-",
        ),
        (infer(None).header("x-data-residency", ""), 200, "gcp"),
        (
            infer(None)
                .header("x-trace", b"\xff\xfe\x80")
                .header(CLOUD, "azure"),
            200,
            "gcp",
        ),
        (infer(None).header("x-infermesh-cloud", b"\xff"), 200, "gcp"),
        // Not OIP paths, so a POST there is not idempotent: aws's 503
        // stands (it reached aws).
        (
            Req::post("/v2/models/%ff%fe/infer", infer_body()),
            503,
            "aws",
        ),
        (
            Req::post("/v2/models//versions//infer", infer_body()),
            503,
            "aws",
        ),
        (Req::get("/v2/models/digits-mlp/ready?x=%00"), 200, "gcp"),
        (Req::post(INFER, Vec::new()), 200, "gcp"),
        (Req::post(INFER, vec![0xffu8; 60_000]), 200, "gcp"),
    ];
    let mut resps = Vec::new();
    for (i, (req, status, cloud)) in cases.into_iter().enumerate() {
        let r = rig.send(req).await;
        assert_eq!(r.status, status, "case {i}: {}", r.text());
        if cloud != "-" {
            assert_eq!(answered_by(&r), cloud, "case {i}");
        } else {
            let body: serde_json::Value =
                serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert!(body["error"].is_string(), "case {i}: {body}");
            assert!(
                body["residency"]["value"]
                    .as_str()
                    .is_some_and(|v| v.len() <= 64),
                "case {i}: the echoed value is capped: {body}"
            );
        }
        resps.push(r);
    }
    // The non-UTF-8 header was left out of the replay; the spoofed cloud
    // header was replaced.
    let seen = rig.cloud("gcp").seen();
    let traced = seen
        .iter()
        .find(|s| {
            s.header(CLOUD).as_deref() == Some("gcp")
                && s.path == INFER
                && s.headers.contains_key("content-type")
        })
        .expect("gcp saw replays");
    assert!(!traced.headers.contains_key("x-trace"));
    assert!(seen
        .iter()
        .all(|s| s.header(CLOUD).as_deref() != Some("azure")));
    // 200 headers: within Envoy's raised limit, copied for the replay.
    let mut many = infer(None);
    for i in 0..200 {
        many = many.header(&format!("x-h{i}"), "v");
    }
    let r = rig.send(many).await;
    assert_eq!(
        r.status, 431,
        "Envoy's own header limit (100) answers first"
    );
    resps.push(r);
    assert_vm_healthy(&resps, &rig.envoy.log());
}

/// A slow upload is not the cloud's fault: try timeouts and hedge delays
/// start when the request is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_a_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _bin = require_envoy!("a_slow_upload_is_not_a_timeout");
    let mut cfg = config();
    cfg["replay"] = json!({"per_try_timeout_ms": 300, "total_deadline_ms": 600});
    cfg["hedge"] = json!({"delay_ms": 50});
    let rig = Rig::start(cfg).await;
    let body = infer_body();
    let mut tcp = tokio::net::TcpStream::connect(rig.envoy.listener)
        .await
        .expect("connect");
    let head = format!(
        "POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("write head");
    let (first, rest) = body.split_at(body.len() / 2);
    tcp.write_all(first).await.expect("write half");
    // Longer than the try timeout, the hedge delay and the deadline.
    tokio::time::sleep(Duration::from_millis(900)).await;
    tcp.write_all(rest).await.expect("write rest");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-infermesh-served-by: @aws"), "{text}");
    assert!(!text.contains("x-infermesh-failover"), "{text}");
    let seen = rig.cloud("aws").seen();
    let got = seen.iter().find(|s| s.path == INFER).expect("aws saw it");
    assert_eq!(got.body_digest, digest(&body));
    assert_eq!(rig.infers("gcp"), 0, "no hedge, no replay");
    let stats = rig.stats().await;
    assert_eq!(stats.sum(FAILURES, &[]), 0.0, "{}", dump(&stats));
    assert_eq!(stats.sum(GIVE_UPS, &[]), 0.0, "{}", dump(&stats));
}
