//! Rigs shared by the host's tests: the e2e tests' route tables as
//! upstream functions.
#![allow(dead_code)]

use filter_host::{header_str, Options, Plugin, Reply, Request, Sent, Vm};
use serde_json::{json, Value};

/// The response header naming the upstream that answered (as the e2e
/// stub upstreams set it).
pub const UPSTREAM: &str = "x-upstream";
/// The `x-infermesh-version` the upstream received (`-`: none).
pub const SAW_VERSION: &str = "x-upstream-saw-version";

pub fn plugin() -> Plugin {
    Plugin::shipped().unwrap_or_else(|e| panic!("{e}"))
}

pub fn start(module: &Value, opts: Options) -> Vm {
    plugin()
        .start(module.to_string().as_bytes(), opts)
        .unwrap_or_else(|e| panic!("the test's config was refused: {e:?}"))
}

/// A stub upstream's answer: 200 `upstream=NAME`, naming itself and the
/// version header it saw.
pub fn stub(name: &str, sent: &Sent) -> Reply {
    stub_status(name, sent, 200)
}

pub fn stub_status(name: &str, sent: &Sent, status: u16) -> Reply {
    let saw = sent
        .header("x-infermesh-version")
        .unwrap_or_else(|| "-".to_owned());
    Reply::Respond {
        status,
        headers: vec![
            ("content-type".into(), b"text/plain".to_vec()),
            (UPSTREAM.into(), name.as_bytes().to_vec()),
            (SAW_VERSION.into(), saw.into_bytes()),
        ],
        body: format!("upstream={name}\n").into_bytes(),
        latency_ms: 2,
    }
}

/// The e2e `version_subsets` route table: `x-infermesh-version: N` to the
/// cluster of version N (when it exists), else the default route.
pub fn version_route(versions: &[&str], sent: &Sent) -> String {
    match header_str(&sent.route, "x-infermesh-version") {
        Some(v) if versions.contains(&v.as_str()) => format!("v{v}"),
        _ => "default".to_owned(),
    }
}

/// The e2e failover route table: `x-infermesh-cloud: NAME` to
/// `cloud-NAME`, else `default`.
pub fn cloud_of(sent: &Sent, default: &str) -> String {
    if let Some(c) = &sent.cluster {
        return c.trim_start_matches("cloud-").to_owned();
    }
    match header_str(&sent.route, "x-infermesh-cloud") {
        Some(c) if ["aws", "gcp", "azure"].contains(&c.as_str()) => c,
        _ => default.to_owned(),
    }
}

/// The failover e2e config: aws and gcp in the eu, azure in the us.
pub fn failover_config() -> Value {
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
            "probe": {"interval_ms": 200, "timeout_ms": 100,
                      "healthy_threshold": 3, "unhealthy_threshold": 2},
            "passive": {"consecutive_failures": 3}
        },
        "replay": {"max_attempts": 3, "max_body_bytes": 65536,
                   "per_try_timeout_ms": 1000, "total_deadline_ms": 3000},
        "hedge": {"delay_ms": 50}
    })
}

pub fn router_config() -> Value {
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

pub fn canary_config(versions: &[(&str, f64)]) -> Value {
    let versions: Vec<_> = versions
        .iter()
        .map(|(name, weight)| json!({"name": name, "weight": weight}))
        .collect();
    json!({
        "splits": [{"model": "digits-mlp", "versions": versions}],
        "sticky_key": [{"header": "x-user-id"}, {"cookie": "uid"}],
    })
}

pub const INFER: &str = "/v2/models/digits-mlp/infer";

/// The failover tests' OIP infer body (64 floats).
pub fn infer_body() -> Vec<u8> {
    let data: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    serde_json::to_vec(&json!({
        "id": "req-7",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": data}]
    }))
    .unwrap_or_default()
}

/// The router tests' ~300-byte OIP body naming a version in parameters.
pub fn oip_body(version: &str) -> Vec<u8> {
    let data: Vec<f32> = (0..32).map(|i| i as f32 / 32.0).collect();
    serde_json::to_vec(&json!({
        "id": "req-42",
        "parameters": {"model_version": version},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": data}]
    }))
    .unwrap_or_default()
}

pub fn infer(residency: Option<&str>) -> Request {
    let r = Request::post(INFER, infer_body()).header("content-type", "application/json");
    match residency {
        Some(v) => r.header("x-data-residency", v),
        None => r,
    }
}
