//! The canary filter (`filter-canary`) in a real Envoy on V8, routed like
//! an Istio sidecar: CORS and fault ahead, a VirtualService-style header
//! match on `x-infermesh-version` to one cluster per version, a default
//! route to a separate cluster. Expected versions come from `filter_core`,
//! the code the filter runs; shares are also checked against the weights.

use std::collections::{BTreeMap, HashMap, HashSet};

use e2e::bootstrap::{lua_filter, route_seen_ahead_filter, set_request_header_filter};
use e2e::upstream::{SAW_VERSION_HEADER, UPSTREAM_HEADER};
use e2e::{
    assert_vm_healthy, require_envoy, Bootstrap, Envoy, FailurePolicy, Req, Resp, Stats, Upstream,
    WasmFilter,
};
use filter_core::canary::{self, Decision};
use filter_core::config::canary::CanaryConfig;
use filter_core::headers::{SERVED_BY, VERSION};
use filter_core::stats::canary::{
    OVERRIDE_REJECTED as REJECTED, REQUESTS, STRIPPED, UNMATCHED, WEIGHT,
};
use serde_json::json;

const MODEL: &str = "digits-mlp";
const INFER: &str = "/v2/models/digits-mlp/infer";
const KEY_HEADER: &str = "x-user-id";
const KEY_COOKIE: &str = "uid";
const OVERRIDE: &str = "x-canary-version";

/// A pluginConfig splitting [`MODEL`] over `versions` (name, percent),
/// keyed on the `x-user-id` header, then the `uid` cookie.
fn config(versions: &[(&str, f64)]) -> serde_json::Value {
    let versions: Vec<_> = versions
        .iter()
        .map(|(name, weight)| json!({"name": name, "weight": weight}))
        .collect();
    json!({
        "splits": [{"model": MODEL, "versions": versions}],
        "sticky_key": [{"header": KEY_HEADER}, {"cookie": KEY_COOKIE}],
    })
}

/// Envoy with the canary filter, one upstream per version (cluster `v<N>`,
/// routed by `x-infermesh-version: <N>`) and a `default` upstream.
struct Rig {
    envoy: Envoy,
    versions: BTreeMap<String, Upstream>,
    default: Upstream,
    cfg: CanaryConfig,
}

impl Rig {
    async fn start(config: &serde_json::Value) -> Rig {
        Rig::start_with(config, |b| b).await
    }

    /// A rig whose module config is `module` (its canary section is
    /// `config`).
    async fn start_module(config: &serde_json::Value, module: &serde_json::Value) -> Rig {
        Rig::start_full(config, module.clone(), |b| b).await
    }

    async fn start_with(
        config: &serde_json::Value,
        customize: impl FnOnce(Bootstrap) -> Bootstrap,
    ) -> Rig {
        let module = serde_json::json!({ "canary": config });
        Rig::start_full(config, module, customize).await
    }

    async fn start_full(
        config: &serde_json::Value,
        module: serde_json::Value,
        customize: impl FnOnce(Bootstrap) -> Bootstrap,
    ) -> Rig {
        let text = config.to_string();
        let cfg = filter_core::config::canary::parse(text.as_bytes())
            .unwrap_or_else(|e| panic!("the test's own config is invalid: {e}"));
        let mut versions = BTreeMap::new();
        for v in cfg.splits.iter().flat_map(|s| &s.versions) {
            versions.insert(v.clone(), Upstream::start(&format!("v{v}")).await);
        }
        let default = Upstream::start("default").await;
        let subsets: Vec<(&str, &Upstream)> =
            versions.iter().map(|(v, u)| (v.as_str(), u)).collect();
        let wasm = e2e::wasm::module();
        let bootstrap = customize(
            Bootstrap::new()
                .version_subsets(&subsets, &default)
                .wasm(WasmFilter::new("infermesh", &wasm, module.to_string())),
        );
        let envoy = Envoy::start(&bootstrap).await;
        Rig {
            envoy,
            versions,
            default,
            cfg,
        }
    }

    /// The version filter_core picks for a keyed request to [`INFER`] now.
    fn predict(&self, key: &[u8]) -> String {
        predict(&self.cfg, key, e2e::now_ms())
    }

    async fn send_all(&self, reqs: Vec<Req>) -> Vec<Resp> {
        self.envoy.client().connections(16).send_all(reqs).await
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        let mut c: BTreeMap<String, usize> = self
            .versions
            .iter()
            .map(|(v, u)| (v.clone(), u.count()))
            .collect();
        c.insert("default".into(), self.default.count());
        c
    }
}

