use super::*;
use crate::config::failover::parse;

/// a (prio 0), b (prio 1), c (prio 2); 3 attempts, 1 KiB bodies, 1 s per
/// try, 2.5 s in all; hedging on, off for model "nohedge".
fn cfg() -> FailoverConfig {
    parse(
        br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb","priority":1},
                       {"name":"c","cluster":"cc","priority":2}],
            "replay":{"max_attempts":3,"max_body_bytes":1024,"per_try_timeout_ms":1000,"total_deadline_ms":2500},
            "hedge":{"delay_ms":100,"models":{"nohedge":{"enabled":false}}}}"#,
    )
    .unwrap()
}

fn all() -> CloudSet {
    CloudSet::all(3)
}

fn infer() -> Class {
    classify(&cfg(), b"POST", b"/v2/models/m/infer", None)
}

/// A request to `a` at t=1000 with its 10-byte body buffered.
fn started(class: &Class) -> Attempts {
    let mut a = Attempts::start(1_000, 0, all(), class);
    a.set_body(Body::Complete(10));
    a
}

/// config, method, path, model header → idempotent, model, hedge.
type ClassCase<'a> = (
    &'a FailoverConfig,
    &'a str,
    &'a str,
    Option<&'a str>,
    bool,
    Option<&'a str>,
    Option<HedgeDelay>,
);

