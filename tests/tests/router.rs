//! The module's router stage (`infermesh.wasm`) in a real Envoy on V8,
//! alone and ahead of the canary, routed like an Istio sidecar: a
//! VirtualService-style match on `x-infermesh-version` to one cluster per
//! version and a default route. Each case asserts what an outsider sees:
//! the status, which upstream answered, the headers and path it received,
//! and that the body reached it intact.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::upstream::{digest, Seen, UPSTREAM_HEADER};
use e2e::{assert_vm_healthy, require_envoy, Bootstrap, Envoy, Req, Resp, Upstream, WasmFilter};
use filter_core::canary::{self, Decision};
use filter_core::headers::{MODEL, SERVED_BY, VERSION};
use filter_core::stats::router::{BODY_FALLBACK as FALLBACK, REJECTED, REQUESTS};
use serde_json::json;

fn router_config() -> serde_json::Value {
    json!({
        "models": [
            {"name": "digits-mlp", "versions": ["1", "2"], "aliases": {"stable": "1", "canary": "2"}},
            {"name": "tiny-cnn", "versions": ["1", "2"]}
        ],
        "model_header": "x-model-name",
        "version_header": "x-model-version",
        "body": {"model_pointer": "/model", "version_pointer": "/parameters/model_version"},
        "rewrite_path": true
    })
}

fn canary_config() -> serde_json::Value {
    json!({
        "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 50}, {"name": "2", "weight": 50}]}],
        "sticky_key": [{"header": "x-user-id"}],
        "trust_downstream_headers": true
    })
}

struct Rig {
    envoy: Envoy,
    versions: BTreeMap<&'static str, Upstream>,
    default: Upstream,
}

impl Rig {
    async fn start(
        router: serde_json::Value,
        canary: Option<serde_json::Value>,
        allow_stop: bool,
    ) -> Rig {
        filter_core::config::router::parse(router.to_string().as_bytes())
            .expect("the test's router config");
        let mut versions = BTreeMap::new();
        for v in ["1", "2"] {
            versions.insert(v, Upstream::start(&format!("v{v}")).await);
        }
        let default = Upstream::start("default").await;
        let subsets: Vec<(&str, &Upstream)> = versions.iter().map(|(v, u)| (*v, u)).collect();
        let mut module = serde_json::json!({ "router": router });
        if let Some(c) = canary {
            module["canary"] = c.clone();
        }
        let b = Bootstrap::new().version_subsets(&subsets, &default).wasm(
            WasmFilter::new("infermesh", &e2e::wasm::module(), module.to_string())
                .allow_on_headers_stop_iteration(allow_stop),
        );
        let envoy = Envoy::start(&b).await;
        Rig {
            envoy,
            versions,
            default,
        }
    }

    /// The upstream that answered `resp`, and what it saw for it (the last
    /// request it received).
    fn seen_by(&self, resp: &Resp) -> Option<(String, Seen)> {
        let name = resp.header(UPSTREAM_HEADER)?;
        let up = if name == "default" {
            &self.default
        } else {
            self.versions.get(name.trim_start_matches('v'))?
        };
        up.seen().last().cloned().map(|s| (name, s))
    }

    fn total(&self) -> usize {
        self.default.count() + self.versions.values().map(Upstream::count).sum::<usize>()
    }
}

/// One row of the table: a request and what must be observed.
struct Case {
    name: &'static str,
    req: Req,
    status: u16,
    /// Upstream that answers (`None`: the filter answers itself).
    upstream: Option<&'static str>,
    /// `x-infermesh-version` the upstream receives (`None`: absent).
    version: Option<&'static str>,
    /// `x-infermesh-model` the upstream receives.
    model: Option<&'static str>,
    /// Path the upstream receives (`None`: unchanged).
    path: Option<&'static str>,
}

fn oip_body(version: &str) -> Vec<u8> {
    // A ~300-byte OIP v2 infer request naming the version in parameters.
    let data: Vec<f32> = (0..32).map(|i| i as f32 / 32.0).collect();
    serde_json::to_vec(&json!({
        "id": "req-42",
        "parameters": {"model_version": version},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": data}]
    }))
    .unwrap_or_default()
}

