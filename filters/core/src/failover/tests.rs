use super::*;
use crate::config::failover::parse;
use proptest::prelude::*;

/// eu-a (prio 0, cost 2), eu-b (prio 0, cost 1), us (prio 1), ch (prio 2,
/// tags eu+ch).
fn cfg(on_unknown: &str) -> FailoverConfig {
    parse(
        format!(
            r#"{{"clouds":[
            {{"name":"eu-a","cluster":"ca","tags":["eu"],"cost":2}},
            {{"name":"eu-b","cluster":"cb","tags":["eu"],"cost":1}},
            {{"name":"us","cluster":"cu","tags":["us"],"priority":1}},
            {{"name":"ch","cluster":"cc","tags":["ch","eu"],"priority":2}}],
            "residency":{{"header":"x-r","default":["eu","us"],
              "rules":{{"eu":["eu"],"us":["us"],"ch":["ch"],"none":[],"any":["*"]}},
              "on_unknown":"{on_unknown}"}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

fn set(ids: &[usize]) -> CloudSet {
    ids.iter().copied().collect()
}

fn names(c: &FailoverConfig, s: CloudSet) -> Vec<&str> {
    s.iter().map(|i| c.cloud_name(i)).collect()
}

/// header value → allowed cloud names, rule applied.
type ScopeCase<'a> = (Option<&'a [u8]>, Vec<&'a str>, Applied);

#[test]
fn residency_table() {
    let c = cfg("reject");
    let rule =
        |v: &str| Applied::Rule(c.residency.rules.iter().position(|r| r.value == v).unwrap());
    let cases: Vec<ScopeCase> = vec![
        (None, vec!["eu-a", "eu-b", "us", "ch"], Applied::Default),
        (
            Some(b""),
            vec!["eu-a", "eu-b", "us", "ch"],
            Applied::Default,
        ),
        (
            Some(b"  "),
            vec!["eu-a", "eu-b", "us", "ch"],
            Applied::Default,
        ),
        (Some(b"eu"), vec!["eu-a", "eu-b", "ch"], rule("eu")),
        (Some(b" EU "), vec!["eu-a", "eu-b", "ch"], rule("eu")),
        (Some(b"us"), vec!["us"], rule("us")),
        (Some(b"ch"), vec!["ch"], rule("ch")),
        (Some(b"none"), vec![], rule("none")),
        (Some(b"any"), vec!["eu-a", "eu-b", "us", "ch"], rule("any")),
        (Some(b"mars"), vec![], Applied::Unknown { fell_back: false }),
        (Some(b"e u"), vec![], Applied::Unknown { fell_back: false }),
        (Some(b"\xff"), vec![], Applied::Unknown { fell_back: false }),
    ];
    for (value, want, applied) in cases {
        let s = scope(&c, value);
        assert_eq!(names(&c, s.allowed), want, "{value:?}");
        assert_eq!(s.applied, applied, "{value:?}");
    }
    let lenient = cfg("default");
    let s = scope(&lenient, Some(b"mars"));
    assert_eq!(s.applied, Applied::Unknown { fell_back: true });
    assert_eq!(s.allowed, lenient.residency.default.clouds);
    let open =
        parse(br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb"}]}"#).unwrap();
    let s = scope(&open, Some(b"eu"));
    assert_eq!(
        (s.allowed, s.applied),
        (CloudSet::all(2), Applied::Unrestricted)
    );
}

#[test]
fn pick_takes_priority_then_cost_among_allowed_healthy_untried() {
    let c = cfg("reject");
    let all = CloudSet::all(4);
    let none = CloudSet::EMPTY;
    let pick_name =
        |allowed, healthy, exclude| pick(&c, allowed, healthy, exclude).map(|i| c.cloud_name(i));
    assert_eq!(
        pick_name(all, all, none),
        Some("eu-b"),
        "cheaper at equal priority"
    );
    assert_eq!(pick_name(all, all, set(&[1])), Some("eu-a"));
    assert_eq!(
        pick_name(all, set(&[0, 2, 3]), none),
        Some("eu-a"),
        "eu-b unhealthy"
    );
    assert_eq!(
        pick_name(all, all, set(&[0, 1])),
        Some("us"),
        "next priority"
    );
    assert_eq!(
        pick_name(set(&[0, 1, 3]), all, set(&[0, 1])),
        Some("ch"),
        "us not allowed"
    );
    assert_eq!(
        pick_name(set(&[0, 1]), set(&[2, 3]), none),
        None,
        "allowed ones unhealthy"
    );
    assert_eq!(pick_name(none, all, none), None, "nothing allowed");
    assert_eq!(pick_name(all, all, all), None, "all tried");
}

#[test]
fn no_cloud_bodies_name_the_model_and_the_rule() {
    let c = cfg("reject");
    let body = |model, value: Option<&[u8]>| {
        let s = scope(&c, value);
        let v: serde_json::Value =
            serde_json::from_slice(&no_cloud_body(&c, model, &s, value)).unwrap();
        (NoCloud::of(&s), v)
    };
    let (why, v) = body(Some("digits-mlp"), Some(b"eu"));
    assert_eq!(why, NoCloud::NoneHealthy);
    assert_eq!(
        v["error"],
        "no healthy cloud can serve model \"digits-mlp\": 3 cloud(s) allowed under residency x-r=\"eu\" (tags [\"eu\"]), none healthy"
    );
    assert_eq!(v["model"], "digits-mlp");
    assert_eq!(
        v["residency"],
        serde_json::json!({"header": "x-r", "value": "eu", "tags": ["eu"]})
    );

    let (why, v) = body(None, Some(b"mars"));
    assert_eq!(why, NoCloud::NoneAllowed);
    assert_eq!(
        v["error"],
        "no cloud may serve this request under residency x-r=\"mars\", which no rule lists"
    );
    assert_eq!(v["model"], serde_json::Value::Null);
    assert_eq!(v["residency"]["tags"], serde_json::json!([]));

    let (why, v) = body(Some("m"), None);
    assert_eq!(why, NoCloud::NoneHealthy);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("the residency default (no x-r header)"),
        "{v}"
    );
    assert_eq!(v["residency"]["value"], serde_json::Value::Null);

    let (why, v) = body(Some("m"), Some(b"none"));
    assert_eq!(why, NoCloud::NoneAllowed);
    assert_eq!(
        v["error"],
        "no cloud may serve model \"m\" under residency x-r=\"none\""
    );

    // A hostile header value is cut and escaped, never breaks the JSON.
    let long = format!("\"}}{}", "x".repeat(500));
    let (_, v) = body(Some("m"), Some(long.as_bytes()));
    assert_eq!(v["residency"]["value"].as_str().unwrap().len(), 64);

    let open = parse(br#"{"clouds":[{"name":"a","cluster":"ca"}]}"#).unwrap();
    let s = scope(&open, None);
    let v: serde_json::Value =
        serde_json::from_slice(&no_cloud_body(&open, Some("m"), &s, None)).unwrap();
    assert_eq!(v["error"], "no healthy cloud can serve model \"m\": 1 cloud(s) allowed under no residency rule (tags [\"*\"]), none healthy");
    assert_eq!(v["residency"]["header"], serde_json::Value::Null);
}

#[test]
fn tags_are_stable_strings() {
    let all: Vec<&str> = Failure::ALL
        .iter()
        .map(|f| f.as_str())
        .chain(Outcome::ALL.iter().map(|o| o.as_str()))
        .chain(NoCloud::ALL.iter().map(|n| n.as_str()))
        .chain(attempts::GiveUp::ALL.iter().map(|g| g.as_str()))
        .chain(health::State::ALL.iter().map(|s| s.as_str()))
        .chain(health::Cause::ALL.iter().map(|s| s.as_str()))
        .collect();
    for t in &all {
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{t}"
        );
    }
    assert_eq!(Failure::from_status(503), Some(Failure::Status5xx));
    assert_eq!(Failure::from_status(599), Some(Failure::Status5xx));
    assert_eq!(Failure::from_status(499), None);
    assert_eq!(Failure::from_status(600), None);
    assert!(!Failure::ConnectFailure.reached_upstream());
    assert!(Failure::Reset.reached_upstream());
}

proptest! {
    /// Whatever the residency value and health, a picked cloud is allowed
    /// for that value, healthy, and not excluded; and none is picked only
    /// when no such cloud exists.
    #[test]
    fn pick_respects_residency_and_health(
        value in prop::sample::select(vec!["", "eu", "us", "ch", "none", "any", "mars", "EU"]),
        healthy in 0u32..16,
        exclude in 0u32..16,
    ) {
        let c = cfg("reject");
        let healthy: CloudSet = (0..4).filter(|i| healthy >> i & 1 == 1).collect();
        let exclude: CloudSet = (0..4).filter(|i| exclude >> i & 1 == 1).collect();
        let s = scope(&c, Some(value.as_bytes()));
        let eligible: Vec<usize> = (0..4)
            .filter(|&i| {
                let tags = &c.clouds[i].tags;
                let allowed = match value {
                    "" => true,
                    "eu" | "EU" => tags.contains(&"eu".to_owned()),
                    "us" => tags.contains(&"us".to_owned()),
                    "ch" => tags.contains(&"ch".to_owned()),
                    "any" => true,
                    _ => false,
                };
                allowed && healthy.contains(i) && !exclude.contains(i)
            })
            .collect();
        match pick(&c, s.allowed, healthy, exclude) {
            Some(i) => {
                prop_assert!(eligible.contains(&i), "picked {} for {value:?}", c.cloud_name(i));
                // and it is the best by (priority, cost)
                for &j in &eligible {
                    let (a, b) = (&c.clouds[i], &c.clouds[j]);
                    prop_assert!((a.priority, a.cost) <= (b.priority, b.cost));
                }
            }
            None => prop_assert!(eligible.is_empty(), "nothing picked but {eligible:?} eligible"),
        }
    }
}

#[test]
fn envoy_details_classify_failures() {
    let cases: &[(&str, Failure)] = &[
        ("via_upstream", Failure::Status5xx),
        (
            "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_Connection_refused}",
            Failure::ConnectFailure,
        ),
        ("upstream_reset_before_response_started{connection_failure}", Failure::ConnectFailure),
        ("no_healthy_upstream", Failure::ConnectFailure),
        ("cluster_not_found", Failure::ConnectFailure),
        ("upstream_reset_before_response_started{overflow}", Failure::ConnectFailure),
        ("upstream_response_timeout", Failure::Timeout),
        ("upstream_per_try_timeout", Failure::Timeout),
        ("upstream_reset_before_response_started{connection_termination}", Failure::Reset),
        ("upstream_reset_after_response_started{remote_reset}", Failure::Reset),
        ("", Failure::Status5xx),
        ("something_new", Failure::Status5xx),
    ];
    for (details, want) in cases {
        assert_eq!(
            Failure::from_details(details.as_bytes()),
            *want,
            "{details}"
        );
    }
    assert!(!Failure::ConnectFailure.reached_upstream());
    assert!(Failure::Reset.reached_upstream());
}

#[test]
fn give_up_response_names_every_try() {
    let c = cfg("reject");
    let (status, body) = give_up_response(
        &c,
        Some("digits"),
        &[(0, Failure::Timeout), (1, Failure::Status5xx)],
        attempts::GiveUp::NoCloudLeft,
    );
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["error"],
        "no cloud answered model \"digits\": tried eu-a (timeout), eu-b (status_5xx); gave up: no_cloud_left"
    );
    assert_eq!(v["tries"][1]["cloud"], "eu-b");
    assert_eq!(v["tries"][1]["failure"], "status_5xx");
    let (status, _) = give_up_response(
        &c,
        None,
        &[(2, Failure::Timeout)],
        attempts::GiveUp::NoCloudLeft,
    );
    assert_eq!(status, 504, "every try timed out");
    let (status, body) = give_up_response(&c, None, &[], attempts::GiveUp::Deadline);
    assert_eq!(status, 504);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], serde_json::Value::Null);
}

#[test]
fn envoy_callout_answers_classify_failures() {
    let cases: &[(&str, Failure)] = &[
        ("upstream request timeout", Failure::Timeout),
        (
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused",
            Failure::ConnectFailure,
        ),
        (
            "upstream connect error or disconnect/reset before headers. reset reason: connection timeout",
            Failure::ConnectFailure,
        ),
        ("no healthy upstream", Failure::ConnectFailure),
        (
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            Failure::Reset,
        ),
        ("upstream=gcp\n", Failure::Status5xx),
        (r#"{"error":"model failed"}"#, Failure::Status5xx),
        ("", Failure::Status5xx),
    ];
    for (body, want) in cases {
        assert_eq!(Failure::from_callout_body(body.as_bytes()), *want, "{body}");
    }
}
