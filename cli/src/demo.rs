//! `infermesh demo`: drives traffic through the local mesh and prints what
//! happened, measured from the outside (which cloud and version answered,
//! from the `x-infermesh-served-by` header; the model's answer; Envoy's
//! metrics). Every printed claim is also a check.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use filter_core::canary::{self, Decision};
use filter_core::headers::SERVED_BY;
use mesh::load::{self, Plan, Record};
use mesh::{Client, Req, Resp};
use serde_json::{json, Value};

use crate::local::{
    LocalMesh, Options, CLOUDS, FAULT_RUNTIME_KEY, GUARDED_MODEL, RESIDENCY_HEADER, SHADOWED_MODEL,
    VERSIONS,
};
use filter_core::stats::canary::GUARD_TRIPS;
use filter_core::stats::failover::{REQUESTS, TRANSITIONS};
use filter_core::stats::shadow::{AGREEMENTS, DISAGREEMENTS};
use mesh::digits;

/// Users in the split and ramp steps.
const USERS: usize = 2_000;
/// Seconds from start until the scheduled ramp step (the failover act
/// runs while it is pending).
const RAMP_AFTER_S: u64 = 45;
/// The failover act: open-loop rate, length, when aws is killed and when
/// it is started again.
const ACT_RATE: f64 = 100.0;
const ACT_S: u64 = 11;
const KILL_AT_S: u64 = 3;
const RESTART_AT_S: u64 = 6;
/// Every this many requests of the act one is tagged `x-data-residency: eu`.
const EU_EVERY: u64 = 4;
/// The switch to gcp must be done within this of the kill.
const SWITCH_LIMIT_MS: f64 = 2_000.0;
/// aws serves again between these after it is ready (the healthy
/// threshold is 3 probes 500 ms apart: about 1 s), then keeps at least
/// this share, percent.
const READMIT_MIN_MS: f64 = 800.0;
const RETURN_LIMIT_MS: f64 = 4_000.0;
const RETURN_SHARE: f64 = 90.0;
/// The guard act: open-loop rate and length, when the fault starts, the
/// share of the canary's requests it fails, and the rollback limit.
const GUARD_RATE: f64 = 300.0;
const GUARD_S: u64 = 4;
const FAULT_AT_S: u64 = 1;
const FAULT_PERCENT: u32 = 30;
const ROLLBACK_LIMIT_MS: f64 = 1_000.0;
/// Shadow copies the shadow act must have compared.
const SHADOW_MIN_COMPARED: f64 = 40.0;
const OUTCOMES: [&str; 4] = ["served", "replayed", "hedged", "failed"];
const REASONS: [&str; 3] = ["probe", "live_failures", "live_failure_rate"];

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

/// The version in a `model/version@cloud` served-by value.
fn version_in(served_by: &str) -> &str {
    let model_version = served_by.split('@').next().unwrap_or("");
    model_version.rsplit('/').next().unwrap_or("")
}

