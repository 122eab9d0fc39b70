//! The project's `istio/` manifests, as Istio 1.30 would deliver them to a
//! client sidecar (`mesh::istio` renders the config from the files
//! themselves), in a real Envoy with `infermesh.wasm`. Each variant
//! (`istio/base` plus `path-routing/` or `body-routing/`) is checked for
//! what an operator would observe: requests reach the subset or cloud the
//! module's headers (or the body) name, an unrelated OIP service on
//! another port is left alone, and failover owns the retries.
//!
//! `INFERMESH_ISTIO_DIR` points the test at another `istio/` folder (a
//! folder without `base/` is applied whole, as `kubectl apply -f` would).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use e2e::istio::{self, Env, Manifests, Proxy, Rendered};
use e2e::upstream::{Mode, UPSTREAM_HEADER};
use e2e::{assert_vm_healthy, require_envoy, Client, Envoy, Req, Resp, Upstream};
use serde_json::json;

const MODEL_HOST: &str = "digits-mlp.models.svc.cluster.local";
const OTHER_HOST: &str = "other-model.other.svc.cluster.local";
const OTHER_PORT: u16 = 9000;
const INFER: &str = "/v2/models/digits-mlp/infer";

#[derive(Debug, Clone, Copy)]
enum Variant {
    Path,
    Body,
}

impl Variant {
    fn folder(self) -> &'static str {
        match self {
            Variant::Path => "path-routing",
            Variant::Body => "body-routing",
        }
    }
}

/// The folders an operator applies for `variant`.
fn istio_dirs(variant: Variant) -> Vec<PathBuf> {
    let root = std::env::var_os("INFERMESH_ISTIO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::repo_root().join("istio"));
    if root.join("base").is_dir() {
        vec![root.join("base"), root.join(variant.folder())]
    } else {
        vec![root]
    }
}

/// The module directory: `INFERMESH_WASM_DIR` (every `.wasm` there), or a
/// temp dir holding the freshly built module as `infermesh.wasm`.
fn wasm_dir(tmp: &Path) -> PathBuf {
    let module = e2e::wasm::module();
    if std::env::var_os(e2e::wasm::WASM_DIR_ENV).is_some() {
        return module.parent().map(Path::to_owned).unwrap_or_default();
    }
    let dir = tmp.join("wasm");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&module, dir.join("infermesh.wasm")).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// The client sidecar, its upstreams, and the rendered config.
struct World {
    envoy: Envoy,
    rendered: Rendered,
    ups: HashMap<&'static str, Upstream>,
    other_listener: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl World {
    async fn start(variant: Variant) -> World {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut manifests = Manifests::load(&istio_dirs(variant)).unwrap_or_else(|e| panic!("{e}"));
        // Another team's model server in the mesh, also speaking OIP.
        manifests.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "other-model", "namespace": "other"},
            "spec": {"ports": [{"name": "http", "port": OTHER_PORT}]},
        }));

        let mut ups = HashMap::new();
        for name in ["v1", "v2", "aws", "gcp", "azure", "other"] {
            ups.insert(name, Upstream::start(name).await);
        }
        let addr = |n: &str| vec![ups[n].addr];
        let mut endpoints = HashMap::new();
        endpoints.insert(istio::cluster_name(8000, "v1", MODEL_HOST), addr("v1"));
        endpoints.insert(istio::cluster_name(8000, "v2", MODEL_HOST), addr("v2"));
        let mut all = addr("v1");
        all.extend(addr("v2"));
        endpoints.insert(istio::cluster_name(8000, "", MODEL_HOST), all);
        for (cloud, up) in [("aws-eu", "aws"), ("gcp-eu", "gcp"), ("azure-us", "azure")] {
            let host = format!("inference.{cloud}.example.com");
            endpoints.insert(istio::cluster_name(8000, "", &host), addr(up));
        }
        endpoints.insert(
            istio::cluster_name(OTHER_PORT, "", OTHER_HOST),
            addr("other"),
        );

        let env = Env {
            endpoints,
            wasm_dir: wasm_dir(tmp.path()),
            ecds_dir: tmp.path().to_owned(),
        };
        let proxy = Proxy::new(
            "models",
            &[("app", "client"), ("infermesh.io/inference-client", "true")],
        );
        let rendered = istio::render(&manifests, &proxy, &env).unwrap_or_else(|e| panic!("{e}"));
        rendered.write_ecds().unwrap_or_else(|e| panic!("{e}"));
        let envoy = match Envoy::try_start_json_on(&rendered.bootstrap, &istio::listener_name(8000))
            .await
        {
            Ok(e) => e,
            Err(f) => panic!("Envoy did not start: {}\n{}", f.reason, f.log),
        };
        let other_listener = envoy
            .listener_named(&istio::listener_name(OTHER_PORT))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        World {
            envoy,
            rendered,
            ups,
            other_listener,
            _tmp: tmp,
        }
    }

    async fn send(&self, req: Req) -> Resp {
        self.envoy
            .client()
            .send(req.header("host", format!("{MODEL_HOST}:8000")))
            .await
    }

    fn upstream_of(resp: &Resp) -> String {
        resp.header(UPSTREAM_HEADER)
            .unwrap_or_else(|| "none".into())
    }

    /// Checks that `req` is answered 200 by upstream `want`.
    async fn answered_by(&self, f: &mut Failures, what: &str, req: Req, want: &str) -> Resp {
        let resp = self.send(req).await;
        let got = (resp.status.as_u16(), World::upstream_of(&resp));
        f.check(
            got == (200, want.to_owned()),
            format!(
                "{what}: want 200 from {want}, got {got:?}: {}",
                resp.text().trim()
            ),
        );
        resp
    }
}

