use super::*;
use crate::config::failover::parse;
use proptest::prelude::*;

/// a (prio 0), b (prio 1), c (prio 2); 3 attempts, 1 KiB bodies, 1 s per
/// try, 2.5 s in all; a fixed 100 ms hedge, off for model "nohedge".
const CFG: &str = r#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb","priority":1},
                       {"name":"c","cluster":"cc","priority":2}],
    "replay":{"max_attempts":3,"max_body_bytes":1024,"per_try_timeout_ms":1000,"total_deadline_ms":2500},
    "hedge":{"delay_ms":100,"models":{"nohedge":{"enabled":false}}}}"#;

fn cfg_from(json: &str) -> FailoverConfig {
    parse(json.as_bytes()).unwrap()
}

/// The shim's state a flight reads, driven by the test.
struct Host {
    cfg: FailoverConfig,
    healthy: CloudSet,
    latency: Vec<LatencyTracker>,
}

impl Host {
    fn new(json: &str) -> Host {
        let cfg = cfg_from(json);
        let n = cfg.clouds.len();
        Host {
            cfg,
            healthy: CloudSet::all(n),
            latency: vec![LatencyTracker::default(); n],
        }
    }

    fn env(&self) -> Env<'_> {
        Env {
            cfg: &self.cfg,
            healthy: self.healthy,
            latency: &self.latency,
        }
    }

    /// Starts a flight; panics on a no-cloud answer.
    fn start(&self, req: &Request, now: u64) -> (Flight, Out) {
        let mut out = Out::default();
        match Flight::start(&self.env(), req, now, &mut out) {
            Start::Routed(f) => (f, out),
            Start::NoCloud { body, .. } => panic!("no cloud: {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Applies latency samples as the shim does.
    fn record(&mut self, out: &Out) {
        for s in &out.signals {
            if let Signal::Latency { cloud, ms } = *s {
                self.latency[cloud].record(ms);
            }
        }
    }
}

const INFER: Request<'static> = Request {
    method: b"POST",
    path: b"/v2/models/m/infer",
    residency: None,
    model_header: None,
    content_length: None,
    end_of_stream: true,
};

fn tick(h: &Host, f: &mut Flight, now: u64) -> Out {
    let mut out = Out::default();
    f.on_tick(&h.env(), now, &mut out);
    out
}

fn routed(h: &Host, f: &mut Flight, now: u64, status: u16, details: &str) -> Out {
    let mut out = Out::default();
    f.on_response_headers(
        &h.env(),
        now,
        status,
        || details.as_bytes().to_vec(),
        &mut out,
    );
    out
}

fn callout(h: &Host, f: &mut Flight, now: u64, t: &Try, answer: Answer) -> Out {
    let mut out = Out::default();
    f.on_callout(&h.env(), now, t, answer, &mut out);
    out
}

fn ok() -> Answer<'static> {
    Answer::Status {
        status: 200,
        head: b"",
    }
}

/// The only dispatch in `out`.
fn dispatched(out: &Out) -> Try {
    let d: Vec<Try> = out
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(t) => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(d.len(), 1, "one dispatch expected: {out:?}");
    d[0]
}

fn failed_signals(out: &Out) -> Vec<(usize, Failure)> {
    out.signals
        .iter()
        .filter_map(|s| match *s {
            Signal::Failed { cloud, failure } => Some((cloud, failure)),
            _ => None,
        })
        .collect()
}

// ---- Request: the shim's and explain's reading of the headers ----------

fn headers_find<'a>(hs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> + 'a {
    move |name| {
        hs.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_bytes())
    }
}

