use crate::config::failover::parse;
use crate::config::ConfigError;

fn err(json: &str) -> ConfigError {
    match parse(json.as_bytes()) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn every_bad_setting_is_named() {
    let one = r#""clouds":[{"name":"a","cluster":"ca"}]"#;
    let with = |extra: &str| format!("{{{one},{extra}}}");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            with(r#""health":{"probe":{"interval_ms":50}}"#),
            "health.probe.interval_ms",
            "between 100ms and 300000ms",
        ),
        (
            with(r#""health":{"probe":{"timeout_ms":5}}"#),
            "health.probe.timeout_ms",
            "between 10ms",
        ),
        (
            with(r#""health":{"probe":{"interval_ms":1000,"timeout_ms":2000}}"#),
            "health.probe.timeout_ms",
            "overlap",
        ),
        (
            with(r#""health":{"probe":{"healthy_threshold":0}}"#),
            "health.probe.healthy_threshold",
            "between 1 and 1000",
        ),
        (
            with(r#""health":{"probe":{"unhealthy_threshold":1001}}"#),
            "health.probe.unhealthy_threshold",
            "between 1 and 1000",
        ),
        (
            with(r#""health":{"probe":{"models":[{"model":"m/x"}]}}"#),
            "health.probe.models[0].model",
            "not a valid name",
        ),
        (
            with(r#""health":{"probe":{"models":[{"model":"m","version":""}]}}"#),
            "health.probe.models[0].version",
            "empty",
        ),
        (
            with(r#""health":{"probe":{"models":[{"model":"m"},{"model":"m"}]}}"#),
            "health.probe.models[1]",
            "probed twice",
        ),
        (
            with(r#""health":{"passive":{"consecutive_failures":0}}"#),
            "health.passive.consecutive_failures",
            "between 1",
        ),
        (
            with(r#""health":{"passive":{"failure_rate":{"percent":0}}}"#),
            "health.passive.failure_rate.percent",
            "between 1% and 100%",
        ),
        (
            with(r#""health":{"passive":{"failure_rate":{"percent":101}}}"#),
            "health.passive.failure_rate.percent",
            "between 1% and 100%",
        ),
        (
            with(r#""health":{"passive":{"failure_rate":{"percent":50,"min_requests":0}}}"#),
            "health.passive.failure_rate.min_requests",
            "between 1",
        ),
        (
            with(r#""health":{"passive":{"failure_rate":{"percent":50,"window_ms":10}}}"#),
            "health.passive.failure_rate.window_ms",
            "between 1000ms",
        ),
        (
            with(r#""health":{"passive":{"failure_rate":{"min_requests":5}}}"#),
            "health.passive.failure_rate",
            "missing field `percent`",
        ),
        (
            with(r#""health":{"active":{}}"#),
            "health.active",
            "unknown field",
        ),
        (
            with(r#""replay":{"max_attempts":0}"#),
            "replay.max_attempts",
            "between 1 and 8",
        ),
        (
            with(r#""replay":{"max_attempts":9}"#),
            "replay.max_attempts",
            "between 1 and 8",
        ),
        (
            with(r#""replay":{"max_body_bytes":16777217}"#),
            "replay.max_body_bytes",
            "16777216 bytes",
        ),
        (
            with(r#""replay":{"per_try_timeout_ms":5}"#),
            "replay.per_try_timeout_ms",
            "between 10ms",
        ),
        (
            with(r#""replay":{"total_deadline_ms":600001}"#),
            "replay.total_deadline_ms",
            "600000ms",
        ),
        (
            with(r#""replay":{"per_try_timeout_ms":5000,"total_deadline_ms":4000}"#),
            "replay.total_deadline_ms",
            "shorter than per_try_timeout_ms",
        ),
        (
            with(r#""hedge":{"delay_ms":0}"#),
            "hedge.delay_ms",
            "between 1ms",
        ),
        (
            with(r#""replay":{"per_try_timeout_ms":100},"hedge":{"delay_ms":100}"#),
            "hedge.delay_ms",
            "below replay.per_try_timeout_ms",
        ),
        (
            with(r#""hedge":{"delay_ms":50,"percentile":90}"#),
            "hedge.percentile",
            "derived delay",
        ),
        (
            with(r#""hedge":{"percentile":40}"#),
            "hedge.percentile",
            "between 50 and 99",
        ),
        (
            with(r#""hedge":{"min_delay_ms":0}"#),
            "hedge.min_delay_ms",
            "between 1ms",
        ),
        (
            with(r#""hedge":{"min_delay_ms":300,"max_delay_ms":200}"#),
            "hedge.max_delay_ms",
            "between 300ms",
        ),
        (
            with(r#""hedge":{"models":{"m":{"delay_ms":0}}}"#),
            "hedge.models.m.delay_ms",
            "between 1ms",
        ),
        (
            with(r#""hedge":{"models":{"a b":{"enabled":false}}}"#),
            "hedge.models.a b",
            "not a valid name",
        ),
        (
            with(r#""hedge":{"models":{"m":{"on":false}}}"#),
            "hedge.models.m.on",
            "unknown field",
        ),
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