/// True for `model/version@cloud` with a known version and cloud.
fn names_version_and_cloud(served_by: &str, model: &str) -> bool {
    let Some((mv, cloud)) = served_by.split_once('@') else {
        return false;
    };
    let Some((m, v)) = mv.split_once('/') else {
        return false;
    };
    m == model && VERSIONS.contains(&v) && CLOUDS.iter().any(|c| c.name == cloud)
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
        step: Some((ramp_at, 50.0)),
        ..Options::new(root.to_owned(), port, 10.0)
    };
    eprintln!("infermesh: starting the local mesh (three clouds, Envoy with the filters)...");
    let mut mesh = LocalMesh::start(&opts).await?;
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
                "served by {:<18} predicts {l} (true label {})",
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
    if now_s() >= ramp_at {
        let _ = writeln!(
            out,
            "   (the scheduled step to 50% came during this act, {RAMP_AFTER_S} s after the start: \
             this machine is too busy for the demo's timing; run it on a quieter one)"
        );
    }

    // 4. A cloud dies under load (while the scheduled step is pending).
    let act_ok = match failover_act(&mut mesh, &body, &mut out).await {
        Ok(ok) => ok,
        Err(e) => {
            let _ = writeln!(out, "   the failover act could not run: {e}");
            false
        }
    };

    // 5. The scheduled ramp: the weight is a function of wall-clock time.
    let wait = ramp_at.saturating_sub(now_s()) + 1;
    let _ = writeln!(
        out,
        "\n4. scheduled step: canary 10% -> 50% at a wall-clock time, no controller, no restart"
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

    // 6. A canary that goes bad, and the shadow's agreement.
    let guard_ok = match guard_act(&mesh, root, &mut out).await {
        Ok(ok) => ok,
        Err(e) => {
            let _ = writeln!(out, "   the guard act could not run: {e}");
            false
        }
    };
    let shadow_ok = match shadow_act(&mesh, root, &mut out).await {
        Ok(ok) => ok,
        Err(e) => {
            let _ = writeln!(out, "   the shadow act could not run: {e}");
            false
        }
    };

    // 7. What Envoy counted.
    let stats = mesh.envoy.stats().await;
    let _ = writeln!(out, "\n7. Envoy metrics (/stats/prometheus)");
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
    let ok = on_v2 > 0
        && back == 0
        && sticky == sample.len()
        && predicted == USERS
        && act_ok
        && guard_ok
        && shadow_ok;
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

/// Sets the local mesh's fault knob (Envoy runtime, admin API).
async fn set_fault(mesh: &LocalMesh, percent: u32) -> Result<(), String> {
    let r = Client::new(mesh.envoy.admin)
        .try_send(Req::post(
            format!("/runtime_modify?{FAULT_RUNTIME_KEY}={percent}"),
            Vec::new(),
        ))
        .await?;
    if r.status.is_success() {
        Ok(())
    } else {
        Err(format!("runtime_modify: {} {}", r.status, r.text()))
    }
}

/// The guard act: under load, the guarded model's canary starts failing;
/// the guard must stop sending it requests within a second.
async fn guard_act(mesh: &LocalMesh, root: &Path, out: &mut String) -> Result<bool, String> {
    let before = mesh.envoy.stats().await;
    let weight = |v: &str| {
        before.sum(
            "infermesh_canary_weight_bp",
            &[("model", GUARDED_MODEL), ("version", v)],
        ) / 100.0
    };
    let _ = writeln!(
        out,
        "\n5. guard: {GUARDED_MODEL} {:.0}/{:.0} at {GUARD_RATE:.0} req/s; at {FAULT_AT_S} s its version 2 starts \
         failing {FAULT_PERCENT}% of requests (HTTP 500 from Envoy's fault filter)",
        weight("1"),
        weight("2")
    );
    let mut plan = Plan::new(
        mesh.envoy.listener,
        GUARD_RATE,
        Duration::from_secs(GUARD_S),
    );
    plan.timeout = Duration::from_secs(5);
    let body = forest_body(root)?;
    let path = format!("/v2/models/{GUARDED_MODEL}/infer");
    eprintln!("infermesh: guard act: {GUARD_S} s of load, the canary fails from {FAULT_AT_S} s...");
    let running = load::start(plan, move |_| Req::post(path.clone(), body.clone()))?;
    running.sleep_until(Duration::from_secs(FAULT_AT_S)).await;
    let fault_ms = running.elapsed_ms();
    let set = set_fault(mesh, FAULT_PERCENT).await;
    let records = running.finish().await?;
    set_fault(mesh, 0).await?;
    set?;
    let after = mesh.envoy.stats().await;

    let on_v2 = |r: &&Record| r.served_by.as_deref().map(version_in) == Some("2");
    let v2_before = records
        .iter()
        .filter(|r| r.start_ms < fault_ms)
        .filter(on_v2)
        .count();
    let last_v2 = records
        .iter()
        .filter(|r| r.start_ms >= fault_ms)
        .filter(on_v2)
        .map(|r| r.start_ms)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let rollback_ms = last_v2.map_or(0.0, |t| t - fault_ms);
    let summary = load::summarize(&records);
    let labels = [("model", GUARDED_MODEL), ("version", "2")];
    let trips = after.sum(GUARD_TRIPS, &labels) - before.sum(GUARD_TRIPS, &labels);
    let log = mesh.envoy.log();
    let line = log
        .lines()
        .find(|l| {
            l.contains(&format!(
                "infermesh canary guard: model {GUARDED_MODEL} version 2"
            ))
        })
        .map(|l| {
            l.find("infermesh canary guard")
                .and_then(|i| l.get(i..))
                .unwrap_or(l)
                .trim()
                .to_owned()
        });
    let rolled_ok = v2_before > 0 && rollback_ms <= ROLLBACK_LIMIT_MS && trips >= 1.0;
    let _ = writeln!(
        out,
        "   version 2 served {v2_before} requests before the fault; the last request it got came \
         {rollback_ms:.0} ms after the fault started (limit {ROLLBACK_LIMIT_MS:.0} ms: {})",
        mark(rolled_ok)
    );
    let _ = writeln!(
        out,
        "   {} requests, {} client-visible errors (the fault filter answers inside this Envoy, where failover \
         cannot replay; a failing sidecar's 500s are replayed: tests/tests/guard.rs)",
        summary.requests, summary.errors
    );
    let _ = writeln!(
        out,
        "   Envoy's log: {}",
        line.as_deref().unwrap_or("(no guard line)")
    );
    Ok(rolled_ok && line.is_some())
}

/// A digits-forest input, from its reference cases.
fn forest_body(root: &Path) -> Result<Vec<u8>, String> {
    let path = root.join("examples/models/digits-forest/1/reference.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let input = &r["cases"][0]["inputs"]["input"];
    serde_json::to_vec(&json!({"inputs": [{
        "name": "input", "datatype": input["datatype"], "shape": input["shape"], "data": input["data"],
    }]}))
    .map_err(|e| e.to_string())
}

/// The shadow act: the digits test images through the split; a share of
/// the baseline's requests is copied to version 2 and the answers
/// compared.
async fn shadow_act(mesh: &LocalMesh, root: &Path, out: &mut String) -> Result<bool, String> {
    let cases = digits::Cases::load(root)?;
    let n = cases.pixels.len();
    let _ = writeln!(
        out,
        "\n6. shadow: half of {SHADOWED_MODEL}'s baseline requests copied to version 2 and the answers \
         compared (label, argmax of the probabilities); {n} digit images"
    );
    let labels = [("model", SHADOWED_MODEL), ("version", "2")];
    let judged = |s: &mesh::Stats| (s.sum(AGREEMENTS, &labels), s.sum(DISAGREEMENTS, &labels));
    let (a0, d0) = judged(&mesh.envoy.stats().await);
    let reqs = cases
        .pixels
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Req::post(
                format!("/v2/models/{SHADOWED_MODEL}/infer"),
                digits::infer_body(p),
            )
            .header("x-user-id", format!("digit-{i}"))
        })
        .collect();
    let resps = mesh.envoy.client().connections(4).send_all(reqs).await;
    let answered = resps.iter().filter(|r| r.status.is_success()).count();
    // The candidate answers after the client; wait for its answers.
    let mut agreed = 0.0;
    let mut compared = 0.0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (a, d) = judged(&mesh.envoy.stats().await);
        let now = (a - a0) + (d - d0);
        if now > 0.0 && now == compared {
            break;
        }
        (agreed, compared) = (a - a0, now);
    }
    let ok = answered == n && compared >= SHADOW_MIN_COMPARED;
    let _ = writeln!(
        out,
        "   {answered}/{n} answered; version 2 agreed with version 1 on {:.1}% of {compared} copies compared \
         ({}; onnxruntime on all {n} images: {:.2}%)",
        100.0 * agreed / compared.max(1.0),
        mark(ok),
        cases.agreement_pct()
    );
    Ok(ok)
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
        out.insert(u.clone(), version_in(&served(&r)).to_owned());
    }
    Ok(out)
}