fn big_body(n: usize) -> Vec<u8> {
    // Valid JSON naming a model up front, padded to n bytes.
    let mut b = br#"{"model":"tiny-cnn","pad":""#.to_vec();
    b.resize(n.saturating_sub(2), b'x');
    b.extend_from_slice(br#""}"#);
    b
}

fn cases() -> Vec<Case> {
    let get = Req::get;
    let post = |p: &str, body: Vec<u8>| Req::post(p.to_owned(), body);
    let c = |name, req, status, upstream, version, model, path| Case {
        name,
        req,
        status,
        upstream,
        version,
        model,
        path,
    };
    vec![
        c(
            "path version",
            get("/v2/models/digits-mlp/versions/2/infer"),
            200,
            Some("v2"),
            Some("2"),
            Some("digits-mlp"),
            None,
        ),
        c(
            "path alias stable, rewritten",
            get("/v2/models/digits-mlp/versions/stable/infer"),
            200,
            Some("v1"),
            Some("1"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        c(
            "path alias canary, ready, query kept",
            get("/v2/models/digits-mlp/versions/canary/ready?x=1"),
            200,
            Some("v2"),
            Some("2"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/2/ready?x=1"),
        ),
        c(
            "implicit latest alias",
            get("/v2/models/tiny-cnn/versions/latest"),
            200,
            Some("v2"),
            Some("2"),
            Some("tiny-cnn"),
            Some("/v2/models/tiny-cnn/versions/2"),
        ),
        c(
            "path model, header version alias",
            get("/v2/models/digits-mlp/infer").header("x-model-version", "stable"),
            200,
            Some("v1"),
            Some("1"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        c(
            "path model beats header model",
            get("/v2/models/digits-mlp/infer").header("x-model-name", "tiny-cnn"),
            200,
            Some("default"),
            None,
            Some("digits-mlp"),
            None,
        ),
        c(
            "header model and version",
            get("/predict")
                .header("x-model-name", "tiny-cnn")
                .header("x-model-version", "2"),
            200,
            Some("v2"),
            Some("2"),
            Some("tiny-cnn"),
            Some("/predict"),
        ),
        c(
            "unpinned: model only",
            get("/v2/models/digits-mlp/infer"),
            200,
            Some("default"),
            None,
            Some("digits-mlp"),
            None,
        ),
        c(
            "300-byte OIP body names the version",
            post("/v2/models/digits-mlp/infer", oip_body("canary")),
            200,
            Some("v2"),
            Some("2"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/2/infer"),
        ),
        c(
            "body names model and version",
            post(
                "/predict",
                br#"{"model":"tiny-cnn","parameters":{"model_version":"1"}}"#.to_vec(),
            ),
            200,
            Some("v1"),
            Some("1"),
            Some("tiny-cnn"),
            None,
        ),
        c(
            "header version beats body version",
            post("/v2/models/digits-mlp/infer", oip_body("2")).header("x-model-version", "1"),
            200,
            Some("v1"),
            Some("1"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        c(
            "5 MiB body: not buffered, path still routes",
            post("/v2/models/digits-mlp/infer", big_body(5 << 20)),
            200,
            Some("default"),
            None,
            Some("digits-mlp"),
            None,
        ),
        c(
            "5 MiB body on a non-OIP path: passes untouched",
            post("/predict", big_body(5 << 20)),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "invalid JSON body falls back",
            post("/predict", br#"{"model":"tiny-cnn","#.to_vec()),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "body field of the wrong type falls back",
            post("/predict", br#"{"model":["tiny-cnn"]}"#.to_vec()),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "body version of the wrong type falls back",
            post(
                "/v2/models/digits-mlp/infer",
                br#"{"parameters":{"model_version":1.5}}"#.to_vec(),
            ),
            200,
            Some("default"),
            None,
            Some("digits-mlp"),
            None,
        ),
        c(
            "unknown model: 404 from the filter",
            get("/v2/models/nope/infer"),
            404,
            None,
            None,
            None,
            None,
        ),
        c(
            "unknown version: 404 from the filter",
            get("/v2/models/digits-mlp/versions/9/infer"),
            404,
            None,
            None,
            None,
            None,
        ),
        c(
            "unknown version in the body: 404",
            post("/v2/models/digits-mlp/infer", oip_body("zz")),
            404,
            None,
            None,
            None,
            None,
        ),
        c(
            "unknown model in a header: 404",
            get("/predict").header("x-model-name", "nope"),
            404,
            None,
            None,
            None,
            None,
        ),
        c(
            "percent-encoded path",
            get("/v2/models/digits%2Dmlp/versions/%32/infer"),
            200,
            Some("v2"),
            Some("2"),
            Some("digits-mlp"),
            Some("/v2/models/digits-mlp/versions/2/infer"),
        ),
        c(
            "encoded slash is not OIP",
            get("/v2/models/a%2Fb/infer"),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "odd bytes in the path are not OIP",
            get("/v2/models/%ff%fe/infer"),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "spoofed version header is replaced",
            get("/v2/models/digits-mlp/versions/1/infer")
                .header(VERSION, "2")
                .header(MODEL, "tiny-cnn"),
            200,
            Some("v1"),
            Some("1"),
            Some("digits-mlp"),
            None,
        ),
        c(
            "spoofed version header alone is dropped",
            get("/healthz").header(VERSION, "2"),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        c(
            "non-UTF-8 version header",
            get("/v2/models/digits-mlp/infer").header("x-model-version", b"\xff\xfe".as_slice()),
            404,
            None,
            None,
            None,
            None,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_table() {
    let _bin = require_envoy!("routing_table");
    let rig = Rig::start(router_config(), None, true).await;
    let client = rig.envoy.client();
    let before = rig.envoy.stats().await;
    let mut resps = Vec::new();
    for case in cases() {
        let sent_body = case.req.body.clone();
        let sent_path = case.req.path.clone();
        let total_before = rig.total();
        let resp = client.send(case.req).await;
        let what = case.name;
        assert_eq!(resp.status.as_u16(), case.status, "{what}: {}", resp.text());
        match case.upstream {
            None => {
                assert_eq!(
                    rig.total(),
                    total_before,
                    "{what}: the upstream must see nothing"
                );
                assert_eq!(
                    resp.header("content-type").as_deref(),
                    Some("application/json"),
                    "{what}"
                );
                let err: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
                assert!(
                    err["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{what}: OIP error body, got {}",
                    resp.text()
                );
            }
            Some(up) => {
                let Some((name, seen)) = rig.seen_by(&resp) else {
                    panic!(
                        "{what}: no upstream answered: {} {}",
                        resp.status,
                        resp.text()
                    );
                };
                assert_eq!(name, up, "{what}: wrong upstream");
                assert_eq!(
                    rig.total(),
                    total_before + 1,
                    "{what}: exactly one upstream request"
                );
                assert_eq!(
                    seen.header(VERSION).as_deref(),
                    case.version,
                    "{what}: version header"
                );
                assert_eq!(
                    seen.header(MODEL).as_deref(),
                    case.model,
                    "{what}: model header"
                );
                assert_eq!(seen.path, case.path.unwrap_or(&sent_path), "{what}: path");
                assert_eq!(seen.body_len, sent_body.len(), "{what}: body length");
                assert_eq!(seen.body_digest, digest(&sent_body), "{what}: body content");
                let served = case
                    .version
                    .map(|v| format!("{}/{v}", case.model.unwrap_or("?")));
                assert_eq!(resp.header(SERVED_BY), served, "{what}: served-by");
            }
        }
        resps.push(resp);
    }
    assert_vm_healthy(&resps, &rig.envoy.log());

    let after = rig.envoy.stats().await;
    let d =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(
        d(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "2"),
                ("source", "path")
            ]
        ),
        3.0
    );
    assert_eq!(
        d(
            REQUESTS,
            &[
                ("model", "tiny-cnn"),
                ("version", "2"),
                ("source", "header")
            ]
        ),
        1.0
    );
    assert_eq!(
        d(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "2"),
                ("source", "body")
            ]
        ),
        1.0
    );
    assert_eq!(
        d(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "unpinned"),
                ("source", "path")
            ]
        ),
        4.0
    );
    assert_eq!(d(REJECTED, &[("reason", "unknown_model")]), 2.0);
    assert_eq!(d(REJECTED, &[("reason", "unknown_version")]), 3.0);
    assert_eq!(d(FALLBACK, &[("reason", "too_large")]), 2.0);
    assert_eq!(d(FALLBACK, &[("reason", "invalid_json")]), 1.0);
    assert_eq!(d(FALLBACK, &[("reason", "wrong_type")]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_canary_together_pinned_never_split() {
    let _bin = require_envoy!("router_and_canary_together_pinned_never_split");
    let rig = Rig::start(router_config(), Some(canary_config()), true).await;
    let cfg = filter_core::config::canary::parse(canary_config().to_string().as_bytes())
        .expect("canary config");
    let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();

    // Pinned by path or alias: always that version, whatever the key.
    let pinned: Vec<Req> = keys
        .iter()
        .flat_map(|k| {
            [
                Req::get("/v2/models/digits-mlp/versions/1/infer").header("x-user-id", k),
                Req::get("/v2/models/digits-mlp/infer")
                    .header("x-user-id", k)
                    .header("x-model-version", "canary"),
            ]
        })
        .collect();
    let resps = rig.envoy.client().connections(8).send_all(pinned).await;
    for (i, r) in resps.iter().enumerate() {
        let want = if i % 2 == 0 { "v1" } else { "v2" };
        assert_eq!(
            r.header(UPSTREAM_HEADER).as_deref(),
            Some(want),
            "pinned #{i}: {}",
            r.text()
        );
    }
    assert_vm_healthy(&resps, &rig.envoy.log());

    // Unpinned: split by the canary on the key, as filter_core predicts.
    let unpinned: Vec<Req> = keys
        .iter()
        .map(|k| Req::get("/v2/models/digits-mlp/infer").header("x-user-id", k))
        .collect();
    let resps = rig.envoy.client().connections(8).send_all(unpinned).await;
    let mut on_v2 = 0;
    for (k, r) in keys.iter().zip(&resps) {
        let req = canary::Request {
            path: b"/v2/models/digits-mlp/infer",
            trusted_model: Some(b"digits-mlp"),
            sticky_key: Some(k.as_bytes()),
            ..Default::default()
        };
        let Decision::Split { version, .. } = canary::decide(&cfg, &req, 0, 0) else {
            panic!("{k}: not split");
        };
        let want = format!("v{}", cfg.splits[0].versions[version]);
        assert_eq!(
            r.header(UPSTREAM_HEADER).as_deref(),
            Some(want.as_str()),
            "{k}"
        );
        on_v2 += usize::from(want == "v2");
    }
    assert!(
        (140..=260).contains(&on_v2),
        "50/50 split put {on_v2}/400 on v2"
    );
    // A client cannot bypass: a spoofed version on an unpinned request is
    // stripped by the router before the (trusting) canary runs.
    let k = keys.iter().find(|k| {
        let req = canary::Request {
            path: b"/v2/models/digits-mlp/infer",
            sticky_key: Some(k.as_bytes()),
            ..Default::default()
        };
        matches!(
            canary::decide(&cfg, &req, 0, 0),
            Decision::Split { version: 0, .. }
        )
    });
    let Some(k) = k else {
        panic!("no key lands on v1")
    };
    let r = rig
        .envoy
        .client()
        .send(
            Req::get("/v2/models/digits-mlp/infer")
                .header("x-user-id", k)
                .header(VERSION, "2"),
        )
        .await;
    assert_eq!(
        r.header(UPSTREAM_HEADER).as_deref(),
        Some("v1"),
        "spoofed header must not route"
    );
    assert_vm_healthy(&resps, &rig.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allow_on_headers_stop_iteration_every_request_is_answered() {
    // What a WasmPlugin deploys: no allow_on_headers_stop_iteration. Envoy
    // >= 1.35 then does not hand the filter the body while it holds the
    // headers. No request may hang: each waits at most body.max_wait_ms and
    // is routed on its path and headers, the filter says once which setting
    // is missing, and after a few such waits it stops waiting at all.
    let _bin = require_envoy!("without_allow_on_headers_stop_iteration_every_request_is_answered");
    let mut router = router_config();
    router["body"]["max_wait_ms"] = json!(150);
    let rig = Rig::start(router, None, false).await;
    let client = rig.envoy.client();
    let before = rig.envoy.stats().await;

    // The path alone decides these: no wait at all.
    let started = std::time::Instant::now();
    let unknown = client
        .send(Req::post(
            "/v2/models/no-such-model-zz/infer",
            b"{}".to_vec(),
        ))
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(
        unknown.text().contains("no-such-model-zz"),
        "{}",
        unknown.text()
    );
    let pinned = client
        .send(Req::post(
            "/v2/models/digits-mlp/versions/2/infer",
            b"{}".to_vec(),
        ))
        .await;
    assert_eq!(pinned.header(UPSTREAM_HEADER).as_deref(), Some("v2"));
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "decided from the path, yet took {:?}",
        started.elapsed()
    );

    // The version would come from the body: answered, routed without it.
    let body = br#"{"model":"tiny-cnn","parameters":{"model_version":"2"}}"#.to_vec();
    let mut times = Vec::new();
    for _ in 0..12 {
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client.send(Req::post("/v2/models/digits-mlp/infer", body.clone())),
        )
        .await
        .expect("a body-routed request hung without allow_on_headers_stop_iteration");
        times.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        // Not the body's version 2 of tiny-cnn: the path's model, unpinned,
        // on the default route; the body reached the upstream intact.
        assert_eq!(r.header(UPSTREAM_HEADER).as_deref(), Some("default"));
        let seen = rig.default.seen();
        let last = seen.last().expect("the upstream saw the request");
        assert_eq!(last.header(MODEL).as_deref(), Some("digits-mlp"));
        assert_eq!(last.body_digest, digest(&body));
    }
    // The first requests on each worker waited about max_wait_ms; after
    // three such waits a worker's VM knows this host withholds bodies and
    // stops waiting (Envoy runs two workers here, each with its own VM).
    assert!(
        times[0] >= Duration::from_millis(140),
        "first wait {:?}",
        times[0]
    );
    let waited = times
        .iter()
        .filter(|t| **t >= Duration::from_millis(140))
        .count();
    assert!(
        waited <= 2 * 3,
        "{waited} of 12 requests waited: the VMs did not learn ({times:?})"
    );
    let after = rig.envoy.stats().await;
    let fell_back = after.sum(FALLBACK, &[("reason", "not_delivered")])
        - before.sum(FALLBACK, &[("reason", "not_delivered")]);
    assert_eq!(fell_back, 12.0, "every body-routed request fell back");
    let log = rig.envoy.log();
    let named = log.matches("allow_on_headers_stop_iteration: true").count();
    assert!(
        (1..=2).contains(&named),
        "the missing setting is named once per VM, not per request ({named}): {}",
        e2e::envoy::tail(&log, 20)
    );
    assert_vm_healthy(&[unknown, pinned], &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_router_config_is_refused_naming_the_field() {
    let _bin = require_envoy!("bad_router_config_is_refused_naming_the_field");
    let bad = json!({"models": [{"name": "m", "versions": ["1"], "aliases": {"stable": "9"}}]});
    let up = Upstream::start("default").await;
    let b = Bootstrap::new()
        .cluster("default", up.addr)
        .default_route("default")
        .wasm(WasmFilter::new(
            "infermesh",
            &e2e::wasm::module(),
            json!({ "router": bad }).to_string(),
        ));
    let failure = match Envoy::try_start(&b).await {
        Ok(_) => panic!("Envoy started with an invalid model-router config"),
        Err(f) => f,
    };
    assert!(
        failure
            .log
            .contains("infermesh: invalid pluginConfig: router.models[0].aliases.stable:"),
        "{}",
        e2e::envoy::tail(&failure.log, 30)
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_never_kill_the_vm() {
    let _bin = require_envoy!("hostile_requests_never_kill_the_vm");
    let rig = Rig::start(router_config(), Some(canary_config()), true).await;
    let deep = format!(
        r#"{{"model":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let mut reqs = vec![
        Req::post("/predict", deep.into_bytes()),
        Req::post("/predict", vec![0xff; 4096]),
        Req::post("/predict", br#"{"model":"\ud800"}"#.to_vec()),
        Req::post("/predict", Vec::new()),
        Req::get("/v2/models/").header("x-model-name", vec![b'a'; 8192]),
        Req::get("/v2/models/digits-mlp/versions/").header("x-model-version", b"\x80".as_slice()),
        Req::get(format!("/v2/models/{}/infer", "m".repeat(4000))),
    ];
    let mut many = Req::get("/v2/models/digits-mlp/infer");
    for i in 0..90 {
        many = many.header(&format!("x-h{i}"), b"\xfe\xff".as_slice());
    }
    reqs.push(many);
    let mut resps = Vec::new();
    for r in reqs {
        let resp = rig.envoy.client().send(r).await;
        assert!(
            resp.status.as_u16() < 500,
            "{} {}",
            resp.status,
            resp.text()
        );
        resps.push(resp);
    }
    let ok = rig
        .envoy
        .client()
        .send(Req::get("/v2/models/digits-mlp/versions/2/infer"))
        .await;
    assert_eq!(ok.header(UPSTREAM_HEADER).as_deref(), Some("v2"));
    assert_vm_healthy(&resps, &rig.envoy.log());
}