#[test]
fn request_reads_the_headers_failover_uses() {
    let cfg = cfg_from(
        r#"{"clouds":[{"name":"a","cluster":"ca","tags":["eu"]}],"trust_downstream_headers":true,
            "residency":{"header":"x-r","default":["eu"],"rules":{"eu":["eu"]}}}"#,
    );
    let hs = [
        (":method", "POST"),
        (":path", "/x"),
        ("x-r", "eu"),
        (headers::MODEL, "m1"),
        ("content-length", " 12 "),
    ];
    let r = Request::from_headers(&cfg, headers_find(&hs), false);
    assert_eq!(r.method, b"POST");
    assert_eq!(r.path, b"/x");
    assert_eq!(r.residency, Some(&b"eu"[..]));
    assert_eq!(r.model_header, Some(&b"m1"[..]));
    assert_eq!(r.content_length, Some(12));
    assert!(!r.end_of_stream);
    assert_eq!(r.class(&cfg).model.as_deref(), Some("m1"));

    // Untrusted: the model header is not read.
    let untrusted = cfg_from(r#"{"clouds":[{"name":"a","cluster":"ca"}]}"#);
    let r = Request::from_headers(&untrusted, headers_find(&hs), true);
    assert_eq!(r.model_header, None);
    assert_eq!(r.residency, None, "no residency header configured");
    assert_eq!(r.content_length, Some(12));
}

#[test]
fn empty_model_header_names_no_model_even_in_the_no_cloud_answer() {
    // Residency allows nothing for "none": the 503 names the model. An
    // empty trusted x-infermesh-model header is no model at all, in the
    // class (hedge policy) and in the 503 body alike.
    let h = Host::new(
        r#"{"clouds":[{"name":"a","cluster":"ca","tags":["eu"]}],"trust_downstream_headers":true,
            "residency":{"header":"x-r","default":["eu"],"rules":{"none":[]}}}"#,
    );
    let hs = [
        (":method", "POST"),
        (":path", "/x"),
        ("x-r", "none"),
        (headers::MODEL, ""),
    ];
    let r = Request::from_headers(&h.cfg, headers_find(&hs), true);
    assert_eq!(r.model_header, None);
    let mut out = Out::default();
    let Start::NoCloud {
        reason,
        status,
        body,
    } = Flight::start(&h.env(), &r, 0, &mut out)
    else {
        panic!("expected no cloud");
    };
    assert_eq!((reason, status), (NoCloud::NoneAllowed, 503));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], serde_json::Value::Null, "{v}");
    assert!(v["error"].as_str().unwrap().contains("this request"), "{v}");
}

// ---- timers -------------------------------------------------------------

#[test]
fn timers_start_when_the_request_is_complete() {
    // A slow upload: headers at 0, body until 5 s. Nothing fires before
    // the body is complete, though the try timeout (1 s) and the deadline
    // (2.5 s) would have passed long ago if counted from the headers.
    let h = Host::new(CFG);
    let req = Request {
        end_of_stream: false,
        content_length: Some(30),
        ..INFER
    };
    let (mut f, out) = h.start(&req, 0);
    assert_eq!(out, Out::default());
    assert_eq!(f.next_due_ms(), u64::MAX);
    for (at, eos) in [(500, false), (3_000, false), (5_000, true)] {
        for t in (at - 400..at).step_by(10) {
            assert_eq!(tick(&h, &mut f, t), Out::default(), "tick at {t}");
        }
        let mut out = Out::default();
        f.on_request_body(&h.env(), at, 10, eos, || Some(vec![7; 10]), &mut out);
        assert_eq!(out, Out::default());
    }
    assert_eq!(f.body(), &[7; 30][..]);
    assert_eq!(f.next_due_ms(), 5_100, "hedge 100 ms after the body ended");
    assert_eq!(tick(&h, &mut f, 5_099), Out::default());
    let t = dispatched(&tick(&h, &mut f, 5_100));
    assert_eq!((t.cloud, t.kind, t.timeout_ms), (1, TryKind::Hedge, 1_000));
}

#[test]
fn hedge_fires_at_its_delay_and_only_once() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 1_000);
    assert_eq!(tick(&h, &mut f, 1_099), Out::default());
    let out = tick(&h, &mut f, 1_100);
    let t = dispatched(&out);
    assert_eq!(
        t,
        Try {
            cloud: 1,
            kind: TryKind::Hedge,
            started_ms: 1_100,
            timeout_ms: 1_000
        }
    );
    assert!(out.signals.is_empty(), "a hedge is not a failure: {out:?}");
    assert_eq!(tick(&h, &mut f, 1_200), Out::default(), "one hedge only");
}

