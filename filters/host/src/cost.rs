//! Exact cost: wasmtime fuel per request, for each stage and the chain,
//! on representative requests. Fuel is about one unit per executed wasm
//! instruction (host calls count their own module-side work, such as the
//! allocations the host asks of the module); the clock is virtual, so the
//! same module and input give the same count on any machine.
//!
//! Each request type runs on a fresh VM: a few warm-up requests of the
//! same type first (the first request pays for first-use allocations),
//! then the measured one. Budgets live in `budgets.toml` next to this
//! crate; `INFERMESH_FUEL_UPDATE=1 cargo test -p filter-host --test fuel`
//! rewrites it.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::{header_str, Options, Plugin, Reply, Request, Result, Sent};

/// Requests before the measured one.
pub const WARMUP: usize = 4;

/// One measured request type.
#[derive(Debug, Clone)]
pub struct Cost {
    pub name: &'static str,
    pub what: &'static str,
    /// Fuel of the measured request: its callbacks, and the root ticks and
    /// callout answers while it was open.
    pub fuel: u64,
    /// Fuel of configuring the VM (once per worker and config push).
    pub configure: u64,
}

fn router() -> Value {
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

fn canary() -> Value {
    json!({
        "splits": [{"model": "digits-mlp", "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}]}],
        "sticky_key": [{"header": "x-user-id"}, {"cookie": "uid"}]
    })
}

fn failover() -> Value {
    json!({
        "clouds": [
            {"name": "aws", "cluster": "cloud-aws", "tags": ["eu"], "priority": 0},
            {"name": "gcp", "cluster": "cloud-gcp", "tags": ["eu"], "priority": 1},
            {"name": "azure", "cluster": "cloud-azure", "tags": ["us"], "priority": 2}
        ],
        "residency": {"header": "x-data-residency", "rules": {"eu": ["eu"], "us": ["us"]},
                      "default": ["*"], "on_unknown": "reject"},
        "health": {"probe": {"interval_ms": 60000, "timeout_ms": 100},
                   "passive": {"consecutive_failures": 1000}},
        "replay": {"max_attempts": 3, "max_body_bytes": 65536,
                   "per_try_timeout_ms": 1000, "total_deadline_ms": 3000},
        "hedge": {"delay_ms": 50}
    })
}

/// The failover tests' OIP infer body (64 floats, ~700 bytes).
pub fn infer_body() -> Vec<u8> {
    let data: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    serde_json::to_vec(&json!({
        "id": "req-7",
        "parameters": {"model_version": "canary"},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": data}]
    }))
    .unwrap_or_default()
}

const INFER: &str = "/v2/models/digits-mlp/infer";

/// An upstream answering 200 everywhere, or 500 from `failing` (routed
/// requests only).
fn upstream(failing: Option<&'static str>) -> impl FnMut(&Sent) -> Reply {
    move |s: &Sent| {
        let cloud = header_str(&s.route, "x-infermesh-cloud");
        if s.cluster.is_none() && failing.is_some() && cloud.as_deref() == failing {
            Reply::status(500, "upstream failed\n")
        } else {
            Reply::ok("{\"model_name\":\"digits-mlp\",\"outputs\":[]}")
        }
    }
}

struct Case {
    name: &'static str,
    what: &'static str,
    module: Value,
    allow_stop: bool,
    failing: Option<&'static str>,
    request: fn(usize) -> Request,
}

fn keyed_get(i: usize) -> Request {
    Request::get(INFER).header("x-user-id", format!("user-{i:04}"))
}

fn oip_post(i: usize) -> Request {
    Request::post(INFER, infer_body())
        .header("content-type", "application/json")
        .header("x-user-id", format!("user-{i:04}"))
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "canary_get_keyed",
            what: "canary only: GET with a sticky key",
            module: json!({ "canary": canary() }),
            allow_stop: false,
            failing: None,
            request: keyed_get,
        },
        Case {
            name: "router_canary_get_keyed",
            what: "router + canary: GET, model from the path, key splits",
            module: json!({ "router": router(), "canary": canary() }),
            allow_stop: false,
            failing: None,
            request: keyed_get,
        },
        Case {
            name: "router_oip_body",
            what: "router: OIP infer POST, version from the JSON body",
            module: json!({ "router": router() }),
            allow_stop: true,
            failing: None,
            request: oip_post,
        },
        Case {
            name: "failover_first_try",
            what: "failover: infer POST served by the first cloud",
            module: json!({ "failover": failover() }),
            allow_stop: false,
            failing: None,
            request: oip_post,
        },
        Case {
            name: "failover_replay",
            what: "failover: first cloud 500, replayed to the next",
            module: json!({ "failover": failover() }),
            allow_stop: false,
            failing: Some("aws"),
            request: oip_post,
        },
        Case {
            name: "chain_oip_body",
            what: "router + canary + failover: infer POST, body routing",
            module: json!({ "router": router(), "canary": canary(), "failover": failover() }),
            allow_stop: true,
            failing: None,
            request: oip_post,
        },
    ]
}

/// Measures every request type on `plugin`.
pub fn measure(plugin: &Plugin) -> Result<Vec<Cost>> {
    let mut out = Vec::new();
    for case in cases() {
        let mut vm = plugin.start(
            case.module.to_string().as_bytes(),
            Options {
                allow_stop: case.allow_stop,
                ..Options::default()
            },
        )?;
        let configure = vm.fuel();
        let mut up = upstream(case.failing);
        for i in 0..WARMUP {
            vm.exchange(&(case.request)(i), &mut up)?;
        }
        let ex = vm.exchange(&(case.request)(WARMUP), &mut up)?;
        if ex.status == 0 || ex.stalled {
            return Err(wasmtime::Error::msg(format!(
                "{}: the measured request did not complete ({ex:?})",
                case.name
            )));
        }
        out.push(Cost {
            name: case.name,
            what: case.what,
            fuel: ex.fuel,
            configure,
        });
    }
    Ok(out)
}

/// The budget file.
pub fn budgets_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("budgets.toml")
}

/// `name = fuel` lines (comments and blank lines skipped).
pub fn parse_budgets(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().replace('_', "").parse().ok()?))
        })
        .collect()
}

/// The budget file for `costs`.
pub fn render_budgets(costs: &[Cost]) -> String {
    let mut s = String::from(
        "# Fuel budgets per request of dist/infermesh.wasm (wasmtime fuel, ~1 per wasm\n\
         # instruction; exact and machine-independent). The fuel test fails when a\n\
         # request type costs more than 10 % over its budget. After a deliberate\n\
         # change: INFERMESH_FUEL_UPDATE=1 cargo test -p filter-host --test fuel\n",
    );
    for c in costs {
        s.push_str(&format!("{} = {}\n", c.name, c.fuel));
    }
    s
}

/// The table BENCHMARKS.md shows.
pub fn table(costs: &[Cost], budgets: &[(String, u64)]) -> String {
    let mut s = String::from(
        "| request type | fuel / request | budget | vs budget | configure (once per VM) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for c in costs {
        let budget = budgets.iter().find(|(n, _)| n == c.name).map(|(_, b)| *b);
        let vs = budget.map_or("-".to_owned(), |b| {
            format!("{:+.1} %", (c.fuel as f64 / b.max(1) as f64 - 1.0) * 100.0)
        });
        s.push_str(&format!(
            "| {} ({}) | {} | {} | {} | {} |\n",
            c.name,
            c.what,
            c.fuel,
            budget.map_or("-".to_owned(), |b| b.to_string()),
            vs,
            c.configure
        ));
    }
    s
}
