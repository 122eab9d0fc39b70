use super::*;
use crate::config::canary::parse;

fn cfg() -> CanaryConfig {
    parse(
        br#"{"splits":[
            {"model":"mlp","versions":[{"name":"1","weight":90},{"name":"2","weight":10}]},
            {"model":"cnn","versions":[{"name":"a","weight":70},{"name":"b","weight":20},{"name":"c","weight":10}],
             "schedule":{"start":"1970-01-01T00:00:10Z","steps":[{"after_s":0,"weights":{"b":0,"c":0}},{"after_s":10,"weights":{"b":50}}]}}
        ]}"#,
    )
    .unwrap()
}

fn req(path: &'static str) -> Request<'static> {
    Request {
        path: path.as_bytes(),
        ..Request::default()
    }
}

#[test]
fn precedence_table() {
    let c = cfg();
    let split = |version, how| Decision::Split {
        split: 0,
        version,
        how,
        override_rejected: false,
    };
    let cases: Vec<(Request<'static>, Decision)> = vec![
        (req("/v2/models/other/infer"), Decision::Unmatched),
        (req("/healthz"), Decision::Unmatched),
        (
            req("/v2/models/mlp/versions/2/infer"),
            Decision::Pinned {
                split: 0,
                version: Some(1),
            },
        ),
        (
            req("/v2/models/mlp/versions/9/infer"),
            Decision::Pinned {
                split: 0,
                version: None,
            },
        ),
        (
            Request {
                trusted_version: Some(b"1"),
                ..req("/v2/models/mlp/infer")
            },
            Decision::Pinned {
                split: 0,
                version: Some(0),
            },
        ),
        (
            Request {
                trusted_model: Some(b"mlp"),
                ..req("/not/oip")
            },
            Decision::Split {
                split: 0,
                version: 0,
                how: How::Unkeyed,
                override_rejected: false,
            },
        ),
        (
            Request {
                trusted_model: Some(b"nope"),
                ..req("/v2/models/mlp/infer")
            },
            Decision::Unmatched,
        ),
        (
            Request {
                override_version: Some(b"2"),
                ..req("/v2/models/mlp/infer")
            },
            split(1, How::Override),
        ),
        (
            Request {
                override_version: Some(b"2"),
                sticky_key: Some(b"k"),
                ..req("/v2/models/mlp/infer")
            },
            split(1, How::Override),
        ),
        (
            Request {
                override_version: Some(b"7"),
                ..req("/v2/models/mlp/infer")
            },
            Decision::Split {
                split: 0,
                version: 0,
                how: How::Unkeyed,
                override_rejected: true,
            },
        ),
        (
            Request {
                override_version: Some(b"2"),
                ..req("/v2/models/mlp/versions/1/infer")
            },
            Decision::Pinned {
                split: 0,
                version: Some(0),
            },
        ),
    ];
    // A random word whose bucket is outside the 10% canary slot [0, 1000).
    let stable_word = (0u64..).find(|&r| random_bucket(r) >= 1_000).unwrap();
    for (r, want) in cases {
        assert_eq!(decide(&c, &r, 0, stable_word), want, "{r:?}");
    }
}

#[test]
fn keyed_requests_are_sticky_and_scoped_by_model() {
    let c = cfg();
    let mut canary = 0;
    for i in 0..5_000 {
        let key = format!("user-{i}");
        let r = Request {
            sticky_key: Some(key.as_bytes()),
            ..req("/v2/models/mlp/infer")
        };
        let first = decide(&c, &r, 0, 1);
        for random in [2, 3, u64::MAX] {
            assert_eq!(decide(&c, &r, 1_000, random), first, "key {key} moved");
        }
        if let Decision::Split {
            version: 1,
            how: How::Keyed,
            ..
        } = first
        {
            canary += 1;
        }
    }
    assert!(
        (400..=600).contains(&canary),
        "10% canary got {canary}/5000"
    );
}

#[test]
fn unkeyed_requests_split_per_request() {
    let c = cfg();
    let hits = (0..20_000u64)
        .filter(|&i| {
            matches!(
                decide(
                    &c,
                    &req("/v2/models/mlp/infer"),
                    0,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ),
                Decision::Split {
                    version: 1,
                    how: How::Unkeyed,
                    ..
                }
            )
        })
        .count();
    assert!(
        (1_800..=2_200).contains(&hits),
        "10% canary got {hits}/20000"
    );
}

#[test]
fn schedule_moves_the_split_with_time() {
    let c = cfg();
    let share = |now_ms: u64| {
        (0..10_000)
            .filter(|i| {
                let key = format!("u{i}");
                let r = Request {
                    sticky_key: Some(key.as_bytes()),
                    ..req("/v2/models/cnn/infer")
                };
                matches!(
                    decide(&c, &r, now_ms, 0),
                    Decision::Split { version: 1, .. }
                )
            })
            .count()
    };
    // Before the start: base weights 70/20/10 → b ≈ 20%.
    assert!((1_800..=2_200).contains(&share(9_999)), "{}", share(9_999));
    // Step 0 at 10 s: b = 0.
    assert_eq!(share(10_000), 0);
    // Step 1 at 20 s: b = 50%, a = 50%.
    let s = share(20_000);
    assert!((4_800..=5_200).contains(&s), "{s}");
}

#[test]
fn sticky_key_sources_in_order() {
    use crate::config::canary::KeySource::*;
    let sources = [
        Header("x-user-id".into()),
        Cookie("uid".into()),
        Cookie("sid".into()),
    ];
    let lookup = |h: &[(&str, &[u8])]| {
        let h: Vec<(String, Vec<u8>)> =
            h.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        sticky_key(&sources, |name| {
            h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    };
    assert_eq!(
        lookup(&[("x-user-id", b"alice"), ("cookie", b"uid=bob")]),
        Some(b"alice".to_vec())
    );
    assert_eq!(
        lookup(&[("x-user-id", b""), ("cookie", b"uid=bob")]),
        Some(b"bob".to_vec())
    );
    assert_eq!(
        lookup(&[("cookie", b"a=1; sid=s\xff")]),
        Some(b"s\xff".to_vec())
    );
    assert_eq!(lookup(&[("cookie", b"a=1")]), None);
    assert_eq!(lookup(&[]), None);
}
