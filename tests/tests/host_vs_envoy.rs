//! Differential: the same requests through the module in a real Envoy
//! (V8) and in the wasmtime host (`filters/host`), with the same config
//! and route table; the decisions and headers must agree: status, which
//! upstream answered, the version and model it received, its path, and
//! the served-by header.

use e2e::upstream::{SAW_VERSION_HEADER, UPSTREAM_HEADER};
use e2e::{assert_vm_healthy, require_envoy, Bootstrap, Envoy, Req, Upstream, WasmFilter};
use filter_core::headers::{MODEL, SERVED_BY, VERSION};
use filter_host::{header_str, Options, Plugin, Reply, Request, Sent};
use serde_json::json;

/// One request, both ways.
struct Case {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

fn case(
    method: &'static str,
    path: &'static str,
    headers: &[(&'static str, &[u8])],
    body: &[u8],
) -> Case {
    Case {
        method,
        path,
        headers: headers.iter().map(|(n, v)| (*n, v.to_vec())).collect(),
        body: body.to_vec(),
    }
}

fn cases() -> Vec<Case> {
    let oip = br#"{"id":"1","parameters":{"model_version":"canary"},"inputs":[]}"#;
    let mut v = vec![
        case("GET", "/v2/models/digits-mlp/versions/2/infer", &[], b""),
        case(
            "GET",
            "/v2/models/digits-mlp/versions/stable/infer",
            &[],
            b"",
        ),
        case("GET", "/v2/models/tiny-cnn/versions/latest", &[], b""),
        case(
            "GET",
            "/v2/models/digits-mlp/infer",
            &[("x-model-version", b"stable")],
            b"",
        ),
        case(
            "GET",
            "/predict",
            &[("x-model-name", b"tiny-cnn"), ("x-model-version", b"2")],
            b"",
        ),
        case("POST", "/v2/models/digits-mlp/infer", &[], oip),
        case(
            "POST",
            "/predict",
            &[],
            br#"{"model":"tiny-cnn","parameters":{"model_version":"1"}}"#,
        ),
        case("POST", "/predict", &[], br#"{"model":"tiny-cnn","#),
        case("GET", "/v2/models/nope/infer", &[], b""),
        case("GET", "/v2/models/digits-mlp/versions/9/infer", &[], b""),
        case(
            "GET",
            "/v2/models/digits%2Dmlp/versions/%32/infer",
            &[],
            b"",
        ),
        case("GET", "/v2/models/a%2Fb/infer", &[], b""),
        case("GET", "/healthz", &[(VERSION, b"2")], b""),
        case(
            "GET",
            "/v2/models/digits-mlp/infer",
            &[("x-model-version", b"\xff\xfe")],
            b"",
        ),
        case(
            "GET",
            "/v2/models/digits-mlp/versions/1/infer",
            &[(VERSION, b"2"), (MODEL, b"tiny-cnn")],
            b"",
        ),
    ];
    // Keyed and unpinned: the canary splits; both must pick alike.
    for i in 0..30 {
        let key: &'static str = Box::leak(format!("user-{i}").into_boxed_str());
        v.push(case(
            "GET",
            "/v2/models/digits-mlp/infer",
            &[("x-user-id", key.as_bytes())],
            b"",
        ));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_envoy_decide_alike() {
    let _bin = require_envoy!("host_and_envoy_decide_alike");
    let module = json!({
        "router": {
            "models": [
                {"name": "digits-mlp", "versions": ["1", "2"], "aliases": {"stable": "1", "canary": "2"}},
                {"name": "tiny-cnn", "versions": ["1", "2"]}
            ],
            "model_header": "x-model-name",
            "version_header": "x-model-version",
            "body": {"model_pointer": "/model", "version_pointer": "/parameters/model_version"},
            "rewrite_path": true
        },
        "canary": {
            "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 50}, {"name": "2", "weight": 50}]}],
            "sticky_key": [{"header": "x-user-id"}],
            "trust_downstream_headers": true
        }
    });
    let wasm = e2e::wasm::module();
    // Envoy, with allow_on_headers_stop_iteration so body routing runs.
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let default = Upstream::start("default").await;
    let b = Bootstrap::new()
        .version_subsets(&[("1", &v1), ("2", &v2)], &default)
        .wasm(
            WasmFilter::new("infermesh", &wasm, module.to_string())
                .allow_on_headers_stop_iteration(true),
        );
    let envoy = Envoy::start(&b).await;
    // The host, on the same file.
    let plugin = Plugin::load(&wasm).unwrap_or_else(|e| panic!("{e:?}"));
    let mut vm = plugin
        .start(
            module.to_string().as_bytes(),
            Options {
                allow_stop: true,
                ..Options::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut up = |s: &Sent| {
        let name = match header_str(&s.route, VERSION).as_deref() {
            Some("1") => "v1",
            Some("2") => "v2",
            _ => "default",
        };
        let saw = s.header(VERSION).unwrap_or_else(|| "-".into());
        Reply::Respond {
            status: 200,
            headers: vec![
                (UPSTREAM_HEADER.into(), name.as_bytes().to_vec()),
                (SAW_VERSION_HEADER.into(), saw.into_bytes()),
            ],
            body: format!("upstream={name}\n").into_bytes(),
            latency_ms: 1,
        }
    };
    let client = envoy.client();
    let mut resps = Vec::new();
    for c in cases() {
        let mut req = if c.method == "GET" {
            Req::get(c.path)
        } else {
            Req::post(c.path, c.body.clone())
        };
        let mut hreq = if c.method == "GET" {
            Request::get(c.path)
        } else {
            Request::post(c.path, c.body.clone())
        };
        for (n, v) in &c.headers {
            req = req.header(n, v);
            hreq = hreq.header(n, v);
        }
        let what = format!("{} {} {:?}", c.method, c.path, c.headers);
        let total = || v1.count() + v2.count() + default.count();
        let before = total();
        let e = client.send(req).await;
        let h = vm
            .exchange(&hreq, &mut up)
            .unwrap_or_else(|err| panic!("{what}: host trap {err:?}"));
        assert_eq!(e.status.as_u16(), h.status, "{what}: status ({})", e.text());
        assert_eq!(
            e.header(UPSTREAM_HEADER),
            h.header(UPSTREAM_HEADER),
            "{what}: upstream"
        );
        assert_eq!(
            e.header(SERVED_BY),
            h.header(SERVED_BY),
            "{what}: served-by"
        );
        assert_eq!(total() > before, h.upstream.is_some(), "{what}: forwarded");
        if let Some(sent) = &h.upstream {
            let name = e.header(UPSTREAM_HEADER).unwrap_or_default();
            let u = match name.as_str() {
                "v1" => &v1,
                "v2" => &v2,
                _ => &default,
            };
            let seen = u.seen().last().cloned().expect("the upstream saw it");
            assert_eq!(
                seen.header(VERSION),
                sent.header(VERSION),
                "{what}: version upstream"
            );
            assert_eq!(
                seen.header(MODEL),
                sent.header(MODEL),
                "{what}: model upstream"
            );
            assert_eq!(seen.path, sent.path(), "{what}: path upstream");
        } else {
            assert_eq!(e.text(), h.text(), "{what}: the module's reply");
        }
        resps.push(e);
    }
    assert_vm_healthy(&resps, &envoy.log());
}