#[test]
fn deadline_is_checked_before_the_try_timeout() {
    // Try timeout and deadline fall on the same tick. The deadline ends
    // the request (504) and is not the cloud's failure.
    let h = Host::new(
        r#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb","priority":1}],
            "replay":{"per_try_timeout_ms":1000,"total_deadline_ms":1000},"hedge":{"enabled":false}}"#,
    );
    let (mut f, _) = h.start(&INFER, 0);
    assert_eq!(tick(&h, &mut f, 999), Out::default());
    let out = tick(&h, &mut f, 1_000);
    assert_eq!(failed_signals(&out), vec![], "{out:?}");
    assert!(
        !out.signals.contains(&Signal::Live {
            cloud: 0,
            ok: false
        }),
        "{out:?}"
    );
    assert_eq!(
        out.signals,
        vec![
            Signal::GaveUp(GiveUp::Deadline),
            Signal::Finished {
                cloud: 0,
                outcome: Outcome::Failed
            }
        ]
    );
    let [Effect::ReplyError { status, body }] = out.effects.as_slice() else {
        panic!("{out:?}");
    };
    assert_eq!(*status, 504);
    assert!(String::from_utf8_lossy(body).contains("deadline"));
    assert!(f.is_done());
}

#[test]
fn one_tick_past_the_deadline_ends_a_hedged_request() {
    // A hedge is in flight when a late tick finds the routed try's timeout
    // and the deadline both past. Were the try timeout handled first, the
    // running hedge would make it wait, and the request would outlive its
    // deadline by a tick.
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let hedge = dispatched(&tick(&h, &mut f, 100));
    let out = tick(&h, &mut f, 4_000);
    assert!(f.is_done(), "{out:?}");
    assert!(matches!(
        out.effects.as_slice(),
        [Effect::ReplyError { status: 504, .. }]
    ));
    assert_eq!(callout(&h, &mut f, 4_001, &hedge, ok()).effects, vec![]);
}

#[test]
fn try_timeout_is_checked_before_the_hedge() {
    // The hedge (999 ms) and the try timeout (1000 ms) fall due on the
    // same tick: the routed try failed (timeout) and the next cloud gets a
    // replay, not a hedge.
    let h = Host::new(
        r#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb","priority":1}],
            "replay":{"per_try_timeout_ms":1000,"total_deadline_ms":5000},"hedge":{"delay_ms":999}}"#,
    );
    let (mut f, _) = h.start(&INFER, 0);
    assert_eq!(tick(&h, &mut f, 990), Out::default());
    let out = tick(&h, &mut f, 1_000);
    assert_eq!(failed_signals(&out), vec![(0, Failure::Timeout)]);
    let t = dispatched(&out);
    assert_eq!((t.cloud, t.kind), (1, TryKind::Replay));
    // The hedge timer went with the routed try.
    assert_eq!(tick(&h, &mut f, 1_010), Out::default());
}

#[test]
fn late_answer_after_the_try_timeout_is_used_and_counted_once() {
    let h = Host::new(CFG);
    let req = Request {
        path: b"/v2/models/nohedge/infer",
        ..INFER
    };
    let (mut f, _) = h.start(&req, 0);
    let out = tick(&h, &mut f, 1_000);
    assert_eq!(failed_signals(&out), vec![(0, Failure::Timeout)]);
    let replay = dispatched(&out);
    // The routed try answers after all, before the replay.
    let out = routed(&h, &mut f, 1_050, 200, "via_upstream");
    assert_eq!(out.effects, vec![Effect::PassThrough { cloud: 0 }]);
    assert_eq!(
        out.signals,
        vec![Signal::Finished {
            cloud: 0,
            outcome: Outcome::Served
        }],
        "no second health signal, no latency sample for a try counted failed"
    );
    // The replay's answer then only feeds health and latency.
    let out = callout(&h, &mut f, 1_060, &replay, ok());
    assert_eq!(out.effects, vec![]);
    assert_eq!(
        out.signals,
        vec![
            Signal::Live { cloud: 1, ok: true },
            Signal::Latency { cloud: 1, ms: 60 }
        ]
    );
}

