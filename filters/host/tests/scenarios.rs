//! The e2e canary, router and failover scenarios (tests/tests/*.rs)
//! through the wasmtime host: the same module file, configs, requests and
//! route tables, and the same outcomes the e2e tests assert through Envoy
//! (status, which upstream answered, what it received, response headers,
//! metric counts).

mod common;

use std::collections::BTreeMap;

use common::*;
use filter_core::canary::{self, Decision};
use filter_core::headers::{CLOUD, MODEL, SERVED_BY, VERSION};
use filter_core::stats;
use filter_host::{Exchange, Options, Reply, Request, Sent, Vm};
use serde_json::json;

/// Sends `req` through `vm` with the version route table.
fn via_versions(vm: &mut Vm, versions: &[&str], req: &Request) -> Exchange {
    let mut up = |s: &Sent| stub(&version_route(versions, s), s);
    vm.exchange(req, &mut up)
        .unwrap_or_else(|e| panic!("trap: {e:?}"))
}

fn served(ex: &Exchange) -> String {
    ex.header(UPSTREAM).unwrap_or_else(|| "-".into())
}

fn predict(cfg: &filter_core::config::canary::CanaryConfig, key: &[u8], trusted: bool) -> String {
    let req = canary::Request {
        path: INFER.as_bytes(),
        trusted_model: trusted.then_some(b"digits-mlp".as_slice()),
        sticky_key: Some(key),
        ..Default::default()
    };
    match canary::decide(cfg, &req, 0, 0) {
        Decision::Split { split, version, .. } => cfg.splits[split].versions[version].clone(),
        other => panic!("not split: {other:?}"),
    }
}

// ---- canary (tests/tests/canary.rs) -----------------------------------

#[test]
fn canary_keyed_split_matches_filter_core_and_counts_exactly() {
    let canary = canary_config(&[("1", 90.0), ("2", 10.0)]);
    let cfg = filter_core::config::canary::parse(canary.to_string().as_bytes()).expect("config");
    let mut vm = start(&json!({ "canary": canary }), Options::default());
    let mut on = BTreeMap::<String, usize>::new();
    for i in 0..2000 {
        let key = format!("user-{i:05}");
        let ex = via_versions(
            &mut vm,
            &["1", "2"],
            &Request::post(INFER, "{}").header("x-user-id", &key),
        );
        let want = predict(&cfg, key.as_bytes(), false);
        assert_eq!(ex.status, 200, "{key}");
        assert_eq!(served(&ex), format!("v{want}"), "{key}: wrong upstream");
        assert_eq!(ex.header(SAW_VERSION), Some(want.clone()), "{key}");
        assert_eq!(ex.header(SERVED_BY), Some(format!("digits-mlp/{want}")));
        assert_eq!(
            ex.route_cleared, 1,
            "{key}: the route cache is cleared once"
        );
        *on.entry(want).or_default() += 1;
    }
    let v2 = on.get("2").copied().unwrap_or(0);
    assert!((120..=280).contains(&v2), "90/10 put {v2}/2000 on v2");
    for (v, n) in &on {
        assert_eq!(
            vm.metric(
                stats::canary::REQUESTS,
                &[("version", v), ("decision", "keyed")]
            ),
            *n as i64
        );
    }
    assert_eq!(vm.metric(stats::canary::WEIGHT, &[("version", "1")]), 9000);
}

