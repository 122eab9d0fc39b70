use super::*;

fn err(json: &str) -> ConfigError {
    match parse(json.as_bytes()) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e,
    }
}

const GOOD: &str = r#"{
  "splits": [{
    "model": "digits-mlp",
    "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}],
    "schedule": {"start": "2026-12-01T09:00:00Z",
                 "steps": [{"after_s": 0, "weights": {"2": 1}},
                           {"after_s": 600, "weights": {"1": 75, "2": 25}}]}
  }, {
    "model": "tiny-cnn",
    "versions": [{"name": "a", "weight": 70}, {"name": "b", "weight": 20}, {"name": "c", "weight": 10}]
  }],
  "sticky_key": [{"header": "x-user-id"}, {"cookie": "uid"}],
  "override_header": "x-test-version"
}"#;

#[test]
fn parses_a_full_config() {
    let c = parse(GOOD.as_bytes()).unwrap();
    assert_eq!(c.splits.len(), 2);
    let s = &c.splits[0];
    assert_eq!(s.versions, ["1", "2"]);
    assert_eq!(s.base.as_bp(), [9_000, 1_000]);
    let sched = s.schedule.as_ref().unwrap();
    let start = parse_rfc3339("2026-12-01T09:00:00Z").unwrap();
    assert_eq!(sched.steps()[0].at_ms, start);
    assert_eq!(sched.steps()[0].weights.as_bp(), [9_900, 100]);
    assert_eq!(sched.steps()[1].at_ms, start + 600_000);
    assert_eq!(sched.steps()[1].weights.as_bp(), [7_500, 2_500]);
    assert_eq!(s.weights_at(start - 1).as_bp(), [9_000, 1_000]);
    assert_eq!(s.weights_at(start + 1).as_bp(), [9_900, 100]);
    assert_eq!(c.splits[1].base.as_bp(), [7_000, 2_000, 1_000]);
    assert_eq!(
        c.sticky_key,
        [
            KeySource::Header("x-user-id".into()),
            KeySource::Cookie("uid".into())
        ]
    );
    assert_eq!(c.override_header.as_deref(), Some("x-test-version"));
    assert!(!c.trust_downstream_headers);
    assert!(c.served_by_header);
}