#[test]
fn lost_hedge_race_is_not_a_failure() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let hedge = dispatched(&tick(&h, &mut f, 100));
    // The routed try wins.
    let out = routed(&h, &mut f, 130, 200, "via_upstream");
    assert_eq!(out.effects, vec![Effect::PassThrough { cloud: 0 }]);
    assert!(out.signals.contains(&Signal::Latency { cloud: 0, ms: 130 }));
    assert!(out.signals.contains(&Signal::Finished {
        cloud: 0,
        outcome: Outcome::Served
    }));
    // The hedge answers later, or fails: neither changes the stream, and
    // the slow-but-winning cloud is never marked failed.
    let late = callout(&h, &mut f, 140, &hedge, ok());
    assert_eq!(late.effects, vec![]);
    assert_eq!(failed_signals(&late), vec![]);
    let mut f2 = f.clone();
    let failed = callout(&h, &mut f2, 140, &hedge, Answer::None);
    assert_eq!(failed.effects, vec![]);
    assert_eq!(failed_signals(&failed), vec![(1, Failure::Reset)]);
}

#[test]
fn hedge_answer_wins_and_replaces_the_routed_try() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let hedge = dispatched(&tick(&h, &mut f, 110));
    let out = callout(&h, &mut f, 125, &hedge, ok());
    assert_eq!(
        out.effects,
        vec![Effect::Reply {
            cloud: 1,
            kind: TryKind::Hedge,
            status: 200
        }]
    );
    assert!(out.signals.contains(&Signal::Finished {
        cloud: 1,
        outcome: Outcome::Hedged
    }));
    assert!(out.signals.contains(&Signal::Latency { cloud: 1, ms: 15 }));
    assert!(
        out.signals.contains(&Signal::Latency { cloud: 0, ms: 100 }),
        "the slow cloud's censored sample is the delay used: {out:?}"
    );
    assert_eq!(failed_signals(&out), vec![]);
    // Envoy resets the routed try; what it would answer is not seen, and
    // timers are off.
    assert_eq!(f.next_due_ms(), u64::MAX);
    assert_eq!(routed(&h, &mut f, 130, 200, ""), Out::default());
}

// ---- held failures ------------------------------------------------------

#[test]
fn held_failure_is_replaced_by_the_replay_answer() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let out = routed(
        &h,
        &mut f,
        20,
        503,
        "upstream_reset_before_response_started{remote_connection_failure}",
    );
    assert_eq!(failed_signals(&out), vec![(0, Failure::ConnectFailure)]);
    let replay = dispatched(&out);
    assert_eq!(out.effects.last(), Some(&Effect::Hold));
    assert_eq!((replay.cloud, replay.kind), (1, TryKind::Replay));
    assert!(f.holding());
    let out = callout(&h, &mut f, 40, &replay, ok());
    assert_eq!(
        out.effects,
        vec![Effect::Reply {
            cloud: 1,
            kind: TryKind::Replay,
            status: 200
        }]
    );
    assert!(out.signals.contains(&Signal::Finished {
        cloud: 1,
        outcome: Outcome::Replayed
    }));
    assert!(!f.holding());
}

#[test]
fn held_failure_is_resumed_when_every_replay_fails() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let r1 = dispatched(&routed(&h, &mut f, 20, 500, "via_upstream"));
    let fivexx = Answer::Status {
        status: 502,
        head: b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    };
    let out = callout(&h, &mut f, 30, &r1, fivexx);
    assert_eq!(failed_signals(&out), vec![(1, Failure::ConnectFailure)]);
    let r2 = dispatched(&out);
    assert_eq!(r2.cloud, 2);
    assert!(f.holding());
    let out = callout(&h, &mut f, 40, &r2, Answer::None);
    assert_eq!(failed_signals(&out), vec![(2, Failure::Reset)]);
    assert_eq!(out.effects, vec![Effect::Resume { cloud: 0 }]);
    assert!(out
        .signals
        .contains(&Signal::GaveUp(GiveUp::AttemptsExhausted)));
    assert!(f.is_done() && !f.holding());
}

