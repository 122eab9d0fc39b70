//! Shadow agreement in a real Envoy with a real sidecar: the canary stage
//! copies the baseline's infer requests to the shadow version, compares
//! the candidate's answer with the client's, and counts agreement; a
//! guard's promotion gate holds the schedule while agreement is short.
//!
//! The cases are the 450 test images of digits-mlp's training split
//! (`tests/fixtures/shadow/digits-mlp.json`, made with onnxruntime by
//! `make_digits_cases.py`): versions 1 and 2 disagree on a known share.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::bootstrap::Route;
use e2e::digits::{infer_body, Cases};
use e2e::sidecar::Sidecar;
use e2e::{require_envoy, Bootstrap, Client, Envoy, Req, Stats, WasmFilter};
use filter_core::headers::VERSION;
use filter_core::stats::canary::PROMOTION_HELD;
use filter_core::stats::shadow::{AGREEMENTS, DISAGREEMENTS, ERRORS, NOT_COMPARED, REQUESTS};
use serde_json::{json, Value};

const MODEL: &str = "digits-mlp";
const INFER: &str = "/v2/models/digits-mlp/infer";

fn cases() -> Cases {
    Cases::load(&e2e::repo_root()).expect("fixture")
}

/// A model repository whose digits-mlp version 2 is version 1's file: an
/// identical candidate.
fn identical_repo(dir: &Path) -> PathBuf {
    let src = e2e::repo_root().join("examples/models/digits-mlp");
    let dst = dir.join("models/digits-mlp");
    for v in ["1", "2"] {
        std::fs::create_dir_all(dst.join(v)).expect("mkdir");
        std::fs::copy(src.join("1/model.onnx"), dst.join(v).join("model.onnx")).expect("copy");
    }
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
    dir.join("models")
}

struct Rig {
    envoy: Envoy,
    _sidecar: Sidecar,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// One sidecar serving `repo` (both versions), Istio-style routes: the
    /// canary's `x-infermesh-version` picks a route that rewrites the path
    /// to the version; the shadow's copies name the candidate in the path.
    async fn start(repo: Option<&Path>, canary: &Value) -> Rig {
        filter_core::config::canary::parse(canary.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the test's own config is invalid: {e}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = match repo {
            Some(r) => r.to_path_buf(),
            None => e2e::repo_root().join("examples/models"),
        };
        let sidecar = Sidecar::start(
            &e2e::sidecar::debug_bin(),
            "models",
            &repo,
            [127, 0, 0, 1],
            dir.path(),
        )
        .await
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
        let mut b = Bootstrap::new().cluster("models", sidecar.addr);
        for v in ["1", "2"] {
            b = b.route(Route::new("models").header(VERSION, v).regex_rewrite(
                "^/v2/models/([^/]+)/infer$",
                &format!("/v2/models/\\1/versions/{v}/infer"),
            ));
        }
        b = b.default_route("models").wasm(WasmFilter::new(
            "infermesh",
            &e2e::wasm::module(),
            json!({ "canary": canary }).to_string(),
        ));
        let envoy = Envoy::start(&b).await;
        Rig {
            envoy,
            _sidecar: sidecar,
            _dir: dir,
        }
    }

