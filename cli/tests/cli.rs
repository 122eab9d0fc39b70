//! The `infermesh` binary as a user runs it: exit codes and output.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infermesh"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn validate_reports_each_config_and_fails_on_a_bad_one() {
    let ok = run(&["validate", "istio", "examples/config/canary.json"]);
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(
        stdout(&ok).contains("validate: 4 passed, 0 failed"),
        "{}",
        stdout(&ok)
    );

    let dir = std::env::temp_dir().join(format!("infermesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("canary.json");
    std::fs::write(
        &bad,
        r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":50}],"x":1}]}"#,
    )
    .unwrap();
    let out = run(&["validate", bad.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("splits[0].x: unknown field `x`"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn usage_errors_exit_64() {
    assert_eq!(run(&[]).status.code(), Some(64));
    assert_eq!(run(&["validate"]).status.code(), Some(64));
    assert_eq!(run(&["explain", "--config"]).status.code(), Some(64));
    assert_eq!(
        run(&["validate", "--filter", "nope", "x.json"])
            .status
            .code(),
        Some(64)
    );
}

#[test]
fn explain_matches_the_core_decision() {
    let cfg = filter_core::config::canary::parse(
        &std::fs::read("../examples/config/canary.json").unwrap(),
    )
    .unwrap();
    let at = "2026-12-02T10:00:00Z";
    let now = filter_core::schedule::parse_rfc3339(at).unwrap();
    // The step in force a day after the start is 75/25.
    assert_eq!(cfg.splits[0].weights_at(now).as_bp(), [7_500, 2_500]);
    for user in ["alice", "bob", "carol", "dave"] {
        let out = run(&[
            "explain",
            "--config",
            "examples/config/canary.json",
            "--path",
            "/v2/models/digits-mlp/infer",
            "-H",
            &format!("x-user-id: {user}"),
            "-H",
            "x-infermesh-version: 2",
            "--at",
            at,
        ]);
        assert!(out.status.success());
        let text = stdout(&out);
        let b = filter_core::hash::bucket("digits-mlp", user.as_bytes());
        let want = if b < 2_500 { "2" } else { "1" };
        assert!(text.contains(&format!("bucket {b} of 10000")), "{text}");
        assert!(
            text.contains(&format!("sets:      x-infermesh-version: {want}")),
            "{user}: {text}"
        );
        assert!(text.contains("stripped:  x-infermesh-version"), "{text}");
        assert!(
            text.contains("1=75.00% 2=25.00% (schedule step 2)"),
            "{text}"
        );
    }
    let pinned = stdout(&run(&[
        "explain",
        "--config",
        "examples/config/canary.json",
        "--path",
        "/v2/models/digits-mlp/versions/2/infer",
    ]));
    assert!(pinned.contains("pinned to version 2"), "{pinned}");
    let other = stdout(&run(&[
        "explain",
        "--config",
        "examples/config/canary.json",
        "--path",
        "/v2/models/x/infer",
    ]));
    assert!(other.contains("untouched"), "{other}");
}

#[test]
fn explain_router_names_sources_aliases_and_rejections() {
    let cfg = "examples/config/model-router.json";
    let alias = stdout(&run(&[
        "explain",
        "--config",
        cfg,
        "--path",
        "/v2/models/digits-mlp/versions/canary/infer",
    ]));
    assert!(
        alias.contains("sets:      x-infermesh-version: 2"),
        "{alias}"
    );
    assert!(
        alias.contains("rewrite:   :path -> /v2/models/digits-mlp/versions/2/infer"),
        "{alias}"
    );
    let body = stdout(&run(&[
        "explain",
        "--config",
        cfg,
        "--path",
        "/predict",
        "--body",
        r#"{"model":"tiny-cnn","parameters":{"model_version":"stable"}}"#,
    ]));
    assert!(
        body.contains("sets:      x-infermesh-model: tiny-cnn"),
        "{body}"
    );
    assert!(
        body.contains("version:   1 (pinned, from the body"),
        "{body}"
    );
    let bad_body = stdout(&run(&[
        "explain", "--config", cfg, "--path", "/predict", "--body", "{oops",
    ]));
    assert!(bad_body.contains("untouched (not_oip)"), "{bad_body}");
    let header = stdout(&run(&[
        "explain",
        "--config",
        cfg,
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "X-Model-Version: stable",
    ]));
    assert!(
        header.contains("version:   1 (pinned, from the header"),
        "{header}"
    );
    let unknown = stdout(&run(&[
        "explain",
        "--config",
        cfg,
        "--path",
        "/v2/models/nope/infer",
    ]));
    assert!(
        unknown.contains(
            r#"404 from the filter (unknown_model): {"error":"model \"nope\" is not served here"}"#
        ),
        "{unknown}"
    );
}