#[test]
fn defaults() {
    let c = parse(br#"{"splits":[{"model":"m","versions":[{"name":"a","weight":50},{"name":"b","weight":50}]}]}"#)
        .unwrap();
    assert!(c.sticky_key.is_empty());
    assert_eq!(
        c.override_header.as_deref(),
        Some(headers::DEFAULT_OVERRIDE)
    );
    let off = parse(
        br#"{"override_header":"","splits":[{"model":"m","versions":[{"name":"a","weight":50},{"name":"b","weight":50}]}]}"#,
    )
    .unwrap();
    assert_eq!(off.override_header, None);
    let fractional = parse(
        br#"{"splits":[{"model":"m","versions":[{"name":"a","weight":99.75},{"name":"b","weight":0.25}]}]}"#,
    )
    .unwrap();
    assert_eq!(fractional.splits[0].base.as_bp(), [9_975, 25]);
}

#[test]
fn every_bad_field_is_named() {
    let v2 = r#"[{"name":"a","weight":90},{"name":"b","weight":10}]"#;
    let cases: Vec<(String, &str, &str)> = vec![
        ("".into(), ".", "missing field `splits`"),
        ("{}".into(), ".", "missing field `splits`"),
        ("[]".into(), ".", "must be a JSON object"),
        ("{".into(), ".", "EOF"),
        (r#"{"splits":[]}"#.into(), "splits", "at least one"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"bogus":1}}"#), "bogus", "unknown field `bogus`"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"extra":true}}]}}"#), "splits[0].extra", "unknown field `extra`"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":90,"w":1},{"name":"b","weight":10}]}]}"#.into(), "splits[0].versions[0].w", "unknown field `w`"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":90},{"name":"b","weight":9}]}]}"#.into(), "splits[0].versions", "sum to 99%"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":100}]}]}"#.into(), "splits[0].versions", "at least two"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":50},{"name":"a","weight":50}]}]}"#.into(), "splits[0].versions[1].name", "listed twice"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"","weight":50},{"name":"b","weight":50}]}]}"#.into(), "splits[0].versions[0].name", "empty"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":-1},{"name":"b","weight":101}]}]}"#.into(), "splits[0].versions[0].weight", "between 0 and 100"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":"90"},{"name":"b","weight":10}]}]}"#.into(), "splits[0].versions[0].weight", "invalid type"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":89.995},{"name":"b","weight":10.005}]}]}"#.into(), "splits[0].versions[0].weight", "two decimals"),
        (r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":20},{"name":"b","weight":60},{"name":"c","weight":20}]}]}"#.into(), "splits[0].versions", "at most 50%"),
        (format!(r#"{{"splits":[{{"model":"bad/name","versions":{v2}}}]}}"#), "splits[0].model", "not a valid name"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}},{{"model":"m","versions":{v2}}}]}}"#), "splits[1].model", "more than one split"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"tomorrow","steps":[{{"after_s":0,"weights":{{"b":1}}}}]}}}}]}}"#), "splits[0].schedule.start", "RFC 3339"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[]}}}}]}}"#), "splits[0].schedule.steps", "at least one step"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[{{"after_s":5,"weights":{{"b":1}}}},{{"after_s":5,"weights":{{"b":2}}}}]}}}}]}}"#), "splits[0].schedule.steps[1].after_s", "increasing"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[{{"after_s":0,"weights":{{"zz":1}}}}]}}}}]}}"#), "splits[0].schedule.steps[0].weights.zz", "not one of"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[{{"after_s":0,"weights":{{"a":50,"b":40}}}}]}}}}]}}"#), "splits[0].schedule.steps[0].weights", "sum to 90%"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[{{"after_s":-1,"weights":{{"b":1}}}}]}}}}]}}"#), "splits[0].schedule.steps[0].after_s", "invalid value"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2},"schedule":{{"start":"2026-12-01T09:00:00Z","steps":[{{"after_s":18446744073709551615,"weights":{{"b":1}}}}]}}}}]}}"#), "splits[0].schedule.steps[0].after_s", "future"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"sticky_key":[{{"header":"X-User"}}]}}"#), "sticky_key[0].header", "lower-case"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"sticky_key":[{{"header":"x-infermesh-user"}}]}}"#), "sticky_key[0].header", "removed from downstream"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"sticky_key":[{{"cookie":"a;b"}}]}}"#), "sticky_key[0].cookie", "not a cookie name"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"sticky_key":[{{"ip":"x"}}]}}"#), "sticky_key[0]", "unknown variant `ip`"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"sticky_key":[{{"header":"cookie"}}]}}"#), "sticky_key[0].header", "cookie"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"override_header":"x-infermesh-version"}}"#), "override_header", "removed from downstream"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}],"trust_downstream_headers":"yes"}}"#), "trust_downstream_headers", "invalid type"),
        (format!(r#"{{"splits":[{{"model":"m","versions":{v2}}}]}} trailing"#), ".", "trailing"),
    ];
    for (json, path, needle) in cases {
        let e = err(&json);
        assert_eq!(e.path, path, "{json}\n=> {e}");
        assert!(
            e.to_string().contains(needle),
            "{json}\n=> {e} (wanted {needle:?})"
        );
    }
}

#[test]
fn size_and_count_limits() {
    let big = vec![b' '; crate::config::MAX_CONFIG_BYTES + 1];
    assert!(err(std::str::from_utf8(&big).unwrap())
        .message
        .contains("limit"));
    let versions: Vec<String> = (0..=MAX_VERSIONS)
        .map(|i| format!(r#"{{"name":"v{i}","weight":0}}"#))
        .collect();
    let json = format!(
        r#"{{"splits":[{{"model":"m","versions":[{}]}}]}}"#,
        versions.join(",")
    );
    assert_eq!(err(&json).path, "splits[0].versions");
}

fn guarded(guard: &str) -> Result<CanaryConfig, ConfigError> {
    let json = format!(
        r#"{{"splits":[{{"model":"m","versions":[{{"name":"a","weight":90}},{{"name":"b","weight":10}}],"guard":{guard}}}]}}"#
    );
    parse(json.as_bytes())
}

#[test]
fn guard_parses_with_defaults() {
    let c = guarded(r#"{"max_error_rate":5}"#).unwrap();
    let g = c.splits[0].guard.clone().unwrap();
    assert_eq!(g.window_ms, 10_000);
    assert_eq!(g.min_requests, GUARD_MIN_REQUESTS);
    assert_eq!(g.max_error_rate_bp, Some(500));
    assert_eq!(g.max_error_rate_over_baseline_bp, None);
    assert_eq!(g.max_p99_ms_over_baseline, None);
    assert_eq!(g.action, GuardAction::Rollback);
    assert_eq!(g.cool_off_ms, None);
    assert_eq!(g.probe_bp, 100);
    let full = guarded(
        r#"{"window_s":0.5,"min_requests":1,"max_error_rate":0,"max_error_rate_over_baseline":2.5,
            "max_p99_ms_over_baseline":200,"action":"freeze","cool_off_s":30,"probe_percent":0.5}"#,
    )
    .unwrap();
    let g = full.splits[0].guard.clone().unwrap();
    assert_eq!(
        (g.window_ms, g.min_requests, g.max_error_rate_bp),
        (500, 1, Some(0))
    );
    assert_eq!(g.max_error_rate_over_baseline_bp, Some(250));
    assert_eq!(g.max_p99_ms_over_baseline, Some(200));
    assert_eq!(g.action, GuardAction::Freeze);
    assert_eq!((g.cool_off_ms, g.probe_bp), (Some(30_000), 50));
    assert_eq!(parse(GOOD.as_bytes()).unwrap().splits[0].guard, None);
}

#[test]
fn every_bad_guard_field_is_named() {
    let cases: &[(&str, &str, &str)] = &[
        ("{}", "splits[0].guard", "at least one rule"),
        (r#"{"window_s":5}"#, "splits[0].guard", "at least one rule"),
        (
            r#"{"max_error_rate":5,"window_s":0.1}"#,
            "splits[0].guard.window_s",
            "between 0.5 and 3600",
        ),
        (
            r#"{"max_error_rate":5,"window_s":4000}"#,
            "splits[0].guard.window_s",
            "between",
        ),
        (
            r#"{"max_error_rate":5,"window_s":"10"}"#,
            "splits[0].guard.window_s",
            "invalid type",
        ),
        (
            r#"{"max_error_rate":5,"min_requests":0}"#,
            "splits[0].guard.min_requests",
            "between 1",
        ),
        (
            r#"{"max_error_rate":5,"min_requests":-3}"#,
            "splits[0].guard.min_requests",
            "invalid value",
        ),
        (
            r#"{"max_error_rate":5,"min_requests":2000000}"#,
            "splits[0].guard.min_requests",
            "between 1",
        ),
        (
            r#"{"max_error_rate":100}"#,
            "splits[0].guard.max_error_rate",
            "not including",
        ),
        (
            r#"{"max_error_rate":-1}"#,
            "splits[0].guard.max_error_rate",
            "percentage",
        ),
        (
            r#"{"max_error_rate":5.001}"#,
            "splits[0].guard.max_error_rate",
            "two decimals",
        ),
        (
            r#"{"max_error_rate_over_baseline":120}"#,
            "splits[0].guard.max_error_rate_over_baseline",
            "percentage",
        ),
        (
            r#"{"max_p99_ms_over_baseline":0}"#,
            "splits[0].guard.max_p99_ms_over_baseline",
            "between 1",
        ),
        (
            r#"{"max_p99_ms_over_baseline":600001}"#,
            "splits[0].guard.max_p99_ms_over_baseline",
            "between 1",
        ),
        (
            r#"{"max_p99_ms_over_baseline":1.5}"#,
            "splits[0].guard.max_p99_ms_over_baseline",
            "invalid type",
        ),
        (
            r#"{"max_error_rate":5,"action":"panic"}"#,
            "splits[0].guard.action",
            "unknown variant `panic`",
        ),
        (
            r#"{"max_error_rate":5,"cool_off_s":0}"#,
            "splits[0].guard.cool_off_s",
            "between 1",
        ),
        (
            r#"{"max_error_rate":5,"cool_off_s":99999999}"#,
            "splits[0].guard.cool_off_s",
            "between 1",
        ),
        (
            r#"{"max_error_rate":5,"probe_percent":5}"#,
            "splits[0].guard.probe_percent",
            "needs cool_off_s",
        ),
        (
            r#"{"max_error_rate":5,"cool_off_s":5,"probe_percent":0}"#,
            "splits[0].guard.probe_percent",
            "never recover",
        ),
        (
            r#"{"max_error_rate":5,"cool_off_s":5,"probe_percent":101}"#,
            "splits[0].guard.probe_percent",
            "between 0 and 100",
        ),
        (
            r#"{"max_error_rate":5,"max_latency":3}"#,
            "splits[0].guard.max_latency",
            "unknown field",
        ),
        (r#""on""#, "splits[0].guard", "invalid type"),
        (
            r#"{"min_shadow_agreement":0}"#,
            "splits[0].guard.min_shadow_agreement",
            "above 0 and at most 100",
        ),
        (
            r#"{"min_shadow_agreement":100.5}"#,
            "splits[0].guard.min_shadow_agreement",
            "above 0 and at most 100",
        ),
        (
            r#"{"max_error_rate":5,"min_shadow_samples":10}"#,
            "splits[0].guard.min_shadow_samples",
            "needs min_shadow_agreement",
        ),
        (
            r#"{"min_shadow_agreement":98,"min_shadow_samples":0}"#,
            "splits[0].guard.min_shadow_samples",
            "between 1",
        ),
        (
            r#"{"min_shadow_agreement":98}"#,
            "splits[0].guard.min_shadow_agreement",
            "needs a shadow on the split",
        ),
    ];
    for (guard, path, needle) in cases {
        let e = match guarded(guard) {
            Ok(c) => panic!("accepted {guard}: {c:?}"),
            Err(e) => e,
        };
        assert_eq!(e.path, *path, "{guard}\n=> {e}");
        assert!(
            e.to_string().contains(needle),
            "{guard}\n=> {e} (wanted {needle:?})"
        );
    }
}

fn shadowed(shadow: &str) -> Result<CanaryConfig, ConfigError> {
    let json = format!(
        r#"{{"splits":[{{"model":"m","versions":[{{"name":"a","weight":100}},{{"name":"b","weight":0}}],"shadow":{shadow}}}]}}"#
    );
    parse(json.as_bytes())
}

#[test]
fn shadow_parses_with_defaults() {
    let c =
        shadowed(r#"{"version":"b","fraction":0.2,"cluster":"outbound|8000|v2|m.ns"}"#).unwrap();
    let s = c.splits[0].shadow.clone().unwrap();
    assert_eq!(s.version, 1);
    assert_eq!(s.fraction_bp, 2_000);
    assert_eq!(s.cluster, "outbound|8000|v2|m.ns");
    assert_eq!(s.authority, s.cluster);
    assert_eq!(
        (s.timeout_ms, s.max_in_flight, s.max_body_bytes),
        (
            SHADOW_TIMEOUT_MS,
            SHADOW_MAX_IN_FLIGHT,
            SHADOW_MAX_BODY_BYTES
        )
    );
    let full = shadowed(
        r#"{"version":"b","fraction":1,"cluster":"v2","authority":"m.ns","timeout_ms":50,"max_in_flight":1,"max_body_bytes":10}"#,
    )
    .unwrap();
    let s = full.splits[0].shadow.clone().unwrap();
    assert_eq!((s.fraction_bp, s.authority.as_str()), (10_000, "m.ns"));
    assert_eq!(
        (s.timeout_ms, s.max_in_flight, s.max_body_bytes),
        (50, 1, 10)
    );
}

#[test]
fn shadow_compare_and_promotion_gate_parse() {
    let json = r#"{"splits":[{"model":"m","versions":[{"name":"a","weight":100},{"name":"b","weight":0}],
        "guard":{"min_shadow_agreement":97.5},
        "shadow":{"version":"b","fraction":0.2,"cluster":"v2",
                  "compare":{"abs_tolerance":0.01,"outputs":{"label":"exact","probabilities":"argmax"}}}}]}"#;
    let c = parse(json.as_bytes()).unwrap();
    let split = &c.splits[0];
    let gate = split.guard.as_ref().unwrap().promotion.unwrap();
    assert_eq!(gate.min_agreement_bp, 9_750);
    assert_eq!(gate.min_samples, GUARD_MIN_SHADOW_SAMPLES);
    let cmp = &split.shadow.as_ref().unwrap().compare;
    assert_eq!(cmp.abs_tolerance, 0.01);
    assert_eq!(cmp.rel_tolerance, SHADOW_REL_TOLERANCE);
    assert_eq!(cmp.outputs.get("probabilities"), Some(&OutputMode::Argmax));
}

#[test]
fn every_bad_shadow_field_is_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"version":"z","fraction":0.2,"cluster":"v2"}"#,
            "splits[0].shadow.version",
            "not one of the split's versions",
        ),
        (
            r#"{"version":"a","fraction":0.2,"cluster":"v2"}"#,
            "splits[0].shadow.version",
            "is the baseline",
        ),
        (
            r#"{"version":"b","fraction":0,"cluster":"v2"}"#,
            "splits[0].shadow.fraction",
            "above 0 and at most 1",
        ),
        (
            r#"{"version":"b","fraction":1.5,"cluster":"v2"}"#,
            "splits[0].shadow.fraction",
            "above 0 and at most 1",
        ),
        (
            r#"{"version":"b","fraction":-0.1,"cluster":"v2"}"#,
            "splits[0].shadow.fraction",
            "above 0 and at most 1",
        ),
        (
            r#"{"version":"b","fraction":0.123456,"cluster":"v2"}"#,
            "splits[0].shadow.fraction",
            "two decimals",
        ),
        (
            r#"{"version":"b","cluster":"v2"}"#,
            "splits[0].shadow",
            "missing field `fraction`",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":""}"#,
            "splits[0].shadow.cluster",
            "not a valid cluster name",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"a b"}"#,
            "splits[0].shadow.cluster",
            "not a valid cluster name",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","authority":""}"#,
            "splits[0].shadow.authority",
            "not a valid authority",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","timeout_ms":0}"#,
            "splits[0].shadow.timeout_ms",
            "between 1 and 60000",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","max_in_flight":0}"#,
            "splits[0].shadow.max_in_flight",
            "between 1 and 10000",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","max_body_bytes":99999999}"#,
            "splits[0].shadow.max_body_bytes",
            "between 1 and",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","mirror":true}"#,
            "splits[0].shadow.mirror",
            "unknown field",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","compare":{"abs_tolerance":-1}}"#,
            "splits[0].shadow.compare.abs_tolerance",
            "at least 0",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","compare":{"rel_tolerance":"x"}}"#,
            "splits[0].shadow.compare.rel_tolerance",
            "invalid type",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","compare":{"outputs":{"p":"close"}}}"#,
            "splits[0].shadow.compare.outputs.p",
            "unknown variant `close`",
        ),
        (
            r#"{"version":"b","fraction":0.2,"cluster":"v2","compare":{"outputs":{"":"exact"}}}"#,
            "splits[0].shadow.compare.outputs",
            "not an output name",
        ),
    ];
    for (shadow, path, needle) in cases {
        let e = match shadowed(shadow) {
            Ok(c) => panic!("accepted {shadow}: {c:?}"),
            Err(e) => e,
        };
        assert_eq!(e.path, *path, "{shadow}\n=> {e}");
        assert!(
            e.to_string().contains(needle),
            "{shadow}\n=> {e} (wanted {needle:?})"
        );
    }
}