    /// Sends every case once; returns (label, served-by) per case.
    async fn send(&self, cases: &Cases) -> Vec<(Option<i64>, Option<String>)> {
        let reqs = cases
            .pixels
            .iter()
            .map(|p| Req::post(INFER, infer_body(p)))
            .collect();
        let resps = Client::new(self.envoy.listener)
            .connections(4)
            .send_all(reqs)
            .await;
        resps
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{}", r.text());
                let v: Value = serde_json::from_slice(&r.body).expect("OIP JSON");
                let label = v["outputs"]
                    .as_array()
                    .and_then(|o| o.iter().find(|o| o["name"] == "label"))
                    .and_then(|o| o["data"][0].as_i64());
                (label, r.header("x-infermesh-served-by"))
            })
            .collect()
    }

    /// Stats once every copy answered so far has been judged.
    async fn settled(&self, copies: f64) -> Stats {
        for _ in 0..100 {
            let s = self.envoy.stats().await;
            let done = stat(&s, AGREEMENTS)
                + stat(&s, DISAGREEMENTS)
                + stat(&s, NOT_COMPARED)
                + stat(&s, ERRORS);
            if done >= copies {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.envoy.stats().await
    }
}

fn stat(stats: &Stats, name: &str) -> f64 {
    stats.sum(name, &[("model", MODEL), ("version", "2")])
}

fn canary(shadow_extra: Value, guard: Option<Value>, schedule: Option<Value>) -> Value {
    let mut shadow = json!({
        "version": "2", "fraction": 1, "cluster": "models",
        "timeout_ms": 5000, "max_in_flight": 64,
        "compare": {"outputs": {"probabilities": "argmax"}},
    });
    if let (Some(s), Some(extra)) = (shadow.as_object_mut(), shadow_extra.as_object()) {
        s.extend(extra.clone());
    }
    let mut split = json!({
        "model": MODEL,
        "versions": [{"name": "1", "weight": 100}, {"name": "2", "weight": 0}],
        "shadow": shadow,
    });
    if let Some(g) = guard {
        split["guard"] = g;
    }
    if let Some(s) = schedule {
        split["schedule"] = s;
    }
    json!({"splits": [split]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreement_of_version_2_matches_onnxruntime_and_an_identical_candidate_reads_100() {
    let _bin = require_envoy!(
        "agreement_of_version_2_matches_onnxruntime_and_an_identical_candidate_reads_100"
    );
    let cases = cases();
    let n = cases.pixels.len();
    let expected = cases.agreement_pct();

    let rig = Rig::start(None, &canary(json!({}), None, None)).await;
    let answers = rig.send(&cases).await;
    for (i, ((label, served), want)) in answers.iter().zip(&cases.labels_v1).enumerate() {
        assert_eq!(served.as_deref(), Some("digits-mlp/1"), "case {i}");
        assert_eq!(
            *label,
            Some(*want),
            "case {i}: the client's answer is version 1's"
        );
    }
    let stats = rig.settled(n as f64).await;
    let (agree, disagree) = (stat(&stats, AGREEMENTS), stat(&stats, DISAGREEMENTS));
    assert_eq!(
        stat(&stats, REQUESTS),
        n as f64,
        "every request copied and answered"
    );
    assert_eq!(stat(&stats, ERRORS), 0.0);
    assert_eq!(stat(&stats, NOT_COMPARED), 0.0);
    let rate = 100.0 * agree / (agree + disagree);
    eprintln!(
        "digits-mlp v2 vs v1: agreement {rate:.2}% ({agree} of {}), onnxruntime {expected:.2}%",
        agree + disagree
    );
    assert!(
        (rate - expected).abs() <= 2.0,
        "agreement {rate:.2}% vs {expected:.2}% computed with onnxruntime"
    );
    assert!(disagree > 0.0, "the versions do differ");
    // The histogram of the difference is published (histograms reach the
    // admin output on Envoy's stats flush).
    let text = rig
        .envoy
        .admin_get("/stats?filter=shadow_difference")
        .await
        .text();
    assert!(
        text.contains("infermesh_shadow_difference_millionths"),
        "{text}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let same = identical_repo(dir.path());
    let rig = Rig::start(Some(&same), &canary(json!({}), None, None)).await;
    rig.send(&cases).await;
    let stats = rig.settled(n as f64).await;
    assert_eq!(
        stat(&stats, AGREEMENTS),
        n as f64,
        "an identical candidate agrees on all"
    );
    assert_eq!(stat(&stats, DISAGREEMENTS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promotion_gate_holds_the_schedule_until_agreement_is_reached() {
    let _bin = require_envoy!("the_promotion_gate_holds_the_schedule_until_agreement_is_reached");
    let cases = cases();
    // The schedule's step to 50% has come before any request.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    let start = mesh::rfc3339_utc(now.as_secs().saturating_sub(60));
    let schedule = json!({"start": start, "steps": [{"after_s": 0, "weights": {"2": 50}}]});
    let guard = json!({"min_shadow_agreement": 99, "min_shadow_samples": 100});

    // Version 2 agrees on ~97.6%: under 99, held at the base weights
    // (100/0) although the schedule says 50/50.
    let rig = Rig::start(
        None,
        &canary(json!({}), Some(guard.clone()), Some(schedule.clone())),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = rig.send(&cases).await;
    assert!(
        answers
            .iter()
            .all(|(_, s)| s.as_deref() == Some("digits-mlp/1")),
        "a held split sent live traffic to the candidate"
    );
    let stats = rig.settled(cases.pixels.len() as f64).await;
    assert_eq!(stats.sum(PROMOTION_HELD, &[("model", MODEL)]), 1.0);
    let log = rig.envoy.log();
    assert!(
        log.contains("infermesh canary guard: model digits-mlp promotion held"),
        "{}",
        e2e::envoy::tail(&log, 40)
    );
    assert!(!log.contains("promotion released"));

    // An identical candidate: released after 100 samples, then the
    // schedule's 50% applies.
    let dir = tempfile::tempdir().expect("temp dir");
    let same = identical_repo(dir.path());
    let rig = Rig::start(Some(&same), &canary(json!({}), Some(guard), Some(schedule))).await;
    let first = Cases {
        pixels: cases.pixels[..150].to_vec(),
        labels_v1: cases.labels_v1[..150].to_vec(),
        disagree: 0,
    };
    rig.send(&first).await;
    rig.settled(first.pixels.len() as f64 / 2.0).await;
    // The next guard flush takes the agreement in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = rig.send(&cases).await;
    let on_2 = answers
        .iter()
        .filter(|(_, s)| s.as_deref() == Some("digits-mlp/2"))
        .count();
    // 50% of 450 unkeyed: σ ≈ 10.6; ±60 is > 5σ.
    assert!((165..=285).contains(&on_2), "{on_2} of 450 on version 2");
    let stats = rig.envoy.stats().await;
    assert_eq!(stats.sum(PROMOTION_HELD, &[("model", MODEL)]), 0.0);
    assert!(rig.envoy.log().contains("promotion released"));
}
