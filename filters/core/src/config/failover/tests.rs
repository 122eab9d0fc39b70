use super::*;

fn err(json: &str) -> ConfigError {
    match parse(json.as_bytes()) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e,
    }
}

/// The JSON example in the module docs, so the documented config is the
/// tested one.
fn doc_example() -> String {
    let src = include_str!("../failover.rs");
    let lines: Vec<&str> = src
        .lines()
        .skip_while(|l| *l != "//! ```json")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| l.strip_prefix("//!").unwrap_or(l))
        .collect();
    assert!(!lines.is_empty(), "no ```json block in the module docs");
    lines.join("\n")
}

#[test]
fn parses_the_documented_example() {
    let c = parse(doc_example().as_bytes()).unwrap();
    let names: Vec<&str> = c.clouds.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["aws-eu", "gcp-eu", "aws-us"]);
    // priority 0 before 1; among priority 0, cost 1.0 before 1.4.
    assert_eq!(c.order, [0, 1, 2]);
    let aws = &c.clouds[0];
    assert_eq!(aws.authority, "inference.aws-eu.example.com");
    assert_eq!(
        c.clouds[1].authority, c.clouds[1].cluster,
        "defaults to the cluster"
    );
    assert_eq!(aws.tags, ["eu", "aws"]);

    let r = &c.residency;
    assert_eq!(r.header.as_deref(), Some("x-data-residency"));
    let rule = |v: &str| {
        r.rules
            .iter()
            .find(|x| x.value == v)
            .unwrap()
            .allowed
            .clouds
    };
    assert_eq!(rule("eu"), [0, 1].into_iter().collect());
    assert_eq!(rule("us"), [2].into_iter().collect());
    assert_eq!(rule("global"), CloudSet::all(3));
    assert_eq!(r.default.clouds, [0, 1].into_iter().collect());
    assert_eq!(r.on_unknown, OnUnknown::Reject);

    let p = &c.health.probe;
    assert_eq!((p.interval_ms, p.timeout_ms), (5_000, 1_000));
    assert_eq!((p.healthy_threshold, p.unhealthy_threshold), (2, 3));
    assert_eq!(
        p.paths,
        ["/v2/health/ready", "/v2/models/digits-mlp/versions/2/ready"]
    );
    assert_eq!(c.health.passive.consecutive_failures, 5);
    assert_eq!(
        c.health.passive.failure_rate,
        Some(FailureRate {
            percent: 50,
            min_requests: 20,
            window_ms: 10_000
        })
    );
    assert_eq!(
        c.replay,
        Replay {
            max_attempts: 3,
            max_body_bytes: 1 << 20,
            per_try_timeout_ms: 5_000,
            total_deadline_ms: 12_000,
            infer_idempotent: true,
        }
    );
    let derived = HedgeDelay::Derived {
        percentile: 95,
        min_ms: 20,
        max_ms: 1_000,
    };
    assert_eq!(c.hedge.default.as_ref(), Some(&derived));
    assert_eq!(c.hedge.for_model("tiny-cnn"), None);
    assert_eq!(
        c.hedge.for_model("digits-mlp"),
        Some(&HedgeDelay::Fixed { ms: 50 })
    );
    assert_eq!(c.hedge.for_model("other"), Some(&derived));
    assert!(!c.trust_downstream_headers);
    assert!(c.served_by_header);
}