#[test]
fn canary_strips_client_headers_and_overrides_pin() {
    let canary = json!({
        "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 100}, {"name": "2", "weight": 0}]}],
        "sticky_key": [{"header": "x-user-id"}],
        "override_header": "x-canary-version"
    });
    let mut vm = start(&json!({ "canary": canary }), Options::default());
    // Client x-infermesh-* headers: removed and counted; they route nothing.
    let ex = via_versions(
        &mut vm,
        &["1", "2"],
        &Request::post(INFER, "{}")
            .header("x-user-id", "u1")
            .header(VERSION, "2")
            .header(MODEL, "other-model")
            .header(CLOUD, "eu-west")
            .header("x-infermesh-debug", "1"),
    );
    assert_eq!(served(&ex), "v1");
    let up = ex.upstream.expect("forwarded");
    let owned: Vec<&str> = up
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("x-infermesh-"))
        .collect();
    assert_eq!(owned, vec![VERSION]);
    assert_eq!(vm.metric(stats::canary::STRIPPED, &[]), 4);
    // A listed override pins; an unlisted one is counted and ignored.
    let ex = via_versions(
        &mut vm,
        &["1", "2"],
        &Request::post(INFER, "{}")
            .header("x-user-id", "u1")
            .header("x-canary-version", "2"),
    );
    assert_eq!(served(&ex), "v2");
    let ex = via_versions(
        &mut vm,
        &["1", "2"],
        &Request::post(INFER, "{}")
            .header("x-user-id", "u1")
            .header("x-canary-version", "7"),
    );
    assert_eq!(served(&ex), "v1");
    assert_eq!(vm.metric(stats::canary::OVERRIDE_REJECTED, &[]), 1);
    // A client version header on a request no split concerns: stripped,
    // and since the route was picked on it before the module ran, the
    // module's clear_route_cache is what keeps it from routing.
    for path in ["/v2/models/other-model/infer", "/healthz"] {
        let ex = via_versions(
            &mut vm,
            &["1", "2"],
            &Request::post(path, "{}").header(VERSION, "2"),
        );
        assert_eq!(ex.text(), "upstream=default\n", "{path}");
        assert_eq!(ex.header(SAW_VERSION).as_deref(), Some("-"), "{path}");
    }
}

#[test]
fn canary_leaves_other_hosts_untouched() {
    let canary = canary_config(&[("1", 0.0), ("2", 100.0)]);
    let mut vm = start(
        &json!({"hosts": ["digits-mlp.models.svc.cluster.local"], "canary": canary}),
        Options::default(),
    );
    let req = |host: &str| {
        let mut r = Request::post(INFER, "{\"inputs\":[]}")
            .header("x-user-id", "u1")
            .header("x-infermesh-debug", "1");
        r.headers.retain(|(n, _)| n != ":authority");
        r.header(":authority", host)
    };
    let other = via_versions(
        &mut vm,
        &["1", "2"],
        &req("other-model.models.svc.cluster.local:8000"),
    );
    assert_eq!(served(&other), "default");
    assert_eq!(other.header(SERVED_BY), None);
    let up = other.upstream.expect("forwarded");
    assert_eq!(up.header("x-infermesh-debug").as_deref(), Some("1"));
    assert_eq!(other.route_cleared, 0);
    let ours = via_versions(
        &mut vm,
        &["1", "2"],
        &req("digits-mlp.models.svc.cluster.local:8000"),
    );
    assert_eq!(served(&ours), "v2");
    assert_eq!(
        ours.upstream
            .expect("forwarded")
            .header("x-infermesh-debug"),
        None
    );
}

#[test]
fn hostile_header_bytes_are_answered_and_the_vm_survives() {
    let mut vm = start(
        &json!({ "canary": canary_config(&[("1", 50.0), ("2", 50.0)]) }),
        Options::default(),
    );
    let long = vec![b'k'; 64 << 10];
    let hostile = [
        Request::post(INFER, "{}").header("x-user-id", b"\xff\xfe\x80".as_slice()),
        Request::post(INFER, "{}").header("cookie", b"uid=\xc3\x28; a=\xff".as_slice()),
        Request::post(INFER, "{}").header("x-user-id", &long),
        Request::post(INFER, "{}")
            .header("x-user-id", "a")
            .header("x-user-id", "b"),
        Request::post(
            b"/v2/models/\xff/infer"
                .iter()
                .map(|&b| b as char)
                .collect::<String>()
                .as_str(),
            "{}",
        ),
    ];
    for (i, r) in hostile.iter().enumerate() {
        let ex = via_versions(&mut vm, &["1", "2"], r);
        assert_eq!(ex.status, 200, "#{i}");
    }
    assert!(vm.trapped().is_none());
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let p = plugin();
    for (cfg, field) in [
        (
            json!({"canary": {"splits": [{"model": "m", "versions": [{"name": "1", "weight": 50}, {"name": "2", "weight": 49}]}]}}),
            "canary.splits[0]",
        ),
        (
            json!({"router": {"models": [{"name": "m", "versions": ["1"], "aliases": {"stable": "9"}}]}}),
            "router.models[0].aliases",
        ),
        (json!({"failover": {"clouds": []}}), "failover.clouds"),
        (json!("not an object"), ""),
    ] {
        let err = p
            .start(cfg.to_string().as_bytes(), Options::default())
            .expect_err("a bad config must be refused");
        let text = format!("{err}");
        assert!(text.contains("invalid pluginConfig"), "{text}");
        assert!(text.contains(field), "{cfg}: {text}");
    }
}

