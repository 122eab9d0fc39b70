//! `infermesh demo`: drives traffic through the local mesh and prints what
//! happened, measured from the outside (which sidecar answered, the
//! `x-infermesh-served-by` header, the model's answer, Envoy's metrics).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use filter_core::canary::{self, Decision};
use filter_core::headers::SERVED_BY;
use mesh::{Client, Req, Resp};
use serde_json::{json, Value};

use crate::local::{LocalMesh, Options};

/// Users in the split and ramp steps.
const USERS: usize = 2_000;
/// Seconds from start until the scheduled ramp step.
const RAMP_AFTER_S: u64 = 20;

/// A digit image (784 floats) and its true label, from the references.
struct Digit {
    input: Value,
    label: i64,
}

fn load_digit(root: &Path) -> Result<Digit, String> {
    let path = root.join("examples/models/digits-mlp/1/reference.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let case = &r["cases"][0];
    Ok(Digit {
        input: case["inputs"]["input"].clone(),
        label: case["true_labels"][0].as_i64().unwrap_or(-1),
    })
}

fn infer_body(d: &Digit) -> Vec<u8> {
    let body = json!({"inputs": [{
        "name": "input",
        "datatype": d.input["datatype"],
        "shape": d.input["shape"],
        "data": d.input["data"],
    }]});
    serde_json::to_vec(&body).unwrap_or_default()
}

fn label_of(resp: &Resp) -> Option<i64> {
    let v: Value = serde_json::from_slice(&resp.body).ok()?;
    v["outputs"]
        .as_array()?
        .iter()
        .find(|o| o["name"] == "label")?["data"][0]
        .as_i64()
}

fn served(resp: &Resp) -> String {
    resp.header(SERVED_BY).unwrap_or_else(|| "-".to_owned())
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the demo; returns the report, or why it failed.
pub async fn run(root: &Path, port: u16) -> Result<String, String> {
    let digit = load_digit(root)?;
    let body = infer_body(&digit);
    let ramp_at = now_s() + RAMP_AFTER_S;
    let opts = Options {
        root: root.to_owned(),
        port,
        canary_percent: 10.0,
        step: Some((ramp_at, 50.0)),
    };
    eprintln!("infermesh: starting the local mesh (two sidecars, Envoy with the filters)...");
    let mesh = LocalMesh::start(&opts).await?;
    let client = mesh.envoy.client().connections(8);
    let mut out = String::new();
    let _ = writeln!(out, "infermesh local mesh\n{}", mesh.describe());

    // 1. Routing on OIP paths and headers.
    let _ = writeln!(out, "1. model-router: OIP paths, aliases, headers");
    let calls: Vec<(&str, Req)> = vec![
        (
            "POST /v2/models/digits-mlp/versions/stable/infer",
            Req::post("/v2/models/digits-mlp/versions/stable/infer", body.clone()),
        ),
        (
            "POST /v2/models/digits-mlp/versions/canary/infer",
            Req::post("/v2/models/digits-mlp/versions/canary/infer", body.clone()),
        ),
        (
            "POST /v2/models/digits-mlp/infer  x-model-version: 1",
            Req::post("/v2/models/digits-mlp/infer", body.clone()).header("x-model-version", "1"),
        ),
        (
            "GET  /v2/models/resnet50/ready",
            Req::get("/v2/models/resnet50/ready"),
        ),
    ];
    for (what, req) in calls {
        let r = client.send(req).await;
        let detail = match label_of(&r) {
            Some(l) => format!(
                "served by {:<14} predicts {l} (true label {})",
                served(&r),
                digit.label
            ),
            None => r.text().trim().to_owned(),
        };
        let _ = writeln!(out, "   {what:<55} -> {} {detail}", r.status.as_u16());
    }

    // 2. The split, keyed per user.
    let cfg = filter_core::config::canary::parse(mesh.canary_config.to_string().as_bytes())
        .map_err(|e| format!("canary config: {e}"))?;
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i:04}")).collect();
    let first = versions_of(&client, &users, &body).await?;
    let on_v2 = first.values().filter(|v| v.as_str() == "2").count();
    let _ = writeln!(out, "\n2. canary: digits-mlp 90/10, sticky on x-user-id");
    let _ = writeln!(
        out,
        "   {USERS} users, one inference each: version 1 {} ({:.1}%), version 2 {on_v2} ({:.1}%)",
        USERS - on_v2,
        pct(USERS - on_v2, USERS),
        pct(on_v2, USERS)
    );
    let predicted = users
        .iter()
        .filter(|u| {
            predict(&cfg, u, ramp_at * 1000 - 1).as_deref() == first.get(*u).map(String::as_str)
        })
        .count();
    let _ = writeln!(
        out,
        "   {predicted}/{USERS} users got the version `infermesh explain` predicts"
    );

    // 3. Stickiness: five more requests per user (a sample).
    let sample: Vec<String> = users.iter().take(400).cloned().collect();
    let mut sticky = 0;
    let mut again = Vec::new();
    for _ in 0..5 {
        again.push(versions_of(&client, &sample, &body).await?);
    }
    for u in &sample {
        if again.iter().all(|m| m.get(u) == first.get(u)) {
            sticky += 1;
        }
    }
    let _ = writeln!(
        out,
        "   {sticky}/{} users saw the same version on all of 5 more requests",
        sample.len()
    );

    // 4. The scheduled ramp: the weight is a function of wall-clock time.
    let wait = ramp_at.saturating_sub(now_s()) + 1;
    let _ = writeln!(
        out,
        "\n3. scheduled step: canary 10% -> 50% at a wall-clock time, no controller, no restart"
    );
    eprintln!("infermesh: waiting {wait} s for the scheduled step...");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let after = versions_of(&client, &users, &body).await?;
    let on_v2_after = after.values().filter(|v| v.as_str() == "2").count();
    let back = users
        .iter()
        .filter(|u| {
            first.get(*u).map(String::as_str) == Some("2")
                && after.get(*u).map(String::as_str) == Some("1")
        })
        .count();
    let forward = users
        .iter()
        .filter(|u| {
            first.get(*u).map(String::as_str) == Some("1")
                && after.get(*u).map(String::as_str) == Some("2")
        })
        .count();
    let _ = writeln!(
        out,
        "   version 2 now serves {on_v2_after} users ({:.1}%)",
        pct(on_v2_after, USERS)
    );
    let _ = writeln!(out, "   moved stable -> canary: {forward}; moved canary -> stable: {back} (monotone: must be 0)");

    // 5. What Envoy counted.
    let stats = mesh.envoy.stats().await;
    let _ = writeln!(out, "\n4. Envoy metrics (/stats/prometheus)");
    for v in ["1", "2"] {
        let keyed = stats.sum(
            "infermesh_canary_requests_total",
            &[
                ("model", "digits-mlp"),
                ("version", v),
                ("decision", "keyed"),
            ],
        );
        let pinned = stats.sum(
            "infermesh_canary_requests_total",
            &[
                ("model", "digits-mlp"),
                ("version", v),
                ("decision", "pinned"),
            ],
        );
        let w = stats.sum(
            "infermesh_canary_weight_bp",
            &[("model", "digits-mlp"), ("version", v)],
        );
        let _ = writeln!(out, "   infermesh_canary_requests_total{{version=\"{v}\"}} keyed {keyed}, pinned {pinned}; weight now {:.0}%", w / 100.0);
    }
    let rejected = stats.sum(
        "infermesh_router_rejected_total",
        &[("reason", "unknown_model")],
    );
    let _ = writeln!(
        out,
        "   infermesh_router_rejected_total{{reason=\"unknown_model\"}} {rejected}"
    );
    let ok = on_v2 > 0 && back == 0 && sticky == sample.len() && predicted == USERS;
    let _ = writeln!(
        out,
        "\n{}",
        if ok {
            "demo: all checks passed"
        } else {
            "demo: SOME CHECKS FAILED"
        }
    );
    if ok {
        Ok(out)
    } else {
        Err(out)
    }
}

fn pct(n: usize, total: usize) -> f64 {
    100.0 * n as f64 / total.max(1) as f64
}

fn predict(
    cfg: &filter_core::config::canary::CanaryConfig,
    user: &str,
    now_ms: u64,
) -> Option<String> {
    let req = canary::Request {
        path: b"/v2/models/digits-mlp/infer",
        trusted_model: Some(b"digits-mlp"),
        sticky_key: Some(user.as_bytes()),
        ..Default::default()
    };
    match canary::decide(cfg, &req, now_ms, 0) {
        Decision::Split { split, version, .. } => {
            cfg.splits.get(split)?.versions.get(version).cloned()
        }
        _ => None,
    }
}

/// One inference per user; the version each got, from `x-infermesh-served-by`.
async fn versions_of(
    client: &Client,
    users: &[String],
    body: &[u8],
) -> Result<HashMap<String, String>, String> {
    let reqs = users
        .iter()
        .map(|u| Req::post("/v2/models/digits-mlp/infer", body.to_vec()).header("x-user-id", u))
        .collect();
    let resps = client.send_all(reqs).await;
    let mut out = HashMap::with_capacity(users.len());
    for (u, r) in users.iter().zip(resps) {
        if r.status != 200 || label_of(&r).is_none() {
            return Err(format!("{u}: {} {}", r.status, r.text()));
        }
        let v = served(&r).rsplit('/').next().unwrap_or("").to_owned();
        out.insert(u.clone(), v);
    }
    Ok(out)
}