fn predict(cfg: &CanaryConfig, key: &[u8], now_ms: u64) -> String {
    let req = canary::Request {
        path: INFER.as_bytes(),
        sticky_key: Some(key),
        ..Default::default()
    };
    match canary::decide(cfg, &req, now_ms, 0) {
        Decision::Split { split, version, .. } => cfg.splits[split].versions[version].clone(),
        other => panic!("a keyed request to {INFER} was not split: {other:?}"),
    }
}

/// Asserts that `resp` was served by version `v`, seen three ways: the
/// upstream that answered, the `x-infermesh-version` that upstream
/// received, and the filter's `x-infermesh-served-by` response header.
fn assert_served_by(resp: &Resp, v: &str, what: &str) {
    assert_eq!(resp.status, 200, "{what}: {}", resp.text());
    assert_eq!(
        resp.text(),
        format!("upstream=v{v}\n"),
        "{what}: wrong upstream"
    );
    assert_eq!(
        resp.header(UPSTREAM_HEADER).as_deref(),
        Some(&*format!("v{v}")),
        "{what}"
    );
    assert_eq!(
        resp.header(SAW_VERSION_HEADER).as_deref(),
        Some(v),
        "{what}: header the upstream saw"
    );
    assert_eq!(
        resp.header(SERVED_BY).as_deref(),
        Some(&*format!("{MODEL}/{v}")),
        "{what}: served-by"
    );
}

/// The version a response came from, after checking all three views agree.
fn served_version(resp: &Resp, what: &str) -> String {
    let v = resp.header(SAW_VERSION_HEADER).unwrap_or_else(|| {
        panic!(
            "{what}: no upstream answered: {} {}",
            resp.status,
            resp.text()
        )
    });
    assert_served_by(resp, &v, what);
    v
}

/// Reproducible pseudo-random keys (splitmix64); the seed is printed so a
/// failing run can be replayed with `E2E_SEED`.
fn random_keys(n: usize) -> Vec<String> {
    let seed = std::env::var("E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(e2e::now_ms);
    eprintln!("random keys: E2E_SEED={seed}");
    let mut s: u64 = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            format!("user-{:016x}", filter_core::hash::fmix64(s))
        })
        .collect()
}

fn keyed(key: &str) -> Req {
    Req::post(INFER, "{}").header(KEY_HEADER, key)
}

fn share(counts: &HashMap<String, usize>, v: &str, total: usize) -> f64 {
    100.0 * *counts.get(v).unwrap_or(&0) as f64 / total as f64
}