#[test]
fn defaults_of_a_minimal_config() {
    let c =
        parse(br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb"}]}"#).unwrap();
    assert_eq!(c.residency.header, None);
    assert_eq!(c.residency.default.clouds, CloudSet::all(2));
    assert_eq!(c.residency.default.tags, [ANY_TAG]);
    assert_eq!(c.health.probe.interval_ms, 5_000);
    assert_eq!(c.health.probe.timeout_ms, 1_000);
    assert_eq!(c.health.probe.healthy_threshold, 2);
    assert_eq!(c.health.probe.unhealthy_threshold, 3);
    assert_eq!(c.health.probe.paths, [SERVER_READY_PATH]);
    assert_eq!(c.health.passive.consecutive_failures, 5);
    assert_eq!(c.health.passive.failure_rate, None);
    assert_eq!(c.replay.max_attempts, 3);
    assert_eq!(c.replay.max_body_bytes, 1 << 20);
    assert_eq!(c.replay.per_try_timeout_ms, 10_000);
    assert_eq!(c.replay.total_deadline_ms, 30_000);
    assert!(c.replay.infer_idempotent);
    assert_eq!(
        c.hedge.default,
        Some(HedgeDelay::Derived {
            percentile: 95,
            min_ms: 20,
            max_ms: 1_000
        })
    );
    assert!(c.served_by_header);
    let off = parse(br#"{"clouds":[{"name":"a","cluster":"ca"}],"hedge":{"enabled":false,"models":{"m":{"enabled":true}}}}"#).unwrap();
    assert_eq!(off.hedge.for_model("x"), None);
    assert!(off.hedge.for_model("m").is_some(), "a model may opt in");
}

#[test]
fn order_is_priority_then_cost_then_name() {
    let c = parse(
        br#"{"clouds":[
        {"name":"z","cluster":"c1","priority":1,"cost":0},
        {"name":"c","cluster":"c2","priority":0,"cost":2.5},
        {"name":"b","cluster":"c3","priority":0,"cost":2.5},
        {"name":"a","cluster":"c4","priority":0,"cost":3},
        {"name":"y","cluster":"c5","priority":0,"cost":0.5}]}"#,
    )
    .unwrap();
    let order: Vec<&str> = c.order.iter().map(|&i| c.cloud_name(i)).collect();
    assert_eq!(order, ["y", "b", "c", "a", "z"]);
    assert_eq!(c.cloud_index(b"b"), Some(2));
    assert_eq!(c.cloud_index(b"nope"), None);
    assert_eq!(c.cloud_name(99), "?");
}