#[test]
fn held_failure_is_resumed_at_the_deadline() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let replay = dispatched(&routed(&h, &mut f, 20, 503, "via_upstream"));
    assert_eq!(tick(&h, &mut f, 2_499), Out::default());
    let out = tick(&h, &mut f, 2_500);
    assert_eq!(out.effects, vec![Effect::Resume { cloud: 0 }]);
    // The replay's answer after that only feeds health.
    let out = callout(&h, &mut f, 2_600, &replay, ok());
    assert_eq!(out.effects, vec![]);
}

#[test]
fn abandoned_routed_failure_is_held_while_its_replay_runs() {
    // The routed try timed out (a replay runs); its 504 then arrives: it
    // is held, not counted again, and replaced by the replay's answer.
    let h = Host::new(CFG);
    let req = Request {
        path: b"/v2/models/nohedge/infer",
        ..INFER
    };
    let (mut f, _) = h.start(&req, 0);
    let replay = dispatched(&tick(&h, &mut f, 1_000));
    let out = routed(&h, &mut f, 1_001, 504, "upstream_response_timeout");
    assert_eq!(out.effects, vec![Effect::Hold]);
    assert_eq!(out.signals, vec![]);
    let out = callout(&h, &mut f, 1_100, &replay, ok());
    assert!(matches!(
        out.effects.as_slice(),
        [Effect::Reply { cloud: 1, .. }]
    ));
}

#[test]
fn failure_passes_when_the_request_may_not_be_replayed() {
    let h = Host::new(CFG);
    let req = Request {
        method: b"POST",
        path: b"/other",
        ..INFER
    };
    let (mut f, _) = h.start(&req, 0);
    let out = routed(&h, &mut f, 10, 500, "via_upstream");
    assert_eq!(out.effects, vec![Effect::PassThrough { cloud: 0 }]);
    assert!(out.signals.contains(&Signal::GaveUp(GiveUp::NotIdempotent)));
    assert!(out.signals.contains(&Signal::Finished {
        cloud: 0,
        outcome: Outcome::Failed
    }));
}

// ---- callouts -----------------------------------------------------------

#[test]
fn callout_without_headers_is_a_timeout_near_its_timeout_else_a_reset() {
    let t = Try {
        cloud: 1,
        kind: TryKind::Replay,
        started_ms: 100,
        timeout_ms: 500,
    };
    let failure = |now| {
        let mut out = Out::default();
        orphan_answer(now, &t, Answer::None, &mut out);
        failed_signals(&out)
    };
    assert_eq!(failure(589), vec![(1, Failure::Reset)]);
    assert_eq!(failure(590), vec![(1, Failure::Timeout)]);
    assert_eq!(failure(700), vec![(1, Failure::Timeout)]);
}

#[test]
fn refused_dispatch_is_a_connect_failure_and_moves_on() {
    let h = Host::new(CFG);
    let (mut f, _) = h.start(&INFER, 0);
    let r1 = dispatched(&routed(&h, &mut f, 5, 503, "via_upstream"));
    let mut out = Out::default();
    f.on_dispatch_failed(&h.env(), 5, &r1, &mut out);
    assert_eq!(failed_signals(&out), vec![(1, Failure::ConnectFailure)]);
    assert_eq!(dispatched(&out).cloud, 2);
}

#[test]
fn routed_timeout_with_no_cloud_left_answers_504() {
    let h = Host::new(
        r#"{"clouds":[{"name":"a","cluster":"ca"}],"replay":{"per_try_timeout_ms":300}}"#,
    );
    let (mut f, _) = h.start(&INFER, 0);
    let out = tick(&h, &mut f, 300);
    let [Effect::ReplyError { status, body }] = out.effects.as_slice() else {
        panic!("{out:?}");
    };
    assert_eq!(*status, 504);
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["model"], "m");
    assert_eq!(v["tries"][0]["failure"], "timeout");
    assert!(out.signals.contains(&Signal::GaveUp(GiveUp::NoCloudLeft)));
}