#[test]
fn classify_table() {
    let c = cfg();
    let off =
        parse(br#"{"clouds":[{"name":"a","cluster":"ca"}],"replay":{"infer_idempotent":false}}"#)
            .unwrap();
    let hedge = Some(HedgeDelay::Fixed { ms: 100 });
    let cases: Vec<ClassCase> = vec![
        (
            &c,
            "POST",
            "/v2/models/m/infer",
            None,
            true,
            Some("m"),
            hedge.clone(),
        ),
        (
            &c,
            "POST",
            "/v2/models/m/versions/2/infer",
            Some("x"),
            true,
            Some("m"),
            hedge.clone(),
        ),
        (
            &c,
            "POST",
            "/v2/models/nohedge/infer",
            None,
            true,
            Some("nohedge"),
            None,
        ),
        (&c, "GET", "/v2/models/m/ready", None, true, Some("m"), None),
        (&c, "HEAD", "/v2/health/ready", None, true, None, None),
        (
            &c,
            "POST",
            "/v2/models/m/ready",
            None,
            false,
            Some("m"),
            None,
        ),
        (
            &c,
            "PUT",
            "/v2/models/m/infer",
            None,
            false,
            Some("m"),
            None,
        ),
        (&c, "POST", "/predict", Some("m"), false, Some("m"), None),
        (&c, "POST", "/predict", Some(""), false, None, None),
        (
            &off,
            "POST",
            "/v2/models/m/infer",
            None,
            false,
            Some("m"),
            None,
        ),
        (&off, "GET", "/v2/models/m", None, true, Some("m"), None),
    ];
    for (cfg, method, path, header, idempotent, model, hedge) in cases {
        let got = classify(
            cfg,
            method.as_bytes(),
            path.as_bytes(),
            header.map(str::as_bytes),
        );
        assert_eq!(
            got,
            Class {
                idempotent,
                model: model.map(str::to_owned),
                hedge,
            },
            "{method} {path} {header:?}"
        );
    }
    assert!(may_buffer(&c, 1024));
    assert!(!may_buffer(&c, 1025));
}

#[test]
fn replay_walks_the_clouds_in_order_then_gives_up() {
    let c = cfg();
    let mut a = started(&infer());
    assert_eq!(
        a.on_upstream_failure(&c, 1_200, 0, Failure::Status5xx, false, all()),
        Next::ReplayTo {
            cloud: 1,
            timeout_ms: 1_000
        }
    );
    // 0.8 s of the 2.5 s budget left at t=2700: the try gets only that.
    assert_eq!(
        a.on_upstream_failure(&c, 2_700, 1, Failure::Timeout, false, all()),
        Next::ReplayTo {
            cloud: 2,
            timeout_ms: 800
        }
    );
    assert_eq!(a.count(), 3);
    assert_eq!(a.tried(), all());
    assert_eq!(
        a.on_upstream_failure(&c, 2_800, 2, Failure::Reset, false, all()),
        Next::GiveUp(GiveUp::AttemptsExhausted)
    );
    assert_eq!(a.outcome(), Outcome::Failed);
    assert_eq!(a.winner(), None);
}

#[test]
fn each_give_up_branch() {
    let c = cfg();
    let class = infer();
    let not_idem = classify(&c, b"POST", b"/predict", None);
    let fail = |a: &mut Attempts, now, failure, started, healthy| {
        a.on_upstream_failure(&c, now, 0, failure, started, healthy)
    };

    let mut a = started(&class);
    assert_eq!(
        fail(&mut a, 1_100, Failure::Status5xx, true, all()),
        Next::GiveUp(GiveUp::ResponseStarted)
    );

    let mut a = started(&not_idem);
    assert_eq!(
        fail(&mut a, 1_100, Failure::Status5xx, false, all()),
        Next::GiveUp(GiveUp::NotIdempotent)
    );
    let mut a = started(&not_idem);
    assert_eq!(
        fail(&mut a, 1_100, Failure::Reset, false, all()),
        Next::GiveUp(GiveUp::NotIdempotent)
    );
    let mut a = started(&not_idem);
    assert_eq!(
        fail(&mut a, 1_100, Failure::ConnectFailure, false, all()),
        Next::ReplayTo {
            cloud: 1,
            timeout_ms: 1_000
        },
        "nothing reached the upstream: safe to send elsewhere"
    );

    for body in [Body::Incomplete, Body::TooLarge, Body::Complete(1_025)] {
        let mut a = started(&class);
        a.set_body(body);
        assert_eq!(
            fail(&mut a, 1_100, Failure::Status5xx, false, all()),
            Next::GiveUp(GiveUp::BodyNotBuffered),
            "{body:?}"
        );
    }
    let mut a = started(&class);
    a.set_body(Body::Complete(1_024));
    assert!(matches!(
        fail(&mut a, 1_100, Failure::Status5xx, false, all()),
        Next::ReplayTo { .. }
    ));

    let mut a = started(&class);
    assert_eq!(
        fail(&mut a, 3_491, Failure::Timeout, false, all()),
        Next::GiveUp(GiveUp::Deadline),
        "9 ms left"
    );
    let mut a = started(&class);
    assert_eq!(
        fail(&mut a, 3_490, Failure::Timeout, false, all()),
        Next::ReplayTo {
            cloud: 1,
            timeout_ms: MIN_TRY_MS
        }
    );

    let mut a = started(&class);
    assert_eq!(
        fail(&mut a, 1_100, Failure::Status5xx, false, set_of(&[0])),
        Next::GiveUp(GiveUp::NoCloudLeft)
    );
    let mut a = started(&class);
    assert_eq!(
        fail(&mut a, 1_100, Failure::Status5xx, false, set_of(&[0, 2])),
        Next::ReplayTo {
            cloud: 2,
            timeout_ms: 1_000
        },
        "b is unhealthy: skipped"
    );
    // Residency: only a and b allowed.
    let mut a = Attempts::start(1_000, 0, set_of(&[0, 1]), &class);
    a.set_body(Body::Complete(0));
    assert!(matches!(
        a.on_upstream_failure(&c, 1_100, 0, Failure::Reset, false, all()),
        Next::ReplayTo { cloud: 1, .. }
    ));
    assert_eq!(
        a.on_upstream_failure(&c, 1_200, 1, Failure::Reset, false, all()),
        Next::GiveUp(GiveUp::NoCloudLeft)
    );

    let one = parse(br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb"}],"replay":{"max_attempts":1}}"#).unwrap();
    let mut a = started(&class);
    assert_eq!(
        a.on_upstream_failure(&one, 1_100, 0, Failure::Status5xx, false, CloudSet::all(2)),
        Next::GiveUp(GiveUp::AttemptsExhausted)
    );
}

fn set_of(ids: &[usize]) -> CloudSet {
    ids.iter().copied().collect()
}

#[test]
fn hedge_then_first_answer_wins() {
    let c = cfg();
    let mut a = started(&infer());
    assert_eq!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::ReplayTo {
            cloud: 1,
            timeout_ms: 1_000
        }
    );
    assert_eq!(
        a.on_hedge_due(&c, 1_150, all()),
        Next::GiveUp(GiveUp::AlreadyHedged)
    );
    assert_eq!(a.on_answer(1), Answer::Use, "the hedge answered first");
    assert_eq!(a.on_answer(0), Answer::Discard);
    assert_eq!(a.outcome(), Outcome::Hedged);
    assert_eq!(a.winner(), Some(1));
    assert_eq!(
        a.on_upstream_failure(&c, 1_300, 0, Failure::Reset, false, all()),
        Next::GiveUp(GiveUp::Answered)
    );

    // The first try answers before the hedge delay.
    let mut a = started(&infer());
    assert_eq!(a.on_answer(0), Answer::Use);
    assert_eq!(a.outcome(), Outcome::Served);
    assert_eq!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::GiveUp(GiveUp::Answered)
    );
}

