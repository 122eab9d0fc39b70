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
        stdout(&ok).contains("validate: 5 passed, 0 failed"),
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
fn up_refuses_a_bad_model_repository_before_starting_anything() {
    for (args, needle) in [
        (
            &["up", "--model-repository", "mars=s3://b/p"][..],
            "no cloud \"mars\" (clouds: aws, gcp, azure)",
        ),
        (
            &["up", "--model-repository", "aws=/no/such/dir"][..],
            "/no/such/dir is not a directory",
        ),
        (
            &["up", "--model-repository", "gcp="][..],
            "empty repository",
        ),
        (
            &["up", "--repository-poll-s", "0"][..],
            "--repository-poll-s \"0\" is not a number of seconds",
        ),
        (
            &["demo", "--model-repository", "s3://b/p"][..],
            "demo runs on the example models",
        ),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
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

const FAILOVER: &str = "examples/config/failover.json";

fn explain_failover(extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["explain", "--config", FAILOVER];
    args.extend_from_slice(extra);
    let out = run(&args);
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn validate_checks_failover_configs_by_file_name_or_flag() {
    let ok = run(&["validate", FAILOVER]);
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(
        stdout(&ok).contains("ok    examples/config/failover.json (failover)"),
        "{}",
        stdout(&ok)
    );

    let dir = std::env::temp_dir().join(format!("infermesh-cli-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A residency tag no cloud carries would silently allow nothing.
    let text = std::fs::read_to_string(format!("../{FAILOVER}")).unwrap();
    let broken = text.replacen(r#""default": ["eu"]"#, r#""default": ["apac"]"#, 1);
    assert_ne!(broken, text, "the example changed shape; update this test");
    let by_name = dir.join("failover-eu.json");
    std::fs::write(&by_name, &broken).unwrap();
    let by_flag = dir.join("clouds.json");
    std::fs::write(&by_flag, &broken).unwrap();
    let named = run(&["validate", by_name.to_str().unwrap()]);
    let flagged = run(&[
        "validate",
        "--filter",
        "failover",
        by_flag.to_str().unwrap(),
    ]);
    let unnamed = run(&["validate", by_flag.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    for out in [&named, &flagged] {
        assert_eq!(out.status.code(), Some(1), "{}", stdout(out));
        assert!(
            stdout(out).contains(r#"residency.default[0]: no cloud carries tag "apac""#),
            "{}",
            stdout(out)
        );
    }
    assert_eq!(unnamed.status.code(), Some(1));
    assert!(
        stdout(&unnamed).contains("pass --filter (infermesh, model-router, canary, failover)"),
        "{}",
        stdout(&unnamed)
    );
}

#[test]
fn explain_failover_answers_503_when_the_residency_clouds_are_down() {
    let (code, text) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "x-data-residency: eu",
        "--down",
        "aws-eu,gcp-eu",
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(r#"residency: x-data-residency="eu" -> rules.eu: tags ["eu"]"#),
        "{text}"
    );
    assert!(text.contains("allowed:   aws-eu, gcp-eu "), "{text}");
    assert!(
        text.contains(
            r#"decision:  503 from the filter (none_healthy): {"error":"no healthy cloud can serve model \"digits-mlp\": 2 cloud(s) allowed under residency x-data-residency=\"eu\" (tags [\"eu\"]), none healthy","model":"digits-mlp","residency":{"header":"x-data-residency","tags":["eu"],"value":"eu"}}"#
        ),
        "{text}"
    );
    // The US cloud is healthy but not allowed: no pick, no replay to it.
    assert!(!text.contains("pick:"), "{text}");
    assert!(!text.contains("azure-us"), "{text}");

    // One EU cloud left: it is picked, and nothing is left to replay to.
    let (_, one) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "x-data-residency: eu",
        "--down",
        "aws-eu",
    ]);
    assert!(
        one.contains("sets:      x-infermesh-cloud: gcp-eu"),
        "{one}"
    );
    assert!(
        one.contains("replay to: none (then give up: no_cloud_left)"),
        "{one}"
    );
}

#[test]
fn explain_failover_picks_by_residency_priority_and_cost() {
    let (_, us) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "X-Data-Residency: US",
    ]);
    assert!(
        us.contains(r#"residency: x-data-residency="US" -> rules.us: tags ["us"]"#),
        "{us}"
    );
    assert!(us.contains("allowed:   azure-us "), "{us}");
    assert!(
        us.contains("sets:      x-infermesh-cloud: azure-us"),
        "{us}"
    );
    assert!(
        us.contains("response:  x-infermesh-served-by: ...@azure-us"),
        "{us}"
    );

    // global: every cloud; aws-eu and gcp-eu share priority 0 and the
    // cheaper one goes first; azure-us (priority 1) last despite its cost.
    let (_, global) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "x-data-residency: global",
        "-H",
        "x-infermesh-cloud: azure-us",
    ]);
    assert!(
        global.contains("allowed:   aws-eu, gcp-eu, azure-us "),
        "{global}"
    );
    assert!(global.contains("stripped:  x-infermesh-cloud"), "{global}");
    assert!(
        global.contains("sets:      x-infermesh-cloud: aws-eu"),
        "{global}"
    );
    assert!(
        global.contains("replay to: gcp-eu -> azure-us (then give up: attempts_exhausted)"),
        "{global}"
    );
    assert!(
        global.contains(
            "hedge:     if no answer within 50ms (fixed, hedge.models.digits-mlp): also to gcp-eu"
        ),
        "{global}"
    );

    // No header: the default (eu) applies.
    let (_, none) = explain_failover(&["--path", "/v2/models/digits-mlp/versions/2/ready"]);
    assert!(
        none.contains(r#"residency: no x-data-residency header -> default: tags ["eu"]"#),
        "{none}"
    );
    assert!(none.contains("request:   GET "), "{none}");
    assert!(
        none.contains("hedge:     off: only idempotent OIP infer requests"),
        "{none}"
    );
}

#[test]
fn explain_failover_rejects_unknown_residency_values() {
    let (code, text) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "-H",
        "x-data-residency: mars",
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(r#"x-data-residency="mars" matches no rule; on_unknown: reject -> no cloud"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"decision:  503 from the filter (none_allowed): {"error":"no cloud may serve model \"digits-mlp\" under residency x-data-residency=\"mars\", which no rule lists","model":"digits-mlp","residency":{"header":"x-data-residency","tags":[],"value":"mars"}}"#
        ),
        "{text}"
    );
}

#[test]
fn explain_failover_limits_replay_of_non_idempotent_and_large_requests() {
    let (_, post) = explain_failover(&[
        "--path",
        "/predict",
        "-X",
        "POST",
        "-H",
        "x-data-residency: global",
    ]);
    assert!(post.contains("replay:    not idempotent"), "{post}");
    assert!(
        post.contains("after a reset, timeout or 5xx: none (not_idempotent)"),
        "{post}"
    );
    // Still replayed when the first cloud was never reached.
    assert!(post.contains("replay to: gcp-eu -> azure-us"), "{post}");

    let dir = std::env::temp_dir().join(format!("infermesh-cli-body-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = dir.join("body.json");
    std::fs::write(&body, vec![b' '; 262_145]).unwrap();
    let (_, big) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "--body-file",
        body.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        big.contains("body:      262145 bytes, over replay.max_body_bytes 262144"),
        "{big}"
    );
    assert!(
        big.contains("replay to: none (then give up: body_not_buffered)"),
        "{big}"
    );

    let (code, err) = explain_failover(&[
        "--path",
        "/v2/models/digits-mlp/infer",
        "--down",
        "aws-west",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains(r#"--down: unknown cloud "aws-west""#), "{err}");
}

#[test]
fn explain_failover_reads_an_empty_model_header_as_the_filter_does() {
    // With downstream headers trusted, the model may come from
    // x-infermesh-model; an empty one names no model, in the 503 too.
    let dir = std::env::temp_dir().join(format!("infermesh-cli-trust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(format!("../{FAILOVER}")).unwrap();
    let trusting = text.replacen(
        r#""trust_downstream_headers": false"#,
        r#""trust_downstream_headers": true"#,
        1,
    );
    assert_ne!(
        trusting, text,
        "the example changed shape; update this test"
    );
    let cfg = dir.join("failover.json");
    std::fs::write(&cfg, &trusting).unwrap();
    let explain = |model: &str| {
        let out = run(&[
            "explain",
            "--config",
            cfg.to_str().unwrap(),
            "--path",
            "/predict",
            "-H",
            "x-data-residency: mars",
            "-H",
            model,
        ]);
        assert!(out.status.success(), "{}", stdout(&out));
        stdout(&out)
    };
    let empty = explain("x-infermesh-model:");
    let named = explain("x-infermesh-model: digits-mlp");
    std::fs::remove_dir_all(&dir).ok();
    assert!(empty.contains("model none named"), "{empty}");
    assert!(
        empty.contains(r#"{"error":"no cloud may serve this request under residency x-data-residency=\"mars\", which no rule lists","model":null,"#),
        "{empty}"
    );
    assert!(
        named.contains("model digits-mlp (trusted x-infermesh-model header)"),
        "{named}"
    );
    assert!(named.contains(r#""model":"digits-mlp""#), "{named}");
}

#[test]
fn explain_shows_the_guard_state_from_a_proxys_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("canary.json");
    std::fs::write(
        &cfg,
        r#"{"splits":[{"model":"digits-mlp",
             "versions":[{"name":"1","weight":50},{"name":"2","weight":50}],
             "guard":{"window_s":2,"min_requests":20,"max_error_rate":10,"max_p99_ms_over_baseline":100},
             "shadow":{"version":"2","fraction":0.05,"cluster":"v2"}}],
           "sticky_key":[{"header":"x-user-id"}]}"#,
    )
    .unwrap();
    // A key the configured 50/50 split sends to the canary.
    let user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|k| filter_core::hash::bucket("digits-mlp", k.as_bytes()) < 5_000)
        .unwrap();
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--config",
            cfg.to_str().unwrap(),
            "--path",
            "/v2/models/digits-mlp/infer",
            "-H",
        ];
        let header = format!("x-user-id: {user}");
        args.push(&header);
        args.extend_from_slice(extra);
        let out = run(&args);
        (
            out.status.code(),
            stdout(&out),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, text, _) = explain(&[]);
    assert_eq!(code, Some(0));
    assert!(text.contains("sets:      x-infermesh-version: 2"), "{text}");
    assert!(
        text.contains("guard:     error rate > 10.00%, p99 > baseline + 100 ms over 2000 ms with >= 20 requests; rollback until the config changes"),
        "{text}"
    );
    assert!(text.contains("state unknown"), "{text}");
    assert!(
        text.contains("shadow:    5.00% of the baseline's split infer requests copied to version 2 (cluster v2)"),
        "{text}"
    );

    // Envoy's /stats/prometheus after the guard tripped (as the e2e test
    // reads it): the canary's state 1 and weights moved to the baseline.
    let tripped = dir.path().join("tripped.prom");
    std::fs::write(
        &tripped,
        "# TYPE infermesh_canary_guard_state gauge\n\
         infermesh_canary_guard_state{model=\"digits-mlp\",version=\"1\"} 0\n\
         infermesh_canary_guard_state{model=\"digits-mlp\",version=\"2\"} 1\n\
         infermesh_canary_guard_trips_total{model=\"digits-mlp\",version=\"2\",reason=\"error_rate\"} 1\n\
         infermesh_canary_guard_trips_total{model=\"digits-mlp\",version=\"2\",reason=\"p99_over_baseline\"} 0\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"1\"} 10000\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"2\"} 0\n",
    )
    .unwrap();
    let (code, text, _) = explain(&["--stats", tripped.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("guard:     version 2: tripped (trips: error_rate x1)"),
        "{text}"
    );
    assert!(
        text.contains("1=100.00% 2=0.00% (no schedule; the guard's weights, from the stats)"),
        "{text}"
    );
    assert!(text.contains("sets:      x-infermesh-version: 1"), "{text}");

    let normal = dir.path().join("normal.prom");
    std::fs::write(
        &normal,
        "infermesh_canary_guard_state{model=\"digits-mlp\",version=\"2\"} 0\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"1\"} 5000\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"2\"} 5000\n",
    )
    .unwrap();
    let (_, text, _) = explain(&["--stats", normal.to_str().unwrap()]);
    assert!(text.contains("guard:     version 2: normal"), "{text}");
    assert!(text.contains("sets:      x-infermesh-version: 2"), "{text}");

    let garbage = dir.path().join("garbage.prom");
    std::fs::write(&garbage, "infermesh_canary_guard_state{model= 1\n").unwrap();
    let (code, _, err) = explain(&["--stats", garbage.to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(err.contains("unreadable stats line 1"), "{err}");
    let (code, _, err) = explain(&["--stats", "/nonexistent/stats.prom"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("/nonexistent/stats.prom"), "{err}");
}

#[test]
fn explain_shows_shadow_agreement_and_a_held_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("canary.json");
    std::fs::write(
        &cfg,
        r#"{"splits":[{"model":"digits-mlp",
             "versions":[{"name":"1","weight":100},{"name":"2","weight":0}],
             "schedule":{"start":"2020-01-01T00:00:00Z","steps":[{"after_s":0,"weights":{"2":50}}]},
             "guard":{"min_shadow_agreement":99,"min_shadow_samples":100},
             "shadow":{"version":"2","fraction":0.2,"cluster":"v2",
                       "compare":{"outputs":{"probabilities":"argmax"}}}}]}"#,
    )
    .unwrap();
    let stats = dir.path().join("held.prom");
    std::fs::write(
        &stats,
        "infermesh_canary_promotion_held{model=\"digits-mlp\"} 1\n\
         infermesh_canary_guard_state{model=\"digits-mlp\",version=\"2\"} 0\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"1\"} 10000\n\
         infermesh_canary_weight_bp{model=\"digits-mlp\",version=\"2\"} 0\n\
         infermesh_shadow_agreements_total{model=\"digits-mlp\",version=\"2\"} 439\n\
         infermesh_shadow_disagreements_total{model=\"digits-mlp\",version=\"2\"} 11\n\
         infermesh_shadow_errors_total{model=\"digits-mlp\",version=\"2\"} 0\n",
    )
    .unwrap();
    let out = run(&[
        "explain",
        "--config",
        cfg.to_str().unwrap(),
        "--path",
        "/v2/models/digits-mlp/infer",
        "--stats",
        stats.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("shadow:    agreement 97.56% (439 of 450 compared; 0 copies failed)"),
        "{text}"
    );
    assert!(
        text.contains("schedule held while shadow agreement < 99.00% or < 100 compared"),
        "{text}"
    );
    assert!(
        text.contains("guard:     promotion held (the schedule does not step)"),
        "{text}"
    );
    // Held at the base weights although the schedule says 50/50.
    assert!(
        text.contains("1=100.00% 2=0.00% (schedule step 0; the guard's weights, from the stats)"),
        "{text}"
    );
}