#[test]
fn oversized_body_is_not_buffered_and_not_replayed() {
    let h = Host::new(CFG);
    let req = Request {
        end_of_stream: false,
        content_length: Some(5_000),
        ..INFER
    };
    let (mut f, out) = h.start(&req, 0);
    assert_eq!(out.signals, vec![Signal::NotBuffered]);
    assert!(f.not_buffered());
    let mut out = Out::default();
    f.on_request_body(&h.env(), 10, 5_000, true, || panic!("not read"), &mut out);
    let out = routed(&h, &mut f, 20, 503, "via_upstream");
    assert_eq!(out.effects, vec![Effect::PassThrough { cloud: 0 }]);
    assert!(out
        .signals
        .contains(&Signal::GaveUp(GiveUp::BodyNotBuffered)));
}

// ---- the hedge delay after a hang --------------------------------------

/// One worker at 200 req/s (400 across two), a 10 ms root tick, cloud b
/// answering `b_ms` after each callout, cloud a answering in `a_ms(t)` for
/// a request started at `t` (`None`: a hangs). Returns, per request
/// started at or after `from`, (start, time to its answer, hedge delay
/// used).
fn simulate(
    json: &str,
    until: u64,
    from: u64,
    a_ms: impl Fn(u64) -> Option<u64>,
    b_ms: u64,
) -> Vec<(u64, u64, u64)> {
    struct Live {
        flight: Flight,
        start: u64,
        routed_at: Option<u64>,
        calls: Vec<(u64, Try)>,
        hedged_at: Option<u64>,
    }
    let mut h = Host::new(json);
    let mut live: Vec<Live> = Vec::new();
    let mut done = Vec::new();
    for now in 0..until {
        if now % 5 == 0 {
            let (flight, _) = h.start(&INFER, now);
            let routed_at = a_ms(now).map(|ms| now + ms);
            live.push(Live {
                flight,
                start: now,
                routed_at,
                calls: Vec::new(),
                hedged_at: None,
            });
        }
        for l in &mut live {
            let mut outs = Vec::new();
            if l.routed_at == Some(now) {
                let mut out = Out::default();
                l.flight
                    .on_response_headers(&h.env(), now, 200, Vec::new, &mut out);
                outs.push(out);
            }
            let due: Vec<Try> = l
                .calls
                .iter()
                .filter(|(at, _)| *at == now)
                .map(|(_, t)| *t)
                .collect();
            for t in due {
                let mut out = Out::default();
                l.flight.on_callout(&h.env(), now, &t, ok(), &mut out);
                outs.push(out);
            }
            if now % 10 == 0 {
                let mut out = Out::default();
                l.flight.on_tick(&h.env(), now, &mut out);
                outs.push(out);
            }
            for out in outs {
                for e in &out.effects {
                    if let Effect::Dispatch(t) = e {
                        l.calls.push((now + b_ms, *t));
                        l.hedged_at = Some(now);
                    }
                    if e.is_end() && l.start >= from {
                        done.push((l.start, now - l.start, l.flight.hedge_delay_ms));
                    }
                }
                h.record(&out);
            }
        }
        live.retain(|l| !l.flight.is_done());
    }
    done
}

const DERIVED: &str = r#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb","priority":1}],
    "replay":{"per_try_timeout_ms":1000},"hedge":{"enabled":true,"min_delay_ms":30}}"#;

#[test]
fn hedge_stays_early_while_a_cloud_hangs() {
    // Cloud a answers in 8 ms for 2 s (the derived delay settles at
    // min_delay_ms, 30), then hangs. Every request in the next second is
    // hedged at 30 ms plus at most one tick, and answered by b: none takes
    // 100 ms. (Recording the elapsed time of a hedged request as a's
    // latency ratcheted the delay up by ~13 ms per round of requests.)
    let done = simulate(DERIVED, 3_500, 2_000, |t| (t < 2_000).then_some(8), 3);
    assert!(done.len() > 250, "{}", done.len());
    let slow: Vec<_> = done.iter().filter(|(_, ms, _)| *ms > 50).collect();
    let over_100: Vec<_> = done.iter().filter(|(_, ms, _)| *ms > 100).collect();
    assert!(
        slow.is_empty(),
        "{} over 50 ms (first {:?}), {} over 100 ms (first {:?}), max {:?} (start, ms, delay)",
        slow.len(),
        slow.first(),
        over_100.len(),
        over_100.first(),
        done.iter().max_by_key(|(_, ms, _)| *ms)
    );
    assert!(done.iter().all(|(_, _, delay)| *delay == 30));
}