async fn delta(before: &Stats, after: &Stats, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_90_10_over_20000_keys() {
    let _bin = require_envoy!("split_90_10_over_20000_keys");
    let rig = Rig::start(&config(&[("1", 90.0), ("2", 10.0)])).await;
    let keys = random_keys(20_000);
    let resps = rig.send_all(keys.iter().map(|k| keyed(k)).collect()).await;

    let mut got: HashMap<String, usize> = HashMap::new();
    for (key, resp) in keys.iter().zip(&resps) {
        let v = served_version(resp, key);
        assert_eq!(
            v,
            rig.predict(key.as_bytes()),
            "key {key}: filter_core picks another version"
        );
        *got.entry(v).or_default() += 1;
    }
    let canary = share(&got, "2", keys.len());
    assert!(
        (8.5..=11.5).contains(&canary),
        "canary share {canary:.2}% for weight 10%: {got:?}"
    );
    let counts = rig.counts();
    assert_eq!(counts["1"], got["1"], "upstream v1 count");
    assert_eq!(counts["2"], got["2"], "upstream v2 count");
    assert_eq!(counts["default"], 0, "nothing may take the default route");
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_70_20_10_over_20000_keys() {
    let _bin = require_envoy!("split_70_20_10_over_20000_keys");
    let rig = Rig::start(&config(&[("1", 70.0), ("2", 20.0), ("3", 10.0)])).await;
    let keys = random_keys(20_000);
    let resps = rig.send_all(keys.iter().map(|k| keyed(k)).collect()).await;

    let mut got: HashMap<String, usize> = HashMap::new();
    for (key, resp) in keys.iter().zip(&resps) {
        let v = served_version(resp, key);
        assert_eq!(v, rig.predict(key.as_bytes()), "key {key}");
        *got.entry(v).or_default() += 1;
    }
    for (v, want) in [("1", 70.0), ("2", 20.0), ("3", 10.0)] {
        let s = share(&got, v, keys.len());
        assert!(
            (s - want).abs() <= 1.5,
            "version {v}: {s:.2}% for weight {want}%: {got:?}"
        );
        assert_eq!(rig.counts()[v], got[v], "upstream v{v} count");
    }
    assert_eq!(rig.counts()["default"], 0);
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_requests_split_randomly_by_weight() {
    let _bin = require_envoy!("unkeyed_requests_split_randomly_by_weight");
    let rig = Rig::start(&config(&[("1", 80.0), ("2", 20.0)])).await;
    let n = 10_000;
    let before = rig.envoy.stats().await;
    let resps = rig
        .send_all((0..n).map(|_| Req::post(INFER, "{}")).collect())
        .await;
    let mut got: HashMap<String, usize> = HashMap::new();
    for (i, r) in resps.iter().enumerate() {
        *got.entry(served_version(r, &format!("unkeyed #{i}")))
            .or_default() += 1;
    }
    let canary = share(&got, "2", n);
    // σ = 0.4 points at n = 10 000; ±2 points is 5σ.
    assert!(
        (18.0..=22.0).contains(&canary),
        "canary share {canary:.2}% for 20%: {got:?}"
    );
    let after = rig.envoy.stats().await;
    for v in ["1", "2"] {
        let d = delta(
            &before,
            &after,
            REQUESTS,
            &[("model", MODEL), ("version", v), ("decision", "unkeyed")],
        )
        .await;
        assert_eq!(d, got[v] as f64, "unkeyed counter of version {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_sticky_and_every_envoy_agrees() {
    let _bin = require_envoy!("keys_are_sticky_and_every_envoy_agrees");
    let cfg = config(&[("1", 70.0), ("2", 30.0)]);
    let rig = Rig::start(&cfg).await;
    let keys = random_keys(2_000);
    // Five rounds, interleaved, so a key's requests land on different
    // connections and both workers (two Wasm VMs).
    let reqs: Vec<Req> = (0..5).flat_map(|_| keys.iter().map(|k| keyed(k))).collect();
    let resps = rig.send_all(reqs).await;
    let mut first: HashMap<&str, String> = HashMap::new();
    for (i, resp) in resps.iter().enumerate() {
        let key = keys[i % keys.len()].as_str();
        let v = served_version(resp, key);
        match first.get(key) {
            None => {
                assert_eq!(v, rig.predict(key.as_bytes()), "key {key}");
                first.insert(key, v);
            }
            Some(prev) => assert_eq!(&v, prev, "key {key} moved between versions"),
        }
    }
    let canaries = first.values().filter(|v| *v == "2").count();
    assert!(
        (500..=700).contains(&canaries),
        "{canaries}/2000 keys on the 30% canary"
    );

    let other = Rig::start(&cfg).await;
    let resps = other
        .send_all(keys.iter().map(|k| keyed(k)).collect())
        .await;
    for (key, resp) in keys.iter().zip(&resps) {
        let v = served_version(resp, key);
        assert_eq!(
            &v,
            &first[key.as_str()],
            "key {key}: the second Envoy disagrees"
        );
    }
    assert_vm_healthy(&resps, &other.envoy.log());
    assert_vm_healthy(&[], &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_canary_weight_never_moves_a_key_back_to_stable() {
    let _bin = require_envoy!("raising_the_canary_weight_never_moves_a_key_back_to_stable");
    let keys = random_keys(2_000);
    let mut previous: HashSet<String> = HashSet::new();
    for pct in [1.0, 5.0, 25.0, 50.0] {
        let rig = Rig::start(&config(&[("1", 100.0 - pct), ("2", pct)])).await;
        let resps = rig.send_all(keys.iter().map(|k| keyed(k)).collect()).await;
        let mut canary: HashSet<String> = HashSet::new();
        for (key, resp) in keys.iter().zip(&resps) {
            let v = served_version(resp, &format!("{key} at {pct}%"));
            assert_eq!(v, rig.predict(key.as_bytes()), "key {key} at {pct}%");
            if v == "2" {
                canary.insert(key.clone());
            }
        }
        let back: Vec<&String> = previous.difference(&canary).collect();
        assert!(
            back.is_empty(),
            "at {pct}%, {} keys moved from canary back to stable: {:?}",
            back.len(),
            &back[..back.len().min(5)]
        );
        let s = 100.0 * canary.len() as f64 / keys.len() as f64;
        // σ ≤ 1.12 points at n = 2 000; ±4 points is > 3.5σ.
        assert!(
            (s - pct).abs() <= 4.0,
            "canary share {s:.2}% at weight {pct}%"
        );
        assert!(canary.len() >= previous.len());
        previous = canary;
    }
}

/// Keys filter_core sends to version 1 (stable) under `cfg`.
fn stable_keys(cfg: &CanaryConfig, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("stable-{i}"))
        .filter(|k| predict(cfg, k.as_bytes(), 0) == "1")
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_stage_concerns_reaches_the_upstream_as_without_the_module() {
    // A model no split lists: the module decides nothing, so the upstream
    // sees the same request line, headers and body as through an Envoy
    // without the module (x-request-id aside: Envoy makes a new one).
    let _bin =
        require_envoy!("a_request_no_stage_concerns_reaches_the_upstream_as_without_the_module");
    let rig = Rig::start(&config(&[("1", 50.0), ("2", 50.0)])).await;
    let plain_up = Upstream::start("default").await;
    let plain = Envoy::start(
        &Bootstrap::new()
            .cluster(&plain_up.name, plain_up.addr)
            .default_route(&plain_up.name),
    )
    .await;
    let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1.5]}]}"#.to_vec();
    let req = || {
        Req::post("/v2/models/another-model/infer?x=1", body.clone())
            .header(KEY_HEADER, "u1")
            .header("cookie", "a=b; session=s1")
            .header("x-custom", b"\xff\xfe opaque".as_slice())
    };
    let through_module = rig.envoy.client().send(req()).await;
    let without = plain.client().send(req()).await;
    assert_eq!(through_module.status, 200);
    assert_eq!(without.status, 200);
    assert_eq!(through_module.header(SERVED_BY), None);
    let a = rig
        .default
        .seen()
        .pop()
        .expect("the module's default upstream saw it");
    let b = plain_up.seen().pop().expect("the plain upstream saw it");
    assert_eq!(
        (a.method.as_str(), a.path.as_str()),
        (b.method.as_str(), b.path.as_str())
    );
    assert_eq!((a.body_len, a.body_digest), (b.body_len, b.body_digest));
    let headers = |s: &e2e::upstream::Seen| -> Vec<(String, Vec<u8>)> {
        let mut h: Vec<(String, Vec<u8>)> = s
            .headers
            .iter()
            .filter(|(n, _)| n.as_str() != "x-request-id")
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        h.sort();
        h
    };
    assert_eq!(
        headers(&a),
        headers(&b),
        "the module changed a request it does not concern"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_other_hosts_pass_through_untouched() {
    // `hosts` scopes the module by :authority: another service's request
    // is not split, and reaches its upstream byte-identical, even with
    // client x-infermesh-* headers (its routes are not the module's).
    let _bin = require_envoy!("requests_to_other_hosts_pass_through_untouched");
    let canary = config(&[("1", 0.0), ("2", 100.0)]);
    let rig = Rig::start_with(&canary, |b| b).await;
    let scoped = json!({"hosts": ["digits-mlp.models.svc.cluster.local"], "canary": canary});
    let rig_scoped = Rig::start_module(&canary, &scoped).await;
    let client = rig_scoped.envoy.client();
    let body = br#"{"inputs":[]}"#.to_vec();
    let other = client
        .send(
            Req::post(INFER, body.clone())
                .header("host", "other-model.models.svc.cluster.local:8000")
                .header(KEY_HEADER, "u1")
                .header("x-infermesh-debug", "1"),
        )
        .await;
    assert_eq!(other.header(UPSTREAM_HEADER).as_deref(), Some("default"));
    assert_eq!(other.header(SERVED_BY), None);
    let seen = rig_scoped.default.seen();
    let last = seen.last().expect("the default upstream saw it");
    assert_eq!(last.header("x-infermesh-debug").as_deref(), Some("1"));
    assert_eq!(last.header(VERSION), None);
    assert_eq!(last.body_digest, e2e::upstream::digest(&body));

    let ours = client
        .send(
            Req::post(INFER, body.clone())
                .header("host", "digits-mlp.models.svc.cluster.local:8000")
                .header(KEY_HEADER, "u1")
                .header("x-infermesh-debug", "1"),
        )
        .await;
    assert_eq!(
        ours.header(UPSTREAM_HEADER).as_deref(),
        Some("v2"),
        "split 0/100"
    );
    let seen = rig_scoped.versions["2"].seen();
    let last = seen.last().expect("version 2 saw it");
    assert_eq!(last.header("x-infermesh-debug"), None, "stripped in scope");
    // Without `hosts`, the same other-host request is the module's.
    let unscoped = rig
        .envoy
        .client()
        .send(Req::post(INFER, body).header("host", "other-model.models.svc.cluster.local"))
        .await;
    assert_eq!(unscoped.header(UPSTREAM_HEADER).as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_infermesh_headers_are_removed_and_ignored() {
    let _bin = require_envoy!("downstream_infermesh_headers_are_removed_and_ignored");
    let rig = Rig::start(&config(&[("1", 50.0), ("2", 50.0)])).await;
    let keys = stable_keys(&rig.cfg, 200);
    let before = rig.envoy.stats().await;
    let reqs: Vec<Req> = keys
        .iter()
        .map(|k| {
            keyed(k)
                .header(VERSION, "2")
                .header("x-infermesh-model", "other-model")
                .header("x-infermesh-cloud", "eu-west")
                .header("X-InferMesh-Debug", "1")
        })
        .collect();
    let sent_owned = 4 * reqs.len();
    let resps = rig.send_all(reqs).await;
    for (key, resp) in keys.iter().zip(&resps) {
        assert_served_by(resp, "1", key);
    }
    for seen in rig.versions["1"].seen() {
        let owned: Vec<&str> = seen
            .headers
            .keys()
            .map(|n| n.as_str())
            .filter(|n| n.starts_with("x-infermesh-"))
            .collect();
        assert_eq!(
            owned,
            vec![VERSION],
            "the upstream saw client x-infermesh-* headers"
        );
        assert_eq!(seen.header(VERSION).as_deref(), Some("1"));
    }
    assert_eq!(
        rig.versions["2"].count(),
        0,
        "a client header reached the canary"
    );
    let after = rig.envoy.stats().await;
    assert_eq!(
        delta(&before, &after, STRIPPED, &[]).await,
        sent_owned as f64,
        "stripped headers counter"
    );
}

/// A client `x-infermesh-version` must not route on its own either, even
/// when the filter takes no split decision (other models, a pinned version
/// the split does not list): Envoy picked the route from the client's
/// headers before the filter ran, so removing the header is not enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_version_header_never_routes_without_a_split_decision() {
    let _bin = require_envoy!("client_version_header_never_routes_without_a_split_decision");
    let rig = Rig::start(&config(&[("1", 90.0), ("2", 10.0)])).await;
    let cases = [
        "/v2/models/other-model/infer",
        "/v2/models/digits-mlp/versions/9/infer",
        "/healthz",
    ];
    for path in cases {
        let r = rig
            .envoy
            .client()
            .send(Req::post(path, "{}").header(VERSION, "2"))
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(
            r.header(SAW_VERSION_HEADER).as_deref(),
            Some("-"),
            "{path}: the upstream saw the client header"
        );
        assert_eq!(
            r.text(),
            "upstream=default\n",
            "{path}: a removed client header still chose the route"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_pins_listed_versions_and_counts_unlisted_ones() {
    let _bin = require_envoy!("override_header_pins_listed_versions_and_counts_unlisted_ones");
    let rig = Rig::start(&config(&[("1", 90.0), ("2", 10.0)])).await;
    let keys = stable_keys(&rig.cfg, 100);
    let before = rig.envoy.stats().await;

    let resps = rig
        .send_all(
            keys.iter()
                .map(|k| keyed(k).header(OVERRIDE, "2"))
                .collect(),
        )
        .await;
    for (key, r) in keys.iter().zip(&resps) {
        assert_served_by(r, "2", &format!("{key} with override 2"));
    }
    let resps = rig
        .send_all(
            keys.iter()
                .map(|k| keyed(k).header(OVERRIDE, "7"))
                .collect(),
        )
        .await;
    for (key, r) in keys.iter().zip(&resps) {
        assert_served_by(r, "1", &format!("{key} with unlisted override 7"));
    }

    let after = rig.envoy.stats().await;
    let n = keys.len() as f64;
    let d = |name, labels| delta(&before, &after, name, labels);
    assert_eq!(
        d(REQUESTS, &[("version", "2"), ("decision", "override")]).await,
        n
    );
    assert_eq!(
        d(REJECTED, &[("model", MODEL)]).await,
        n,
        "rejected overrides"
    );
    assert_eq!(
        d(REQUESTS, &[("version", "1"), ("decision", "keyed")]).await,
        n,
        "rejected overrides split as usual"
    );
}

/// Routing follows the filter's header although the route was computed
/// before it ran: by the connection manager (which picks the route before
/// the first HTTP filter), by CORS and fault, and by a Lua filter that reads
/// the route's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_the_header_after_the_route_was_computed() {
    let _bin = require_envoy!("routing_follows_the_header_after_the_route_was_computed");
    let lua = route_seen_ahead_filter();
    let rig = Rig::start_with(&config(&[("1", 90.0), ("2", 10.0)]), |b| {
        b.filter_ahead(lua)
    })
    .await;
    let keys = stable_keys(&rig.cfg, 50);
    let reqs: Vec<Req> = keys
        .iter()
        .map(|k| keyed(k).header(OVERRIDE, "2"))
        .collect();
    for (key, r) in keys.iter().zip(&rig.send_all(reqs).await) {
        assert_served_by(r, "2", key);
        assert_eq!(
            r.header("x-route-seen-ahead").as_deref(),
            Some("default"),
            "the Lua filter ahead saw another route"
        );
    }
}

/// The negative control: the same header set by a filter that does not
/// clear the route cache (`header_mutation`, after CORS) leaves the route
/// alone, which shows the route really was cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_set_without_clearing_the_route_cache_does_not_route() {
    let _bin = require_envoy!("a_header_set_without_clearing_the_route_cache_does_not_route");
    let canary = Upstream::start("v2").await;
    let default = Upstream::start("default").await;
    let base = Bootstrap::new()
        .version_subsets(&[("2", &canary)], &default)
        .filter_ahead(set_request_header_filter(VERSION, "2"));
    let envoy = Envoy::start(&base).await;
    let r = envoy.client().send(Req::post(INFER, "{}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header(SAW_VERSION_HEADER).as_deref(),
        Some("2"),
        "the header was set"
    );
    assert_eq!(
        r.text(),
        "upstream=default\n",
        "the route was cached before the header was set"
    );
    drop(envoy);

    // Positive control: clearing the cache after the same header routes.
    let clearing = base.filter_ahead(lua_filter(
        "function envoy_on_request(h)\n  h:clearRouteCache()\nend\n",
    ));
    let envoy = Envoy::start(&clearing).await;
    let r = envoy.client().send(Req::post(INFER, "{}")).await;
    assert_eq!(
        r.text(),
        "upstream=v2\n",
        "after clearing the cache the header routes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugin_config_is_refused_naming_the_field() {
    let _bin = require_envoy!("bad_plugin_config_is_refused_naming_the_field");
    // Weights sum to 99%; the version names are otherwise routable.
    let bad = json!({
        "splits": [{"model": MODEL, "versions": [{"name": "1", "weight": 89}, {"name": "2", "weight": 10}]}],
        "sticky_key": [{"header": KEY_HEADER}],
    });
    let err = filter_core::config::canary::parse(bad.to_string().as_bytes())
        .expect_err("the config is bad");
    assert_eq!(err.path, "splits[0].versions");

    for policy in [FailurePolicy::FailClosed, FailurePolicy::FailOpen] {
        let stable = Upstream::start("v1").await;
        let canary = Upstream::start("v2").await;
        let default = Upstream::start("default").await;
        let wasm = e2e::wasm::module();
        let bootstrap = Bootstrap::new()
            .version_subsets(&[("1", &stable), ("2", &canary)], &default)
            .wasm(
                WasmFilter::new("infermesh", &wasm, json!({ "canary": bad }).to_string())
                    .failure_policy(policy),
            );
        let want = "infermesh: invalid pluginConfig: canary.splits[0].versions: weights sum to 99%";
        match Envoy::try_start(&bootstrap).await {
            Err(failure) => {
                assert!(
                    failure.log.contains(want),
                    "{policy:?}: Envoy's log lacks {want:?}:\n{}",
                    failure.log
                );
                // A static bootstrap: Envoy 1.40 refuses the whole config
                // and exits, whatever the failure policy.
                let exited = failure.exited.unwrap_or_else(|| {
                    panic!(
                        "{policy:?}: Envoy neither served nor exited: {}",
                        failure.reason
                    )
                });
                assert!(!exited.success(), "{policy:?}: Envoy exited with {exited}");
                assert!(
                    failure
                        .log
                        .contains("Unable to create Wasm plugin infermesh"),
                    "{policy:?}: Envoy's log does not say it refused the plugin"
                );
                assert_eq!((stable.count(), canary.count(), default.count()), (0, 0, 0));
            }
            Ok(envoy) => {
                let reqs: Vec<Req> = random_keys(200).iter().map(|k| keyed(k)).collect();
                let resps = envoy.client().send_all(reqs).await;
                let statuses: BTreeMap<u16, usize> =
                    resps.iter().fold(BTreeMap::new(), |mut m, r| {
                        *m.entry(r.status.as_u16()).or_default() += 1;
                        m
                    });
                let log = envoy.log();
                assert!(log.contains(want), "{policy:?}: Envoy's log lacks {want:?}");
                panic!(
                    "{policy:?}: Envoy started with a refused pluginConfig; statuses {statuses:?}, \
                     upstreams v1={} v2={} default={}",
                    stable.count(),
                    canary.count(),
                    default.count()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_header_bytes_are_answered_and_the_vm_survives() {
    let _bin = require_envoy!("hostile_header_bytes_are_answered_and_the_vm_survives");
    let rig = Rig::start_with(&config(&[("1", 50.0), ("2", 50.0)]), |b| {
        b.max_request_headers(300)
    })
    .await;
    let big_key = "k".repeat(8 * 1024);
    let mut many = keyed("many-headers");
    for i in 0..200 {
        many = many.header(&format!("x-extra-{i}"), format!("value-{i}"));
    }
    // (request, the sticky key the filter should use; None = unkeyed)
    let cases: Vec<(Req, Option<Vec<u8>>)> = vec![
        (
            Req::post(INFER, "{}").header(KEY_HEADER, b"\xff\xfe\x80user"),
            Some(b"\xff\xfe\x80user".to_vec()),
        ),
        (
            keyed("latin1").header(OVERRIDE, b"\xe9\xff"),
            Some(b"latin1".to_vec()),
        ),
        (
            Req::post(INFER, "{}").header("cookie", b"theme=dark; uid=\xc3\x28\xa0\xa1; x=1"),
            Some(b"\xc3\x28\xa0\xa1".to_vec()),
        ),
        (
            Req::post(INFER, "{}").header("cookie", b"\xff\xff=\xff; ;;==; uid"),
            None,
        ),
        (many, Some(b"many-headers".to_vec())),
        (keyed(&big_key), Some(big_key.as_bytes().to_vec())),
        (Req::post(INFER, "{}"), None),
        (Req::post(INFER, "{}").header(KEY_HEADER, ""), None),
        (
            Req::post("/v2/models/%ff%fe/infer", "{}").header(KEY_HEADER, b"\xff"),
            None,
        ),
    ];
    let n = cases.len();
    let (reqs, keys): (Vec<Req>, Vec<Option<Vec<u8>>>) = cases.into_iter().unzip();
    // Each case several times, so both workers' VMs see each.
    let reqs: Vec<Req> = (0..4).flat_map(|_| reqs.clone()).collect();
    let resps = rig.send_all(reqs).await;
    for (i, r) in resps.iter().enumerate() {
        let what = format!("case {} (round {})", i % n, i / n);
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        match &keys[i % n] {
            Some(key) => assert_served_by(r, &rig.predict(key), &what),
            None if i % n == n - 1 => {
                assert_eq!(r.text(), "upstream=default\n", "{what}: not an OIP path")
            }
            None => {
                served_version(r, &what);
            }
        }
    }
    // The VMs still split normally afterwards.
    let keys = random_keys(200);
    let after = rig.send_all(keys.iter().map(|k| keyed(k)).collect()).await;
    for (k, r) in keys.iter().zip(&after) {
        assert_served_by(r, &rig.predict(k.as_bytes()), k);
    }
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_decision_exactly() {
    let _bin = require_envoy!("metrics_count_every_decision_exactly");
    let rig = Rig::start(&config(&[("1", 90.0), ("2", 10.0)])).await;
    let before = rig.envoy.stats().await;

    let keys = random_keys(300);
    let mut reqs: Vec<Req> = keys.iter().map(|k| keyed(k)).collect();
    reqs.extend((0..40).map(|_| Req::post(INFER, "{}")));
    reqs.extend((0..30).map(|i| keyed(&format!("o{i}")).header(OVERRIDE, "2")));
    reqs.extend((0..20).map(|_| Req::post("/v2/models/digits-mlp/versions/1/infer", "{}")));
    reqs.extend((0..10).map(|_| Req::post("/v2/models/digits-mlp/versions/2/ready", "")));
    reqs.extend((0..7).map(|_| Req::get("/v2/models/unknown/ready")));
    reqs.extend((0..5).map(|i| keyed(&format!("r{i}")).header(OVERRIDE, "nope")));
    let resps = rig.send_all(reqs).await;

    // Tally what the upstreams actually served, per decision class.
    let mut served: HashMap<(&str, String), usize> = HashMap::new();
    let classes = [
        (300, "keyed"),
        (40, "unkeyed"),
        (30, "override"),
        (30, "pinned"),
        (7, "unmatched"),
        (5, "keyed"),
    ];
    let mut i = 0;
    for (n, class) in classes {
        for r in &resps[i..i + n] {
            assert_eq!(r.status, 200, "{class}: {}", r.text());
            let v = r.header(SAW_VERSION_HEADER).unwrap_or_default();
            *served.entry((class, v)).or_default() += 1;
        }
        i += n;
    }
    let after = rig.envoy.stats().await;
    for v in ["1", "2"] {
        for decision in ["keyed", "unkeyed", "override", "pinned"] {
            let got = delta(
                &before,
                &after,
                REQUESTS,
                &[("model", MODEL), ("version", v), ("decision", decision)],
            )
            .await;
            let want = served.get(&(decision, v.to_owned())).copied().unwrap_or(0);
            assert_eq!(
                got,
                want as f64,
                "{REQUESTS}{{version={v},decision={decision}}}; {:?}",
                after.names_like(REQUESTS)
            );
        }
    }
    assert_eq!(served.get(&("pinned", "1".into())), Some(&20));
    assert_eq!(served.get(&("pinned", "2".into())), Some(&10));
    assert_eq!(served.get(&("unmatched", "-".into())), Some(&7));
    assert_eq!(delta(&before, &after, UNMATCHED, &[]).await, 7.0);
    assert_eq!(
        delta(&before, &after, REJECTED, &[("model", MODEL)]).await,
        5.0
    );
    assert_eq!(
        after.get(WEIGHT, &[("model", MODEL), ("version", "1")]),
        Some(9000.0),
        "{:?}",
        after.names_like(WEIGHT)
    );
    assert_eq!(
        after.get(WEIGHT, &[("model", MODEL), ("version", "2")]),
        Some(1000.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_steps_set_the_weight_by_wall_clock() {
    let _bin = require_envoy!("scheduled_steps_set_the_weight_by_wall_clock");
    let now_s = e2e::now_ms() / 1000;
    let scheduled = |start_s: u64| {
        let mut c = config(&[("1", 90.0), ("2", 10.0)]);
        c["splits"][0]["schedule"] = json!({
            "start": e2e::rfc3339_utc(start_s),
            "steps": [
                {"after_s": 0, "weights": {"2": 5}},
                {"after_s": 1800, "weights": {"2": 40}},
                {"after_s": 7200, "weights": {"2": 50}},
            ],
        });
        c
    };
    let keys = random_keys(4_000);
    // Started an hour ago: step 1 (40%) is in force, step 2 is an hour out.
    // Not yet started: the base weights (10%).
    for (start_s, want_pct) in [(now_s - 3600, 40.0), (now_s + 3600, 10.0)] {
        let rig = Rig::start(&scheduled(start_s)).await;
        let resps = rig.send_all(keys.iter().map(|k| keyed(k)).collect()).await;
        let mut canary = 0;
        for (k, r) in keys.iter().zip(&resps) {
            let v = served_version(r, k);
            assert_eq!(v, rig.predict(k.as_bytes()), "key {k}");
            canary += usize::from(v == "2");
        }
        let s = 100.0 * canary as f64 / keys.len() as f64;
        // σ ≤ 0.78 points at n = 4 000; ±3 points is > 3.8σ.
        assert!(
            (s - want_pct).abs() <= 3.0,
            "start {start_s}: canary share {s:.2}%, want {want_pct}%"
        );
        let stats = rig.envoy.stats().await;
        assert_eq!(
            stats.get(WEIGHT, &[("model", MODEL), ("version", "2")]),
            Some(want_pct * 100.0),
            "weight gauge; {:?}",
            stats.names_like(WEIGHT)
        );
    }
}