#[test]
fn a_failure_while_the_other_try_runs_waits() {
    let c = cfg();
    let mut a = started(&infer());
    assert!(matches!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::ReplayTo { cloud: 1, .. }
    ));
    assert_eq!(
        a.on_upstream_failure(&c, 1_200, 0, Failure::Status5xx, false, all()),
        Next::Wait
    );
    // Then the hedge fails too: replay to the last cloud.
    assert_eq!(
        a.on_upstream_failure(&c, 1_300, 1, Failure::Status5xx, false, all()),
        Next::ReplayTo {
            cloud: 2,
            timeout_ms: 1_000
        }
    );
    assert_eq!(a.on_answer(2), Answer::Use);
    assert_eq!(a.outcome(), Outcome::Replayed);
}

#[test]
fn hedge_refusals() {
    let c = cfg();
    let mut a = started(&classify(&c, b"POST", b"/v2/models/nohedge/infer", None));
    assert_eq!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::GiveUp(GiveUp::NotHedgeable)
    );
    let mut a = started(&infer());
    a.set_body(Body::TooLarge);
    assert_eq!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::GiveUp(GiveUp::BodyNotBuffered)
    );
    let mut a = started(&infer());
    assert_eq!(
        a.on_hedge_due(&c, 1_100, set_of(&[0])),
        Next::GiveUp(GiveUp::NoCloudLeft)
    );
    let mut a = started(&infer());
    assert_eq!(
        a.on_hedge_due(&c, 3_495, all()),
        Next::GiveUp(GiveUp::Deadline)
    );
    // The first try failed and was not replayed: nothing to join.
    let mut a = started(&infer());
    a.set_body(Body::Incomplete);
    assert_eq!(
        a.on_upstream_failure(&c, 1_050, 0, Failure::Reset, false, all()),
        Next::GiveUp(GiveUp::BodyNotBuffered)
    );
    a.set_body(Body::Complete(1));
    assert_eq!(
        a.on_hedge_due(&c, 1_100, all()),
        Next::GiveUp(GiveUp::NothingInFlight)
    );
    // An answer from a cloud never tried is not used.
    let mut a = started(&infer());
    assert_eq!(a.on_answer(2), Answer::Discard);
    assert_eq!(a.winner(), None);
    assert_eq!(a.deadline_ms(&c), 3_500);
}

#[test]
fn the_clock_restarts_when_the_body_is_complete() {
    let c = cfg();
    let mut a = Attempts::start(1_000, 0, all(), &infer());
    assert_eq!(a.deadline_ms(&c), 3_500);
    // A 10 s upload: the deadline counts from its end.
    a.start_clock(11_000);
    a.set_body(Body::Complete(10));
    assert_eq!(a.deadline_ms(&c), 13_500);
    assert_eq!(
        a.on_upstream_failure(&c, 11_100, 0, Failure::Status5xx, false, all()),
        Next::ReplayTo {
            cloud: 1,
            timeout_ms: 1_000
        }
    );
}