#[test]
fn hedge_delay_of_a_slow_but_alive_cloud_stays_put() {
    // Cloud a slows from 8 to 60 ms for good, and b answers fast: every
    // request is hedged at the old delay and answered by b (a duplicate
    // request each); the delay neither ratchets to max_delay_ms nor
    // shrinks below the last one observed.
    let done = simulate(
        DERIVED,
        4_000,
        2_000,
        |t| Some(if t < 2_000 { 8 } else { 60 }),
        3,
    );
    assert!(
        done.iter().all(|(_, ms, delay)| *ms <= 45 && *delay == 30),
        "{done:?}"
    );
}

#[test]
fn hedge_delay_rises_when_hedging_does_not_pay() {
    // Both clouds slow to 60 ms (the proxy's machine is busy, say): the
    // routed answers win their races, their real times enter the ring,
    // and the delay rises to them, so hedges stop doubling the traffic.
    let done = simulate(
        DERIVED,
        5_000,
        2_000,
        |t| Some(if t < 2_000 { 8 } else { 60 }),
        60,
    );
    let late: Vec<_> = done
        .iter()
        .filter(|(start, _, _)| *start >= 4_000)
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|(_, ms, delay)| *ms == 60 && *delay >= 60),
        "{late:?}"
    );
}

// ---- properties ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Body {
        size: usize,
        end: bool,
    },
    Trailers,
    /// The routed response: status, and whether Envoy timed it out.
    Routed {
        status: u16,
        timeout: bool,
    },
    /// The `i`-th pending callout ends: 200, a 5xx, or no headers.
    Callout {
        i: usize,
        kind: u8,
    },
    Tick {
        dt: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..700, any::<bool>()).prop_map(|(size, end)| Op::Body { size, end }),
        Just(Op::Trailers),
        (
            prop_oneof![Just(200u16), Just(404), Just(500), Just(503)],
            any::<bool>()
        )
            .prop_map(|(status, timeout)| Op::Routed { status, timeout }),
        (0usize..4, 0u8..3).prop_map(|(i, kind)| Op::Callout { i, kind }),
        (0u64..400).prop_map(|dt| Op::Tick { dt }),
    ]
}

/// Checks one event's output against the flight's history.
#[derive(Default)]
struct Judge {
    ends: usize,
    finished: usize,
    held: bool,
    dispatches: usize,
    hedges: usize,
}