/// Every expectation that failed, so one run shows all of them.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.0.push(what);
        }
    }

    fn assert_none(self, w: &World) {
        assert!(
            self.0.is_empty(),
            "{} expectation(s) failed:\n- {}\n--- rendered bootstrap ---\n{}",
            self.0.len(),
            self.0.join("\n- "),
            serde_json::to_string_pretty(&w.rendered.bootstrap).unwrap_or_default()
        );
    }
}

/// An OIP infer body without a version.
fn plain_body() -> Vec<u8> {
    br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,2],"data":[0.5,0.25]}]}"#.to_vec()
}

/// An OIP infer body naming `version` in its parameters.
fn oip_body(version: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "parameters": {"model_version": version},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}]
    }))
    .unwrap_or_default()
}

/// What both variants must do.
async fn common(w: &World, f: &mut Failures) {
    // Another team's OIP service on another port: untouched (no 404 for
    // its model, no x-infermesh-* headers, path as sent).
    let other = Client::new(w.other_listener);
    for req in [
        Req::get("/v2/models/other-model/ready"),
        Req::post("/v2/models/other-model/infer", plain_body()),
    ] {
        let what = format!("{} {} to the unrelated service", req.method, req.path);
        let path = req.path.clone();
        w.ups["other"].clear();
        let resp = other
            .send(req.header("host", format!("{OTHER_HOST}:{OTHER_PORT}")))
            .await;
        let got = (resp.status.as_u16(), World::upstream_of(&resp));
        f.check(
            got == (200, "other".to_owned()),
            format!(
                "{what}: want 200 from other, got {got:?}: {}",
                resp.text().trim()
            ),
        );
        if let Some(seen) = w.ups["other"].seen().last() {
            f.check(
                seen.path == path,
                format!("{what}: path became {}", seen.path),
            );
            let ours: Vec<&str> = seen
                .headers
                .keys()
                .map(|h| h.as_str())
                .filter(|h| h.starts_with("x-infermesh-"))
                .collect();
            f.check(ours.is_empty(), format!("{what}: arrived with {ours:?}"));
        }
    }

    // The canary's override header picks the version; the VirtualService
    // routes on the module's x-infermesh-version to the subset.
    for v in ["1", "2"] {
        let req = Req::post(INFER, plain_body()).header("x-canary-version", v);
        w.answered_by(f, &format!("x-canary-version: {v}"), req, &format!("v{v}"))
            .await;
    }
    // The version in the path pins the version.
    let req = Req::post("/v2/models/digits-mlp/versions/2/infer", plain_body());
    w.answered_by(f, "versioned path", req, "v2").await;

    // Residency `us` allows only azure-us: the module writes
    // x-infermesh-cloud, the VirtualService sends the request to that
    // cloud's gateway with the authority rewritten and the version kept.
    w.ups["azure"].clear();
    let req = Req::post("/v2/models/digits-mlp/versions/1/infer", plain_body())
        .header("x-data-residency", "us");
    w.answered_by(f, "x-data-residency: us", req, "azure").await;
    // The module's health probes (GETs) reach the gateway too: look at the
    // POST.
    let posts: Vec<_> = w.ups["azure"]
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    if let Some(seen) = posts.last() {
        f.check(
            seen.header("host").as_deref() == Some("inference.azure-us.example.com"),
            format!("azure saw host {:?}", seen.header("host")),
        );
        f.check(
            seen.header("x-infermesh-version").as_deref() == Some("1"),
            format!("azure saw version {:?}", seen.header("x-infermesh-version")),
        );
    }

    // An unknown model: the module answers 404 itself.
    // (The clouds' gateways are left out: the module's probes reach them.)
    let in_mesh = || -> usize { ["v1", "v2", "other"].iter().map(|u| w.ups[u].count()).sum() };
    let before = in_mesh();
    let resp = w
        .send(Req::post("/v2/models/no-such-model/infer", plain_body()))
        .await;
    let after = in_mesh();
    f.check(
        resp.status.as_u16() == 404 && after == before,
        format!(
            "unknown model: want the module's 404, got {} ({} upstream requests)",
            resp.status,
            after - before
        ),
    );

    // Failover owns the retries: a 503 from the local v2 is tried once
    // there (retries.attempts: 0), then replayed to another cloud.
    w.ups["v2"].clear();
    w.ups["v2"].set_mode(Mode::Status(503));
    let resp = w
        .send(Req::post(
            "/v2/models/digits-mlp/versions/2/infer",
            plain_body(),
        ))
        .await;
    w.ups["v2"].set_mode(Mode::Ok);
    let by = World::upstream_of(&resp);
    f.check(
        resp.status.as_u16() == 200 && (by == "aws" || by == "gcp"),
        format!(
            "503 from v2: want a replay to an EU cloud, got {} from {by}",
            resp.status
        ),
    );
    f.check(
        w.ups["v2"].count() == 1,
        format!("503 from v2: {} tries at v2, want 1", w.ups["v2"].count()),
    );
    assert_vm_healthy(&[], &w.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_routing_variant_as_istio_delivers_it() {
    let _bin = require_envoy!("path_routing_variant_as_istio_delivers_it");
    let w = World::start(Variant::Path).await;
    let mut f = Failures::default();
    common(&w, &mut f).await;
    // One module, under Istio 1.30's name, on the inference port only.
    let name = istio::wasmplugin_filter_name("models", "infermesh");
    let on = |port| w.rendered.http_filter_names(port).contains(&name);
    f.check(on(8000), format!("{name} not on port 8000"));
    f.check(!on(OTHER_PORT), format!("{name} on port {OTHER_PORT}"));
    f.assert_none(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_routing_variant_as_istio_delivers_it() {
    let _bin = require_envoy!("body_routing_variant_as_istio_delivers_it");
    let w = World::start(Variant::Body).await;
    let mut f = Failures::default();
    common(&w, &mut f).await;
    // The version only in the body.
    for v in ["1", "2"] {
        let what = format!("body model_version {v}");
        w.answered_by(
            &mut f,
            &what,
            Req::post(INFER, oip_body(v)),
            &format!("v{v}"),
        )
        .await;
    }
    f.assert_none(&w);
}