/// Request `seq` of the failover act: an inference, every
/// [`EU_EVERY`]th one tagged `eu`.
fn act_request(body: &[u8], seq: u64) -> Req {
    let r = Req::post("/v2/models/digits-mlp/infer", body.to_vec())
        .header("content-type", "application/json");
    if is_eu(seq) {
        r.header(RESIDENCY_HEADER, "eu")
    } else {
        r
    }
}

fn is_eu(seq: u64) -> bool {
    seq % EU_EVERY == 1
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAILED"
    }
}

/// Open-loop load through the mesh; aws is killed (SIGKILL) and later
/// started again on the same address. Writes what happened; returns
/// whether every claim held.
async fn failover_act(mesh: &mut LocalMesh, body: &[u8], out: &mut String) -> Result<bool, String> {
    let _ = writeln!(
        out,
        "\n3. failover: {ACT_RATE:.0} req/s for {ACT_S} s (1 in {EU_EVERY} tagged {RESIDENCY_HEADER}: eu); \
         aws killed (SIGKILL) at {KILL_AT_S} s, started again at {RESTART_AT_S} s"
    );
    let before = mesh.envoy.stats().await;
    let mut plan = Plan::new(mesh.envoy.listener, ACT_RATE, Duration::from_secs(ACT_S));
    plan.timeout = Duration::from_secs(5);
    let body = body.to_vec();
    eprintln!("infermesh: failover act: {ACT_S} s of load, aws killed at {KILL_AT_S} s...");
    let running = load::start(plan, move |seq| act_request(&body, seq))?;
    running.sleep_until(Duration::from_secs(KILL_AT_S)).await;
    let kill_ms = running.elapsed_ms();
    mesh.cloud("aws")?.kill();
    running.sleep_until(Duration::from_secs(RESTART_AT_S)).await;
    let restart_ms = running.elapsed_ms();
    let restarted = mesh.cloud("aws")?.restart().await;
    let ready_ms = running.elapsed_ms();
    let records = running.finish().await?;
    restarted.map_err(|e| format!("aws did not start again: {e}"))?;
    let after = mesh.envoy.stats().await;
    let mut ok = true;

    // What the clients saw.
    let summary = load::summarize(&records);
    let errors_ok = summary.errors == 0 && summary.requests > 0;
    ok &= errors_ok;
    let _ = writeln!(
        out,
        "   {} requests, {} client-visible errors (must be 0: {}); p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        summary.requests,
        summary.errors,
        mark(errors_ok),
        summary.p50_ms,
        summary.p99_ms,
        summary.max_ms
    );
    if let Some(bad) = records.iter().find(|r| !r.ok()) {
        let _ = writeln!(
            out,
            "   first error: request {} at {:.0} ms: {}",
            bad.seq,
            bad.start_ms,
            bad.error.clone().unwrap_or_else(|| format!(
                "status {:?} {}",
                bad.status,
                bad.error_body.as_deref().unwrap_or("")
            ))
        );
    }
    let named = records
        .iter()
        .filter(|r| {
            r.ok()
                && r.served_by
                    .as_deref()
                    .is_some_and(|s| names_version_and_cloud(s, "digits-mlp"))
        })
        .count();
    let named_ok = named == records.len();
    ok &= named_ok;
    let _ = writeln!(
        out,
        "   {named}/{} answers name model/version@cloud in {SERVED_BY} ({})",
        records.len(),
        mark(named_ok)
    );

    // Who served, second by second.
    let _ = writeln!(
        out,
        "   served per second ({SERVED_BY}: digits-mlp/<version>@<cloud>):"
    );
    let _ = writeln!(out, "     second    aws    gcp  azure  error");
    for (sec, by) in load::per_second(&records) {
        let n = |c: &str| by.get(c).copied().unwrap_or(0);
        let note = if sec == KILL_AT_S {
            "   <- aws killed"
        } else if sec == RESTART_AT_S {
            "   <- aws started again"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "     {sec:>6} {:>6} {:>6} {:>6} {:>6}{note}",
            n("aws"),
            n("gcp"),
            n("azure"),
            n("error") + n("unknown")
        );
    }

    // The switch, the return, residency.
    let switch = load::settle_ms(&records, kill_ms, restart_ms, |r| r.served_by_cloud("gcp"));
    let switch_ok = switch.is_some_and(|t| t <= SWITCH_LIMIT_MS);
    ok &= switch_ok;
    let _ = writeln!(
        out,
        "   kill -> all traffic on gcp: {} (limit {SWITCH_LIMIT_MS:.0} ms: {})",
        fmt_ms(switch),
        mark(switch_ok)
    );
    // Back on aws: the first answer from aws after it is ready again, then
    // the share aws keeps (a hedge to gcp may still win now and then).
    let since_ready: Vec<&Record> = load::window(&records, ready_ms, f64::INFINITY);
    let first_back = since_ready
        .iter()
        .filter(|r| r.served_by_cloud("aws"))
        .map(|r| r.start_ms)
        .min_by(f64::total_cmp);
    let (on_aws, total) = first_back.map_or((0, 0), |t| {
        let after: Vec<_> = since_ready.iter().filter(|r| r.start_ms >= t).collect();
        (
            after.iter().filter(|r| r.served_by_cloud("aws")).count(),
            after.len(),
        )
    });
    let back = first_back.map(|t| t - ready_ms);
    let back_ok = back.is_some_and(|t| (READMIT_MIN_MS..=RETURN_LIMIT_MS).contains(&t))
        && pct(on_aws, total) >= RETURN_SHARE;
    ok &= back_ok;
    let _ = writeln!(
        out,
        "   aws ready again {:.0} ms after the restart; first answer from aws {} later \
         (3 healthy probes 500 ms apart: between {READMIT_MIN_MS:.0} and {RETURN_LIMIT_MS:.0} ms), \
         then {on_aws}/{total} on aws ({:.1}%, at least {RETURN_SHARE:.0}%: {})",
        ready_ms - restart_ms,
        fmt_ms(back),
        pct(on_aws, total),
        mark(back_ok)
    );
    let eu: Vec<&Record> = records.iter().filter(|r| is_eu(r.seq)).collect();
    let on = |c: &str| eu.iter().filter(|r| r.served_by_cloud(c)).count();
    let eu_ok = !eu.is_empty() && on("azure") == 0 && on("aws") + on("gcp") == eu.len();
    ok &= eu_ok;
    let _ = writeln!(
        out,
        "   {} requests tagged eu: aws {}, gcp {}, azure {} (no eu request on azure: {})",
        eu.len(),
        on("aws"),
        on("gcp"),
        on("azure"),
        mark(eu_ok)
    );

    // What the failover filter counted during the act.
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let _ = writeln!(out, "   {REQUESTS} during the act:");
    for c in CLOUDS {
        let counts: Vec<String> = OUTCOMES
            .iter()
            .map(|o| {
                format!(
                    "{o} {}",
                    delta(REQUESTS, &[("cloud", c.name), ("outcome", o)])
                )
            })
            .collect();
        let _ = writeln!(out, "     {:<6} {}", c.name, counts.join(", "));
    }
    let _ = writeln!(out, "   {TRANSITIONS} during the act:");
    let mut transitions = Vec::new();
    for c in CLOUDS {
        for state in ["unhealthy", "healthy"] {
            for reason in REASONS {
                let labels = [("cloud", c.name), ("outcome", state), ("reason", reason)];
                let n = delta(TRANSITIONS, &labels);
                if n != 0.0 {
                    transitions.push((c.name, state, reason, n));
                    let _ = writeln!(
                        out,
                        "     {{cloud=\"{}\",outcome=\"{state}\",reason=\"{reason}\"}} {n}",
                        c.name
                    );
                }
            }
        }
    }
    let failed = delta(REQUESTS, &[("outcome", "failed")]);
    let rescued = delta(REQUESTS, &[("cloud", "gcp"), ("outcome", "replayed")])
        + delta(REQUESTS, &[("cloud", "gcp"), ("outcome", "hedged")]);
    let went_down = transitions
        .iter()
        .any(|&(c, s, _, n)| c == "aws" && s == "unhealthy" && n > 0.0);
    let came_back = transitions
        .iter()
        .any(|&(c, s, r, n)| c == "aws" && s == "healthy" && r == "probe" && n > 0.0);
    let counters_ok = failed == 0.0 && rescued > 0.0 && went_down && came_back;
    ok &= counters_ok;
    let _ = writeln!(
        out,
        "   failed 0: {failed}; replayed or hedged to gcp > 0: {rescued}; aws went unhealthy: {went_down}; \
         aws readmitted by probes: {came_back} ({})",
        mark(counters_ok)
    );
    Ok(ok)
}

fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "never".to_owned(), |t| format!("{t:.0} ms"))
}