#[test]
fn every_bad_field_is_named() {
    let one = r#""clouds":[{"name":"a","cluster":"ca","tags":["eu"]},{"name":"b","cluster":"cb","tags":["us"]}]"#;
    let with = |extra: &str| format!("{{{one},{extra}}}");
    let cases: Vec<(String, &str, &str)> = vec![
        ("".into(), ".", "missing field `clouds`"),
        ("[]".into(), ".", "must be a JSON object"),
        (r#"{"clouds":[]}"#.into(), "clouds", "at least one cloud"),
        (with(r#""bogus":1"#), "bogus", "unknown field `bogus`"),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","region":"x"}]}"#.into(),
            "clouds[0].region",
            "unknown field",
        ),
        (
            r#"{"clouds":[{"name":"a"}]}"#.into(),
            "clouds[0]",
            "missing field `cluster`",
        ),
        (
            r#"{"clouds":[{"name":"a b","cluster":"c"}]}"#.into(),
            "clouds[0].name",
            "not a valid name",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":""}]}"#.into(),
            "clouds[0].cluster",
            "cluster name",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c d"}]}"#.into(),
            "clouds[0].cluster",
            "cluster name",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","authority":"h\n"}]}"#.into(),
            "clouds[0].authority",
            "authority",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c1"},{"name":"a","cluster":"c2"}]}"#.into(),
            "clouds[1].name",
            "listed twice",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c"},{"name":"b","cluster":"c"}]}"#.into(),
            "clouds[1].cluster",
            "already used by cloud \"a\"",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","tags":["eu","eu"]}]}"#.into(),
            "clouds[0].tags[1]",
            "listed twice",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","tags":["e u"]}]}"#.into(),
            "clouds[0].tags[0]",
            "not a valid name",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","cost":-1}]}"#.into(),
            "clouds[0].cost",
            "≥ 0",
        ),
        (
            r#"{"clouds":[{"name":"a","cluster":"c","priority":-1}]}"#.into(),
            "clouds[0].priority",
            "invalid value",
        ),
        (
            with(r#""residency":{"default":["eu"]}"#),
            "residency",
            "missing field `header`",
        ),
        (
            with(r#""residency":{"header":"x-r"}"#),
            "residency",
            "missing field `default`",
        ),
        (
            with(r#""residency":{"header":"X-R","default":["eu"]}"#),
            "residency.header",
            "lower-case",
        ),
        (
            with(r#""residency":{"header":"x-infermesh-r","default":["eu"]}"#),
            "residency.header",
            "removed from downstream",
        ),
        (
            with(r#""residency":{"header":"x-r","default":["mars"]}"#),
            "residency.default[0]",
            "no cloud carries tag \"mars\"",
        ),
        (
            with(r#""residency":{"header":"x-r","default":["eu","eu"]}"#),
            "residency.default[1]",
            "listed twice",
        ),
        (
            with(r#""residency":{"header":"x-r","default":[],"rules":{"eu":["eu","apac"]}}"#),
            "residency.rules.eu[1]",
            "no cloud carries tag \"apac\"",
        ),
        (
            with(r#""residency":{"header":"x-r","default":[],"rules":{"EU":["eu"],"eu":["eu"]}}"#),
            "residency.rules.eu",
            "only in case",
        ),
        (
            with(r#""residency":{"header":"x-r","default":[],"rules":{"e u":["eu"]}}"#),
            "residency.rules.e u",
            "not a header value",
        ),
        (
            with(r#""residency":{"header":"x-r","default":[],"on_unknown":"allow"}"#),
            "residency.on_unknown",
            "unknown variant `allow`",
        ),
        (
            with(r#""served_by_header":"yes""#),
            "served_by_header",
            "invalid type",
        ),
        (format!("{{{one}}} trailing"), ".", "trailing"),
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
fn residency_edge_cases_that_are_valid() {
    let c = parse(
        br#"{"clouds":[{"name":"a","cluster":"ca","tags":["eu"]},{"name":"b","cluster":"cb","tags":["us"]}],
        "residency":{"header":"x-r","default":[],"rules":{"any":["*"],"EU":["eu"]},"on_unknown":"default"}}"#,
    )
    .unwrap();
    assert_eq!(
        c.residency.default.clouds,
        CloudSet::EMPTY,
        "[] allows nothing"
    );
    assert_eq!(c.residency.rules[1].allowed.clouds, CloudSet::all(2));
    assert_eq!(c.residency.on_unknown, OnUnknown::Default);
}

#[test]
fn size_and_count_limits() {
    let clouds: Vec<String> = (0..=MAX_CLOUDS)
        .map(|i| format!(r#"{{"name":"c{i}","cluster":"k{i}"}}"#))
        .collect();
    let e = err(&format!(r#"{{"clouds":[{}]}}"#, clouds.join(",")));
    assert_eq!(e.path, "clouds");
    assert!(e.message.contains("limit is 32"), "{e}");
    let ok: Vec<String> = clouds.into_iter().take(MAX_CLOUDS).collect();
    let c = parse(format!(r#"{{"clouds":[{}]}}"#, ok.join(",")).as_bytes()).unwrap();
    assert_eq!(c.residency.default.clouds.len(), MAX_CLOUDS);

    let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!("\"t{i}\"")).collect();
    let e = err(&format!(
        r#"{{"clouds":[{{"name":"a","cluster":"c","tags":[{}]}}]}}"#,
        tags.join(",")
    ));
    assert_eq!(e.path, "clouds[0].tags");
    let models: Vec<String> = (0..=MAX_PROBE_MODELS)
        .map(|i| format!(r#"{{"model":"m{i}"}}"#))
        .collect();
    let e = err(&format!(
        r#"{{"clouds":[{{"name":"a","cluster":"c"}}],"health":{{"probe":{{"models":[{}]}}}}}}"#,
        models.join(",")
    ));
    assert_eq!(e.path, "health.probe.models");
}