// ---- router (tests/tests/router.rs) -----------------------------------

/// `(name, request, status, upstream, version, model, path)`, the e2e
/// routing table.
type Case = (
    &'static str,
    Request,
    u16,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

fn big_body(n: usize) -> Vec<u8> {
    let mut b = br#"{"model":"tiny-cnn","pad":""#.to_vec();
    b.resize(n.saturating_sub(2), b'x');
    b.extend_from_slice(br#""}"#);
    b
}

fn cases() -> Vec<Case> {
    let get = Request::get;
    let post = |p: &str, b: Vec<u8>| Request::post(p, b);
    let dm = Some("digits-mlp");
    vec![
        (
            "path version",
            get("/v2/models/digits-mlp/versions/2/infer"),
            200,
            Some("v2"),
            Some("2"),
            dm,
            None,
        ),
        (
            "path alias stable",
            get("/v2/models/digits-mlp/versions/stable/infer"),
            200,
            Some("v1"),
            Some("1"),
            dm,
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        (
            "path alias canary, query kept",
            get("/v2/models/digits-mlp/versions/canary/ready?x=1"),
            200,
            Some("v2"),
            Some("2"),
            dm,
            Some("/v2/models/digits-mlp/versions/2/ready?x=1"),
        ),
        (
            "implicit latest",
            get("/v2/models/tiny-cnn/versions/latest"),
            200,
            Some("v2"),
            Some("2"),
            Some("tiny-cnn"),
            Some("/v2/models/tiny-cnn/versions/2"),
        ),
        (
            "header version alias",
            get("/v2/models/digits-mlp/infer").header("x-model-version", "stable"),
            200,
            Some("v1"),
            Some("1"),
            dm,
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        (
            "path model beats header model",
            get("/v2/models/digits-mlp/infer").header("x-model-name", "tiny-cnn"),
            200,
            Some("default"),
            None,
            dm,
            None,
        ),
        (
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
        (
            "unpinned",
            get("/v2/models/digits-mlp/infer"),
            200,
            Some("default"),
            None,
            dm,
            None,
        ),
        (
            "OIP body names the version",
            post(INFER, oip_body("canary")),
            200,
            Some("v2"),
            Some("2"),
            dm,
            Some("/v2/models/digits-mlp/versions/2/infer"),
        ),
        (
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
        (
            "header version beats body",
            post(INFER, oip_body("2")).header("x-model-version", "1"),
            200,
            Some("v1"),
            Some("1"),
            dm,
            Some("/v2/models/digits-mlp/versions/1/infer"),
        ),
        (
            "5 MiB body, path routes",
            post(INFER, big_body(5 << 20)),
            200,
            Some("default"),
            None,
            dm,
            None,
        ),
        (
            "5 MiB body, non-OIP path",
            post("/predict", big_body(5 << 20)),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        (
            "invalid JSON falls back",
            post("/predict", br#"{"model":"tiny-cnn","#.to_vec()),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        (
            "wrong type falls back",
            post("/predict", br#"{"model":["tiny-cnn"]}"#.to_vec()),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        (
            "body version wrong type",
            post(INFER, br#"{"parameters":{"model_version":1.5}}"#.to_vec()),
            200,
            Some("default"),
            None,
            dm,
            None,
        ),
        (
            "unknown model",
            get("/v2/models/nope/infer"),
            404,
            None,
            None,
            None,
            None,
        ),
        (
            "unknown version",
            get("/v2/models/digits-mlp/versions/9/infer"),
            404,
            None,
            None,
            None,
            None,
        ),
        (
            "unknown version in the body",
            post(INFER, oip_body("zz")),
            404,
            None,
            None,
            None,
            None,
        ),
        (
            "unknown model in a header",
            get("/predict").header("x-model-name", "nope"),
            404,
            None,
            None,
            None,
            None,
        ),
        (
            "percent-encoded path",
            get("/v2/models/digits%2Dmlp/versions/%32/infer"),
            200,
            Some("v2"),
            Some("2"),
            dm,
            Some("/v2/models/digits-mlp/versions/2/infer"),
        ),
        (
            "encoded slash is not OIP",
            get("/v2/models/a%2Fb/infer"),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        (
            "spoofed version replaced",
            get("/v2/models/digits-mlp/versions/1/infer")
                .header(VERSION, "2")
                .header(MODEL, "tiny-cnn"),
            200,
            Some("v1"),
            Some("1"),
            dm,
            None,
        ),
        (
            "spoofed version alone dropped",
            get("/healthz").header(VERSION, "2"),
            200,
            Some("default"),
            None,
            None,
            None,
        ),
        (
            "non-UTF-8 version header",
            get(INFER).header("x-model-version", b"\xff\xfe".as_slice()),
            404,
            None,
            None,
            None,
            None,
        ),
    ]
}

#[test]
fn router_routing_table() {
    // With allow_on_headers_stop_iteration, as the e2e routing table runs.
    let opts = Options {
        allow_stop: true,
        ..Options::default()
    };
    let mut vm = start(&json!({ "router": router_config() }), opts);
    for (what, req, status, upstream, version, model, path) in cases() {
        let ex = via_versions(&mut vm, &["1", "2"], &req);
        assert_eq!(ex.status, status, "{what}: {}", ex.text());
        assert!(!ex.stalled, "{what}: stalled");
        match upstream {
            None => {
                assert!(
                    ex.upstream.is_none(),
                    "{what}: the upstream must see nothing"
                );
                assert!(ex.local_reply, "{what}");
                assert_eq!(
                    ex.header("content-type").as_deref(),
                    Some("application/json")
                );
                let err: serde_json::Value = serde_json::from_slice(&ex.body).unwrap_or_default();
                assert!(
                    err["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{what}: {}",
                    ex.text()
                );
            }
            Some(up) => {
                assert_eq!(served(&ex), up, "{what}: wrong upstream");
                let seen = ex.upstream.as_ref().expect("forwarded");
                assert_eq!(seen.header(VERSION).as_deref(), version, "{what}: version");
                assert_eq!(seen.header(MODEL).as_deref(), model, "{what}: model");
                let sent_path = filter_host::header_str(&req.headers, ":path").unwrap_or_default();
                assert_eq!(seen.path(), path.unwrap_or(&sent_path), "{what}: path");
                assert_eq!(seen.body, req.body(), "{what}: body intact");
                let want = version.map(|v| format!("{}/{v}", model.unwrap_or("?")));
                assert_eq!(ex.header(SERVED_BY), want, "{what}: served-by");
            }
        }
    }
    let mut m = |name, tags: &[(&str, &str)]| vm.metric(name, tags);
    use stats::router::{BODY_FALLBACK, REJECTED, REQUESTS};
    assert_eq!(
        m(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "2"),
                ("source", "path")
            ]
        ),
        3
    );
    assert_eq!(
        m(
            REQUESTS,
            &[
                ("model", "tiny-cnn"),
                ("version", "2"),
                ("source", "header")
            ]
        ),
        1
    );
    assert_eq!(
        m(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "2"),
                ("source", "body")
            ]
        ),
        1
    );
    assert_eq!(
        m(
            REQUESTS,
            &[
                ("model", "digits-mlp"),
                ("version", "unpinned"),
                ("source", "path")
            ]
        ),
        4
    );
    assert_eq!(m(REJECTED, &[("reason", "unknown_model")]), 2);
    assert_eq!(m(REJECTED, &[("reason", "unknown_version")]), 3);
    assert_eq!(m(BODY_FALLBACK, &[("reason", "too_large")]), 2);
    assert_eq!(m(BODY_FALLBACK, &[("reason", "invalid_json")]), 1);
    assert_eq!(m(BODY_FALLBACK, &[("reason", "wrong_type")]), 2);
}

#[test]
fn router_and_canary_pinned_never_split() {
    let canary = json!({
        "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 50}, {"name": "2", "weight": 50}]}],
        "sticky_key": [{"header": "x-user-id"}],
        "trust_downstream_headers": true
    });
    let cfg = filter_core::config::canary::parse(canary.to_string().as_bytes()).expect("config");
    let opts = Options {
        allow_stop: true,
        ..Options::default()
    };
    let mut vm = start(
        &json!({ "router": router_config(), "canary": canary }),
        opts,
    );
    let mut on_v2 = 0;
    for i in 0..400 {
        let k = format!("user-{i}");
        let pinned = via_versions(
            &mut vm,
            &["1", "2"],
            &Request::get("/v2/models/digits-mlp/versions/1/infer").header("x-user-id", &k),
        );
        assert_eq!(served(&pinned), "v1", "{k}");
        let alias = via_versions(
            &mut vm,
            &["1", "2"],
            &Request::get(INFER)
                .header("x-user-id", &k)
                .header("x-model-version", "canary"),
        );
        assert_eq!(served(&alias), "v2", "{k}");
        let split = via_versions(
            &mut vm,
            &["1", "2"],
            &Request::get(INFER).header("x-user-id", &k),
        );
        let want = predict(&cfg, k.as_bytes(), true);
        assert_eq!(served(&split), format!("v{want}"), "{k}");
        on_v2 += usize::from(want == "2");
    }
    assert!((140..=260).contains(&on_v2), "{on_v2}/400 on v2");
    // A spoofed version on an unpinned request is stripped before the
    // (trusting) canary runs.
    let k = (0..400)
        .map(|i| format!("user-{i}"))
        .find(|k| predict(&cfg, k.as_bytes(), true) == "1")
        .expect("a key on v1");
    let ex = via_versions(
        &mut vm,
        &["1", "2"],
        &Request::get(INFER)
            .header("x-user-id", &k)
            .header(VERSION, "2"),
    );
    assert_eq!(served(&ex), "v1", "spoofed header must not route");
}

#[test]
fn without_allow_stop_body_waits_run_out_and_the_vm_learns() {
    // What a WasmPlugin deploys: the headers' StopIteration acts as
    // StopAll, the body never reaches the waiting filter, each wait ends
    // on the root's tick after max_wait_ms, and after three the VM stops
    // waiting.
    let mut router = router_config();
    router["body"]["max_wait_ms"] = json!(150);
    let mut vm = start(&json!({ "router": router }), Options::default());
    let unknown = via_versions(
        &mut vm,
        &["1", "2"],
        &Request::post("/v2/models/no-such-model-zz/infer", "{}"),
    );
    assert_eq!(unknown.status, 404);
    assert!(unknown.text().contains("no-such-model-zz"));
    assert_eq!(unknown.elapsed_ms, 0, "decided on the path");
    let body = br#"{"model":"tiny-cnn","parameters":{"model_version":"2"}}"#.to_vec();
    let mut waited = Vec::new();
    for _ in 0..12 {
        let ex = via_versions(&mut vm, &["1", "2"], &Request::post(INFER, body.clone()));
        assert_eq!(ex.status, 200);
        assert_eq!(served(&ex), "default");
        let up = ex.upstream.as_ref().expect("forwarded");
        assert_eq!(up.header(MODEL).as_deref(), Some("digits-mlp"));
        assert_eq!(up.body, body, "the body reached the upstream intact");
        waited.push(ex.elapsed_ms);
    }
    // One VM: the first three wait (150 ms + a 10 ms tick at most), the
    // rest are routed at once.
    for (i, w) in waited.iter().enumerate() {
        if i < 3 {
            assert!((150..=170).contains(w), "wait #{i}: {w} ms ({waited:?})");
        } else {
            assert!(*w < 10, "wait #{i}: {w} ms ({waited:?})");
        }
    }
    assert_eq!(
        vm.metric(stats::router::BODY_FALLBACK, &[("reason", "not_delivered")]),
        12
    );
    let named = vm
        .logs()
        .iter()
        .filter(|(_, m)| m.contains("allow_on_headers_stop_iteration: true"))
        .count();
    assert_eq!(named, 1, "the missing setting is named once per VM");
}

// ---- failover (tests/tests/failover.rs) ---------------------------------

/// Clouds answering by `mode(cloud, sent)`.
fn clouds<'a>(
    mut mode: impl FnMut(&str, &Sent) -> Reply + 'a,
    default: &'a str,
) -> impl FnMut(&Sent) -> Reply + 'a {
    move |s: &Sent| {
        let cloud = cloud_of(s, default);
        // Probes: the cloud's readiness, answered as its mode says.
        mode(&cloud, s)
    }
}

fn failover_vm(cfg: serde_json::Value, allow_stop: bool) -> Vm {
    start(
        &json!({ "failover": cfg }),
        Options {
            allow_stop,
            ..Options::default()
        },
    )
}

#[test]
fn failover_picks_by_priority_and_says_who_served() {
    let mut vm = failover_vm(failover_config(), false);
    let mut up = clouds(stub, "aws");
    for (residency, want) in [(None, "aws"), (Some("eu"), "aws"), (Some("us"), "azure")] {
        let ex = vm
            .exchange(
                &infer(residency).header(CLOUD, "azure").header(VERSION, "9"),
                &mut up,
            )
            .expect("no trap");
        assert_eq!(ex.status, 200);
        assert_eq!(served(&ex), want);
        assert_eq!(ex.header(SERVED_BY), Some(format!("@{want}")));
        assert_eq!(ex.header("x-infermesh-failover"), None);
        let seen = ex.upstream.expect("forwarded");
        assert_eq!(seen.header(CLOUD).as_deref(), Some(want));
        assert_eq!(seen.header(VERSION), None);
        assert_eq!(seen.body, infer_body());
    }
    use stats::failover::REQUESTS;
    assert_eq!(
        vm.metric(REQUESTS, &[("cloud", "aws"), ("outcome", "served")]),
        2
    );
    assert_eq!(
        vm.metric(REQUESTS, &[("cloud", "azure"), ("outcome", "served")]),
        1
    );
}

#[test]
fn failover_replays_a_5xx_to_the_next_cloud() {
    for allow_stop in [false, true] {
        let mut vm = failover_vm(failover_config(), allow_stop);
        let mut up = clouds(
            |c, s| {
                if c == "aws" && s.path() == INFER {
                    stub_status(c, s, 500)
                } else {
                    stub(c, s)
                }
            },
            "aws",
        );
        let ex = vm
            .exchange(&infer(Some("eu")).header("x-request-id", "abc-1"), &mut up)
            .expect("no trap");
        assert_eq!(ex.status, 200, "allow_stop {allow_stop}: {}", ex.text());
        assert_eq!(served(&ex), "gcp");
        assert_eq!(ex.text(), "upstream=gcp\n", "the held 500 did not escape");
        assert_eq!(ex.header(SERVED_BY).as_deref(), Some("@gcp"));
        assert_eq!(
            ex.header("x-infermesh-failover").as_deref(),
            Some("replayed")
        );
        let replay = ex
            .callouts
            .iter()
            .find(|c| c.path() == INFER)
            .expect("a replay");
        assert_eq!(replay.cluster.as_deref(), Some("cloud-gcp"));
        assert_eq!(
            filter_host::header_str(&replay.headers, ":method").as_deref(),
            Some("POST")
        );
        assert_eq!(replay.body, infer_body());
        assert_eq!(
            replay.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(replay.header("x-request-id").as_deref(), Some("abc-1"));
        assert_eq!(replay.header(CLOUD).as_deref(), Some("gcp"));
        use stats::failover::{FAILURES, REQUESTS, TRIES};
        assert_eq!(
            vm.metric(REQUESTS, &[("cloud", "gcp"), ("outcome", "replayed")]),
            1
        );
        assert_eq!(
            vm.metric(TRIES, &[("cloud", "gcp"), ("decision", "replay")]),
            1
        );
        assert_eq!(
            vm.metric(FAILURES, &[("cloud", "aws"), ("failure", "status_5xx")]),
            1
        );
    }
}

#[test]
fn failover_a_dead_cloud_is_replayed_then_taken_out() {
    let mut vm = failover_vm(failover_config(), false);
    let mut up = clouds(
        |c, s| {
            if c == "aws" {
                Reply::Reset { latency_ms: 1 }
            } else {
                stub(c, s)
            }
        },
        "aws",
    );
    let mut failed_over = 0;
    let mut after = Vec::new();
    for _ in 0..20 {
        let ex = vm.exchange(&infer(None), &mut up).expect("no trap");
        assert_eq!(ex.status, 200);
        assert_eq!(served(&ex), "gcp");
        if ex.header("x-infermesh-failover").is_some() {
            failed_over += 1;
            assert!(after.is_empty(), "failed over again after going direct");
        } else {
            after.push(ex);
        }
    }
    // Three consecutive live failures take aws out.
    assert_eq!(failed_over, 3);
    assert!(after
        .iter()
        .all(|e| e.upstream.as_ref().and_then(|u| u.header(CLOUD)).as_deref() == Some("gcp")));
    use stats::failover::{FAILURES, TRANSITIONS};
    assert_eq!(
        vm.metric(TRANSITIONS, &[("cloud", "aws"), ("outcome", "unhealthy")]),
        1
    );
    assert_eq!(
        vm.metric(FAILURES, &[("cloud", "aws")]),
        vm.metric(
            FAILURES,
            &[("cloud", "aws"), ("failure", "connect_failure")]
        )
    );
}

#[test]
fn failover_a_hung_cloud_is_hedged() {
    let mut vm = failover_vm(failover_config(), false);
    let mut up = clouds(
        |c, s| {
            if c == "aws" && s.path() == INFER {
                Reply::Hang
            } else {
                stub(c, s)
            }
        },
        "aws",
    );
    let ex = vm.exchange(&infer(None), &mut up).expect("no trap");
    assert_eq!(ex.status, 200);
    assert_eq!(served(&ex), "gcp");
    assert_eq!(ex.header("x-infermesh-failover").as_deref(), Some("hedged"));
    // 50 ms hedge delay on a 10 ms tick, plus gcp's 2 ms.
    assert!((50..=70).contains(&ex.elapsed_ms), "{} ms", ex.elapsed_ms);
    assert_eq!(
        vm.metric(
            stats::failover::REQUESTS,
            &[("cloud", "gcp"), ("outcome", "hedged")]
        ),
        1
    );
}

#[test]
fn failover_residency_is_never_crossed() {
    let mut vm = failover_vm(failover_config(), false);
    let mut up = clouds(
        |c, s| {
            if c == "azure" {
                stub(c, s)
            } else {
                stub_status(c, s, 503)
            }
        },
        "aws",
    );
    // Probes (200 ms, 2 failures to go unhealthy) take aws and gcp out.
    vm.advance(1_000, &mut up).expect("no trap");
    let ex = vm.exchange(&infer(Some("eu")), &mut up).expect("no trap");
    assert_eq!(ex.status, 503);
    assert!(ex.upstream.is_none());
    let body: serde_json::Value = serde_json::from_slice(&ex.body).expect("JSON body");
    assert_eq!(body["model"], "digits-mlp");
    assert_eq!(body["residency"]["value"], "eu");
    assert_eq!(body["residency"]["tags"], json!(["eu"]));
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("none healthy"),
        "{body}"
    );
    let us = vm.exchange(&infer(Some("us")), &mut up).expect("no trap");
    assert_eq!(served(&us), "azure");
    let unknown = vm.exchange(&infer(Some("mars")), &mut up).expect("no trap");
    assert_eq!(unknown.status, 503);
    assert!(
        unknown.text().contains("which no rule lists"),
        "{}",
        unknown.text()
    );
    use stats::failover::NO_CLOUD;
    assert_eq!(vm.metric(NO_CLOUD, &[("reason", "none_healthy")]), 1);
    assert_eq!(vm.metric(NO_CLOUD, &[("reason", "none_allowed")]), 1);
}

#[test]
fn failover_when_every_cloud_fails_the_first_failure_is_passed_on() {
    let mut vm = failover_vm(failover_config(), false);
    let mut up = clouds(|c, s| stub_status(c, s, 500), "aws");
    let ex = vm.exchange(&infer(None), &mut up).expect("no trap");
    assert_eq!(ex.status, 500);
    assert_eq!(ex.text(), "upstream=aws\n");
    assert_eq!(ex.header(SERVED_BY).as_deref(), Some("@aws"));
    assert_eq!(ex.callouts.iter().filter(|c| c.path() == INFER).count(), 2);
    use stats::failover::{GIVE_UPS, REQUESTS};
    assert_eq!(vm.metric(GIVE_UPS, &[("reason", "attempts_exhausted")]), 1);
    assert_eq!(
        vm.metric(REQUESTS, &[("cloud", "aws"), ("outcome", "failed")]),
        1
    );
}

#[test]
fn a_body_wait_that_runs_out_still_fails_over_with_the_body() {
    let mut failover = failover_config();
    failover["health"]["probe"]["interval_ms"] = json!(60_000);
    failover["health"]["passive"]["consecutive_failures"] = json!(10);
    let module = json!({
        "router": {
            "models": [{"name": "digits-mlp", "versions": ["1", "2"]}],
            "body": {"version_pointer": "/parameters/model_version", "max_wait_ms": 100}
        },
        "failover": failover,
    });
    let mut vm = start(&module, Options::default());
    let mut up = clouds(
        |c, s| {
            if c == "aws" && s.path() == INFER {
                stub_status(c, s, 500)
            } else {
                stub(c, s)
            }
        },
        "aws",
    );
    for i in 0..4 {
        let ex = vm.exchange(&infer(Some("eu")), &mut up).expect("no trap");
        assert_eq!(ex.status, 200, "#{i}: {}", ex.text());
        assert_eq!(served(&ex), "gcp", "#{i}");
        assert_eq!(
            ex.header("x-infermesh-failover").as_deref(),
            Some("replayed")
        );
        let replay = ex
            .callouts
            .iter()
            .find(|c| c.path() == INFER)
            .expect("replay");
        assert_eq!(replay.body, infer_body(), "#{i}: the replay lost the body");
        assert_eq!(replay.header(MODEL).as_deref(), Some("digits-mlp"));
    }
}

#[test]
fn the_chain_follows_the_cloud_header_and_replays_with_the_version() {
    let router = json!({
        "models": [{"name": "digits-mlp", "versions": ["1", "2"], "aliases": {"stable": "1", "canary": "2"}}]
    });
    let canary = json!({
        "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 50}, {"name": "2", "weight": 50}]}],
        "sticky_key": [{"header": "x-user-id"}],
        "trust_downstream_headers": true
    });
    let mut failover = failover_config();
    failover["trust_downstream_headers"] = json!(true);
    let mut vm = start(
        &json!({ "router": router, "canary": canary, "failover": failover }),
        Options::default(),
    );
    let mut up = clouds(stub, "azure");
    let mut versions = std::collections::BTreeSet::new();
    for user in 0..40 {
        let ex = vm
            .exchange(
                &infer(Some("eu")).header("x-user-id", format!("user-{user}")),
                &mut up,
            )
            .expect("no trap");
        assert_eq!(served(&ex), "aws");
        let v = ex.header(SAW_VERSION).expect("a version");
        assert_eq!(ex.header(SERVED_BY), Some(format!("digits-mlp/{v}@aws")));
        versions.insert(v);
    }
    assert_eq!(versions.len(), 2);
    let mut up = clouds(
        |c, s| {
            if c == "aws" && s.cluster.is_none() {
                stub_status(c, s, 503)
            } else {
                stub(c, s)
            }
        },
        "azure",
    );
    let ex = vm
        .exchange(&infer(Some("eu")).header("x-user-id", "user-7"), &mut up)
        .expect("no trap");
    assert_eq!(ex.status, 200, "{}", ex.text());
    assert_eq!(served(&ex), "gcp");
    let v = ex.header(SAW_VERSION).expect("a version");
    assert_eq!(ex.header(SERVED_BY), Some(format!("digits-mlp/{v}@gcp")));
    let replay = ex
        .callouts
        .iter()
        .find(|c| c.cluster.as_deref() == Some("cloud-gcp") && c.path().contains("/infer"))
        .expect("replay");
    assert_eq!(
        replay.path(),
        format!("/v2/models/digits-mlp/versions/{v}/infer")
    );
    assert_eq!(replay.header(MODEL).as_deref(), Some("digits-mlp"));
}

#[test]
fn one_probe_per_interval_per_process() {
    // Two workers (VMs) of one Envoy share data: claiming a probe round by
    // compare-and-swap keeps it at about one round per interval. The
    // negative control, two Envoys (nothing shared), probes twice as often.
    for shared in [true, false] {
        let store = std::rc::Rc::new(std::cell::RefCell::new(filter_host::Shared::default()));
        let opts = || Options {
            shared: shared.then(|| store.clone()),
            ..Options::default()
        };
        let module = json!({ "failover": failover_config() });
        let mut workers = [start(&module, opts()), start(&module, opts())];
        let mut up = clouds(stub, "aws");
        // 3 s in 10 ms steps, the workers interleaved.
        for _ in 0..300 {
            for vm in workers.iter_mut() {
                vm.advance(10, &mut up).expect("no trap");
            }
        }
        let probes: Vec<&Sent> = workers
            .iter()
            .flat_map(|vm| &vm.callouts)
            .filter(|c| c.cluster.as_deref() == Some("cloud-gcp") && c.path() == "/v2/health/ready")
            .collect();
        let n = probes.len() as f64;
        let expected = 3_000.0 / 200.0;
        if shared {
            assert!(
                (expected * 0.75..=expected * 1.1).contains(&n),
                "{n} probes of gcp in 3 s, expected ~{expected}"
            );
            assert!(store.borrow().data.len() >= 3, "a record per cloud");
        } else {
            assert!(n >= expected * 1.6, "{n} probes without sharing");
        }
        let p = probes.first().expect("a probe");
        assert_eq!(p.header(":method").as_deref(), Some("GET"));
        assert_eq!(
            p.header("user-agent").as_deref(),
            Some("infermesh-failover-probe")
        );
    }
}