impl Judge {
    fn see(&mut self, cfg: &FailoverConfig, out: &Out, complete: bool) {
        for e in &out.effects {
            assert_eq!(self.ends, 0, "effect after the end: {out:?}");
            match e {
                Effect::Dispatch(t) => {
                    assert!(complete, "a try before the body is complete");
                    assert!(t.timeout_ms <= cfg.replay.per_try_timeout_ms);
                    self.dispatches += 1;
                    self.hedges += usize::from(t.kind == TryKind::Hedge);
                }
                Effect::Hold => {
                    assert!(!self.held, "held twice");
                    self.held = true;
                }
                Effect::PassThrough { .. } => {
                    assert!(!self.held, "a held response passed as if fresh");
                    self.ends += 1;
                }
                Effect::Resume { .. } => {
                    assert!(self.held, "resume without hold");
                    self.ends += 1;
                }
                Effect::Reply { .. } | Effect::ReplyError { .. } => self.ends += 1,
            }
        }
        self.finished += out
            .signals
            .iter()
            .filter(|s| matches!(s, Signal::Finished { .. }))
            .count();
        assert!(self.dispatches < usize::from(cfg.replay.max_attempts));
        assert!(self.hedges <= 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the order and timing of body chunks, routed response,
    /// callout answers and ticks: effects stop at the end, a held response
    /// is resumed or replaced, no try starts before the body is complete,
    /// and once the request is complete and the deadline passed, every
    /// flight has ended exactly once with exactly one outcome.
    #[test]
    fn every_flight_ends_exactly_once(
        ops in proptest::collection::vec(op(), 0..30),
        eos in any::<bool>(),
        down in 0usize..3,
        refuse in proptest::option::of(1usize..3),
    ) {
        let mut h = Host::new(CFG);
        h.healthy.remove(down);
        let req = Request { end_of_stream: eos, content_length: None, ..INFER };
        let mut now = 1_000u64;
        let mut judge = Judge::default();
        let mut pending: Vec<Try> = Vec::new();
        let (mut f, _) = h.start(&req, now);
        let mut complete = eos;
        let mut routed_seen = false;
        // Runs one event, then refuses dispatches to `refuse` as the host
        // would, feeding the refusals back.
        let run = |f: &mut Flight, out: Out, judge: &mut Judge, pending: &mut Vec<Try>,
                       complete: bool, now: u64| {
            let mut queue = vec![out];
            while let Some(out) = queue.pop() {
                judge.see(&h.cfg, &out, complete);
                for e in &out.effects {
                    if let Effect::Dispatch(t) = e {
                        if Some(t.cloud) == refuse {
                            let mut again = Out::default();
                            f.on_dispatch_failed(&h.env(), now, t, &mut again);
                            queue.push(again);
                        } else {
                            pending.push(*t);
                        }
                    }
                }
            }
        };
        for op in ops.iter().cloned().chain([Op::Trailers, Op::Tick { dt: 3_000 }]) {
            let mut out = Out::default();
            match op {
                Op::Body { size, end } => {
                    if !complete {
                        f.on_request_body(&h.env(), now, size, end, || Some(vec![0; size]), &mut out);
                        complete |= end;
                    }
                }
                Op::Trailers => {
                    if !complete {
                        f.on_request_trailers(&h.env(), now);
                        complete = true;
                    }
                }
                Op::Routed { status, timeout } => {
                    // Envoy's own response comes once; after a reply the
                    // routed try is reset and only the reply passes by.
                    if !routed_seen {
                        routed_seen = true;
                        let details = if timeout { "upstream_response_timeout" } else { "via_upstream" };
                        f.on_response_headers(&h.env(), now, status, || details.as_bytes().to_vec(), &mut out);
                    }
                }
                Op::Callout { i, kind } => {
                    if !pending.is_empty() {
                        let t = pending.remove(i % pending.len());
                        let answer = match kind {
                            0 => ok(),
                            1 => Answer::Status { status: 503, head: b"no healthy upstream" },
                            _ => Answer::None,
                        };
                        f.on_callout(&h.env(), now, &t, answer, &mut out);
                    }
                }
                Op::Tick { dt } => {
                    now += dt;
                    f.on_tick(&h.env(), now, &mut out);
                }
            }
            run(&mut f, out, &mut judge, &mut pending, complete, now);
        }
        prop_assert!(f.is_done());
        prop_assert_eq!(judge.ends, 1);
        prop_assert_eq!(judge.finished, 1);
        prop_assert!(!f.holding());
    }
}

#[test]
fn replays_pin_the_chosen_version_into_the_path() {
    assert_eq!(
        pinned_path(b"/v2/models/m/infer?x=1", Some(b"2")).as_deref(),
        Some("/v2/models/m/versions/2/infer?x=1")
    );
    assert_eq!(
        pinned_path(b"/v2/models/m/versions/2/infer", Some(b"2")),
        None
    );
    assert_eq!(pinned_path(b"/v2/models/m/infer", None), None);
    assert_eq!(pinned_path(b"/predict", Some(b"2")), None);
    assert_eq!(pinned_path(b"/v2/models/m/infer", Some(b"\xff")), None);
}
