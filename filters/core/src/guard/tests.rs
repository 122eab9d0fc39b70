use super::*;
use crate::canary::{decide_guarded, Decision, Request};
use crate::config::canary::{parse, CanaryConfig};
use proptest::prelude::*;

fn config(guard: &str) -> CanaryConfig {
    let json = format!(
        r#"{{"splits":[{{"model":"m","versions":[{{"name":"1","weight":80}},{{"name":"2","weight":20}}],
            "guard":{guard}}}]}}"#
    );
    parse(json.as_bytes()).unwrap()
}

fn guard_of(cfg: &CanaryConfig) -> Guard {
    cfg.splits[0].guard.clone().unwrap()
}

/// `n` outcomes, `errors` of them failed, all taking `ms`.
fn tally(n: u32, errors: u32, ms: u64) -> Tally {
    let mut t = Tally::default();
    for i in 0..n {
        t.record(i >= errors, ms);
    }
    t
}

#[test]
fn tally_counts_and_buckets() {
    let mut t = Tally::default();
    t.record(true, 0);
    t.record(true, 1);
    t.record(false, 2);
    t.record(true, 10_001);
    assert_eq!((t.requests, t.errors), (4, 1));
    assert_eq!(t.latency[0], 2, "0 and 1 ms share the first bucket");
    assert_eq!(t.latency[1], 1);
    assert_eq!(t.latency[LATENCY_BUCKETS - 1], 1);
    assert_eq!(t.error_rate_bp(), 2_500);
    assert_eq!(Tally::default().error_rate_bp(), 0);
    assert_eq!(Tally::default().p99_ms(), None);
    assert_eq!(tally(100, 0, 201).p99_ms(), Some((200, Some(300))));
    assert_eq!(tally(100, 0, 200).p99_ms(), Some((150, Some(200))));
    let mut mix = tally(98, 0, 1);
    mix.add(&tally(2, 0, 400));
    assert_eq!(
        mix.p99_ms(),
        Some((300, Some(500))),
        "the 99th of 100 is slow"
    );
    assert_eq!(tally(5, 0, 60_000).p99_ms(), Some((10_000, None)));
}

#[test]
fn each_rule_trips_on_its_own_numbers() {
    let g = guard_of(&config(
        r#"{"min_requests":20,"max_error_rate":10,"max_error_rate_over_baseline":5,"max_p99_ms_over_baseline":100}"#,
    ));
    let ok = tally(100, 0, 5);
    assert_eq!(
        judge(&g, &tally(19, 19, 5), &ok),
        None,
        "below min_requests"
    );
    assert_eq!(
        judge(&g, &tally(100, 10, 5), &tally(100, 6, 5)),
        None,
        "10% is not above 10%"
    );
    assert_eq!(
        judge(&g, &tally(100, 11, 5), &ok).unwrap().rule,
        Rule::ErrorRate
    );
    assert_eq!(
        judge(&g, &tally(100, 6, 5), &ok).unwrap().rule,
        Rule::ErrorRateOverBaseline
    );
    assert_eq!(judge(&g, &tally(100, 6, 5), &tally(100, 1, 5)), None);
    assert_eq!(
        judge(&g, &tally(100, 6, 5), &tally(10, 0, 5)),
        None,
        "a baseline below min_requests is no reference"
    );
    // p99: 5 ms (3, 5] vs 210 ms (200, 300]: 200 - 5 > 100.
    assert_eq!(
        judge(&g, &tally(100, 0, 210), &ok).unwrap().rule,
        Rule::P99OverBaseline
    );
    // 120 ms (100, 150] vs 5 ms: 100 - 5 = 95, not above 100.
    assert_eq!(judge(&g, &tally(100, 0, 120), &ok), None);
    // The same latency never trips, whatever the bucket.
    for ms in [0, 1, 9, 99, 101, 999, 5_000, 50_000] {
        assert_eq!(
            judge(&g, &tally(100, 0, ms), &tally(100, 0, ms)),
            None,
            "{ms}"
        );
    }
    let v = judge(&g, &tally(100, 31, 5), &ok).unwrap();
    assert_eq!(
        v.describe(&g),
        "error_rate 31.00% > 10.00% (31 errors of 100 requests; baseline 0 of 100; 10000 ms window)"
    );
    let v = judge(&g, &tally(100, 0, 210), &ok).unwrap();
    assert!(
        v.describe(&g)
            .contains("canary p99 in (200, 300] ms vs baseline p99 in (3, 5] ms"),
        "{}",
        v.describe(&g)
    );
}

#[test]
fn window_slides_and_forgets() {
    let g = guard_of(&config(
        r#"{"window_s":1,"min_requests":1,"max_error_rate":50}"#,
    ));
    let mut r = Record::fresh(2);
    r.add(&g, 1_000, &[tally(1, 0, 1), tally(10, 5, 1)]);
    r.add(&g, 1_450, &[Tally::default(), tally(10, 0, 1)]);
    assert_eq!(r.window(&g, 1, 1_500).requests, 20);
    assert_eq!(r.window(&g, 1, 1_500).errors, 5);
    assert_eq!(r.window(&g, 0, 1_500).requests, 1);
    // Slot 10 (1 000..1 100) leaves the window at 2 000.
    assert_eq!(r.window(&g, 1, 1_999).requests, 20);
    assert_eq!(r.window(&g, 1, 2_000).requests, 10);
    assert_eq!(r.window(&g, 1, 2_500).requests, 0);
    // A slot is reused for a later epoch without carrying old counts.
    r.add(&g, 2_000, &[Tally::default(), tally(3, 3, 1)]);
    assert_eq!(r.window(&g, 1, 2_000).errors, 3);
    // A clock that went back sees no future slots.
    assert_eq!(r.window(&g, 1, 100).requests, 0);
}

#[test]
fn trips_then_stays_without_cool_off() {
    let cfg = config(r#"{"window_s":1,"min_requests":10,"max_error_rate":10}"#);
    let g = guard_of(&cfg);
    let split = &cfg.splits[0];
    let mut r = Record::fresh(2);
    r.add(&g, 1_000, &[tally(50, 0, 1), tally(9, 9, 1)]);
    assert!(r.step(&g, 1_000).is_empty(), "9 < min_requests");
    assert_eq!(r.effective(split, &g, 1_000), None);
    r.add(&g, 1_050, &[Tally::default(), tally(1, 1, 1)]);
    let t = r.step(&g, 1_050);
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].version, t[0].to), (1, State::Tripped));
    assert_eq!(t[0].verdict.unwrap().rule, Rule::ErrorRate);
    assert_eq!(r.versions[1].rule, Some(Rule::ErrorRate));
    assert_eq!(r.effective(split, &g, 1_050).unwrap().as_bp(), [10_000, 0]);
    // Healthy canary traffic (pinned) afterwards changes nothing, ever.
    for now in (2_000..100_000).step_by(500) {
        r.add(&g, now, &[tally(50, 0, 1), tally(50, 0, 1)]);
        assert!(r.step(&g, now).is_empty());
    }
    assert_eq!(r.state(1), State::Tripped);
}

#[test]
fn cool_off_probes_then_recovers_or_trips_again() {
    let cfg = config(
        r#"{"window_s":1,"min_requests":10,"max_error_rate":10,"cool_off_s":5,"probe_percent":2.5}"#,
    );
    let g = guard_of(&cfg);
    let split = &cfg.splits[0];
    let mut r = Record::fresh(2);
    r.add(&g, 1_000, &[tally(50, 0, 1), tally(20, 20, 1)]);
    assert_eq!(r.step(&g, 1_000)[0].to, State::Tripped);
    assert!(r.step(&g, 5_999).is_empty(), "cool-off not over");
    let t = r.step(&g, 6_000);
    assert_eq!((t[0].to, r.state(1)), (State::Probing, State::Probing));
    assert_eq!(r.window(&g, 1, 6_000).requests, 0, "the probe starts clean");
    assert_eq!(r.effective(split, &g, 6_000).unwrap().as_bp(), [9_750, 250]);
    // Healthy probe traffic, but not yet a full window: still probing.
    r.add(&g, 6_500, &[tally(50, 0, 1), tally(20, 0, 1)]);
    assert!(r.step(&g, 6_500).is_empty());
    r.add(&g, 7_000, &[tally(50, 0, 1), tally(20, 0, 1)]);
    assert_eq!(r.step(&g, 7_000)[0].to, State::Normal);
    assert_eq!(r.effective(split, &g, 7_000), None);

    // Tripped again, and a bad probe trips at once, restarting the cool-off.
    r.add(&g, 8_000, &[tally(50, 0, 1), tally(50, 50, 1)]);
    assert_eq!(r.step(&g, 8_000)[0].to, State::Tripped);
    assert_eq!(r.step(&g, 13_000)[0].to, State::Probing);
    r.add(&g, 13_100, &[tally(50, 0, 1), tally(10, 5, 1)]);
    assert_eq!(r.step(&g, 13_100)[0].to, State::Tripped);
    assert!(r.step(&g, 18_099).is_empty());
    assert_eq!(r.step(&g, 18_100)[0].to, State::Probing);
}

#[test]
fn freeze_keeps_the_step_of_the_trip() {
    let json = r#"{"splits":[{"model":"m","versions":[{"name":"1","weight":100},{"name":"2","weight":0}],
        "schedule":{"start":"1970-01-01T00:00:01Z","steps":[{"after_s":0,"weights":{"2":1}},{"after_s":10,"weights":{"2":5}},{"after_s":20,"weights":{"2":25}}]},
        "guard":{"window_s":1,"min_requests":5,"max_error_rate":10,"action":"freeze"}}]}"#;
    let cfg = parse(json.as_bytes()).unwrap();
    let split = &cfg.splits[0];
    let g = guard_of(&cfg);
    let mut r = Record::fresh(2);
    r.add(&g, 12_000, &[tally(10, 0, 1), tally(10, 10, 1)]);
    assert_eq!(r.step(&g, 12_000)[0].to, State::Tripped);
    assert_eq!(
        r.effective(split, &g, 30_000).unwrap().as_bp(),
        [9_500, 500]
    );
    assert_eq!(split.weights_at(30_000).as_bp(), [7_500, 2_500]);
}

/// A split stepping 0 -> 1% -> 5% -> 25% at 1 s, 11 s, 21 s, with a shadow
/// and a promotion gate of 98% over 100 samples.
fn gated(extra_guard: &str) -> CanaryConfig {
    let json = format!(
        r#"{{"splits":[{{"model":"m","versions":[{{"name":"1","weight":100}},{{"name":"2","weight":0}}],
        "schedule":{{"start":"1970-01-01T00:00:01Z","steps":[{{"after_s":0,"weights":{{"2":1}}}},{{"after_s":10,"weights":{{"2":5}}}},{{"after_s":20,"weights":{{"2":25}}}}]}},
        "shadow":{{"version":"2","fraction":0.5,"cluster":"v2"}},
        "guard":{{"min_requests":5,"min_shadow_agreement":98{extra_guard}}}}}]}}"#
    );
    parse(json.as_bytes()).unwrap()
}

fn agreement(compared: u64, agreed: u64) -> Agreement {
    Agreement { compared, agreed }
}

#[test]
fn the_gate_holds_the_schedule_until_agreement_is_proven() {
    let cfg = gated("");
    let (split, g) = (&cfg.splits[0], guard_of(&cfg));
    let mut r = Record::fresh(2);
    // No samples yet: shut from the first flush, before the first step.
    let change = r.gate(&g, Agreement::default(), 500).unwrap();
    assert!(change.held);
    assert_eq!(r.held_at_ms, Some(0), "held at the base weights");
    assert_eq!(r.effective(split, &g, 15_000).unwrap().as_bp(), [10_000, 0]);
    // 99 of 99 agree: still too few samples.
    assert_eq!(r.gate(&g, agreement(99, 99), 15_000), None);
    assert_eq!(r.effective(split, &g, 15_000).unwrap().as_bp(), [10_000, 0]);
    // The 100th: proven; the schedule applies as written.
    let change = r.gate(&g, agreement(1, 1), 15_100).unwrap();
    assert!(!change.held);
    assert_eq!(r.effective(split, &g, 15_100), None);
    assert_eq!(split.weights_at(15_100).as_bp(), [9_500, 500]);
    // Agreement falls under 98%: held at the step of that moment.
    assert_eq!(
        r.gate(&g, agreement(100, 94), 16_000).unwrap().agreement,
        agreement(200, 194)
    );
    assert_eq!(r.held_at_ms, Some(16_000));
    assert_eq!(
        r.effective(split, &g, 40_000).unwrap().as_bp(),
        [9_500, 500]
    );
    // And back above it.
    assert!(!r.gate(&g, agreement(300, 300), 41_000).unwrap().held);
    assert_eq!(r.effective(split, &g, 41_000), None);
}

#[test]
fn a_gate_and_a_rollback_together() {
    let cfg = gated(r#","max_error_rate":10"#);
    let (split, g) = (&cfg.splits[0], guard_of(&cfg));
    let mut r = Record::fresh(2);
    r.gate(&g, agreement(100, 100), 12_000);
    assert_eq!(r.effective(split, &g, 12_000), None);
    r.add(&g, 12_000, &[tally(10, 0, 1), tally(10, 10, 1)]);
    assert_eq!(r.step(&g, 12_000)[0].to, State::Tripped);
    assert_eq!(r.effective(split, &g, 12_000).unwrap().as_bp(), [10_000, 0]);
    // Held and rolled back: the canary still gets nothing.
    r.gate(&g, agreement(100, 0), 13_000);
    assert_eq!(r.effective(split, &g, 30_000).unwrap().as_bp(), [10_000, 0]);
}

#[test]
fn without_a_gate_agreement_is_only_counted() {
    let cfg = config(r#"{"max_error_rate":10}"#);
    let g = guard_of(&cfg);
    let mut r = Record::fresh(2);
    assert_eq!(r.gate(&g, agreement(10, 1), 1_000), None);
    assert_eq!(r.agreement, agreement(10, 1));
    assert_eq!(r.held_at_ms, None);
    assert!(r.gate_open(&g));
}

#[test]
fn agreement_rates_and_saturation() {
    assert_eq!(Agreement::default().rate_bp(), None);
    assert_eq!(agreement(400, 389).rate_bp(), Some(9_725));
    assert_eq!(
        agreement(400, 389).describe(),
        "97.25% agreement (389 of 400 compared)"
    );
    let mut a = agreement(u64::MAX - 1, u64::MAX - 1);
    a.add(agreement(5, 5));
    assert_eq!(a, agreement(u64::MAX, u64::MAX));
}

fn keyed_version(cfg: &CanaryConfig, guarded: &[Option<Weights>], key: &str) -> usize {
    let req = Request {
        path: b"/v2/models/m/infer",
        sticky_key: Some(key.as_bytes()),
        ..Default::default()
    };
    match decide_guarded(cfg, &req, 0, 0, guarded) {
        Decision::Split { version, .. } => version,
        d => panic!("{d:?}"),
    }
}

fn unkeyed_version(cfg: &CanaryConfig, guarded: &[Option<Weights>], random: u64) -> usize {
    let req = Request {
        path: b"/v2/models/m/infer",
        ..Default::default()
    };
    match decide_guarded(cfg, &req, 0, random, guarded) {
        Decision::Split { version, .. } => version,
        d => panic!("{d:?}"),
    }
}

#[test]
fn rollback_sends_keyed_and_unkeyed_to_the_baseline_and_keys_come_back() {
    let cfg = config(r#"{"min_requests":5,"max_error_rate":10,"cool_off_s":60,"probe_percent":5}"#);
    let g = guard_of(&cfg);
    let split = &cfg.splits[0];
    let keys: Vec<String> = (0..5_000).map(|i| format!("user-{i}")).collect();
    let before: Vec<usize> = keys.iter().map(|k| keyed_version(&cfg, &[], k)).collect();
    let on_canary = before.iter().filter(|&&v| v == 1).count();
    assert!((800..1_200).contains(&on_canary), "{on_canary}");

    let mut r = Record::fresh(2);
    r.add(&g, 1_000, &[tally(10, 0, 1), tally(10, 10, 1)]);
    r.step(&g, 1_000);
    let rolled = [r.effective(split, &g, 1_000)];
    for k in &keys {
        assert_eq!(keyed_version(&cfg, &rolled, k), 0, "{k}");
    }
    for random in 0..5_000u64 {
        let random = crate::hash::fmix64(random);
        assert_eq!(unkeyed_version(&cfg, &rolled, random), 0);
    }

    // Probing: the canary's keys are a subset of its keys before.
    r.step(&g, 61_000);
    assert_eq!(r.state(1), State::Probing);
    let probing = [r.effective(split, &g, 61_000)];
    let mut probed = 0;
    for (k, was) in keys.iter().zip(&before) {
        let now = keyed_version(&cfg, &probing, k);
        if now == 1 {
            probed += 1;
            assert_eq!(
                *was, 1,
                "{k} was on the baseline before, now on the probed canary"
            );
        }
    }
    assert!((150..350).contains(&probed), "{probed} of 5000 at 5%");

    // A config change: a new fingerprint, a fresh record, every key back
    // in its bucket.
    let changed =
        config(r#"{"min_requests":5,"max_error_rate":11,"cool_off_s":60,"probe_percent":5}"#);
    let fp_old = fingerprint(split);
    let fp_new = fingerprint(&changed.splits[0]);
    assert_ne!(fp_old, fp_new);
    let bytes = r.encode(fp_old);
    let fresh = Record::decode_or_fresh(Some(&bytes), fp_new, 2);
    assert_eq!(fresh, Record::fresh(2));
    let after = [fresh.effective(&changed.splits[0], &guard_of(&changed), 70_000)];
    for (k, was) in keys.iter().zip(&before) {
        assert_eq!(keyed_version(&changed, &after, k), *was, "{k}");
    }
    // The same config reads the same record back.
    assert_eq!(Record::decode_or_fresh(Some(&bytes), fp_old, 2), r);
}

#[test]
fn decode_refuses_what_it_did_not_write() {
    let cfg = config(r#"{"max_error_rate":10}"#);
    let g = guard_of(&cfg);
    let mut r = Record::fresh(2);
    r.add(&g, 5_000, &[tally(3, 1, 7), tally(4, 2, 700)]);
    r.step(&g, 5_000);
    r.agreement = Agreement {
        compared: 10,
        agreed: 7,
    };
    r.held_at_ms = Some(4_000);
    r.proven = true;
    let bytes = r.encode(42);
    assert_eq!(Record::decode(&bytes, 42), Ok(r.clone()));
    assert_eq!(Record::decode(&bytes, 43), Err(DecodeError::Fingerprint));
    assert!(matches!(
        Record::decode(&bytes[..bytes.len() - 1], 42),
        Err(DecodeError::Length(_))
    ));
    let mut flipped = bytes.clone();
    flipped[20] ^= 1;
    assert_eq!(Record::decode(&flipped, 42), Err(DecodeError::Check));
    let mut other = bytes.clone();
    other[0] = 9;
    assert_eq!(Record::decode(&other, 42), Err(DecodeError::Format(9)));
    assert_eq!(Record::decode(&[], 42), Err(DecodeError::Length(0)));
    assert_eq!(Record::decode_or_fresh(None, 42, 2), Record::fresh(2));
    assert_eq!(
        Record::decode_or_fresh(Some(&bytes), 42, 3),
        Record::fresh(3),
        "another version count"
    );
}

#[test]
fn shared_key_names_the_format_and_model() {
    assert_eq!(
        shared_key("digits-mlp"),
        "infermesh.canary.guard.v2.digits-mlp"
    );
}

/// One step of a simulated run: at `dt` ms after the previous one, add
/// outcomes (baseline, canary) and step.
#[derive(Debug, Clone)]
struct Tick {
    dt: u64,
    base: (u32, u32),
    canary: (u32, u32, u64),
}

fn ticks() -> impl Strategy<Value = Vec<Tick>> {
    prop::collection::vec(
        (
            0u64..2_000,
            (0u32..30, 0u32..30),
            (0u32..30, 0u32..30, 0u64..1_000),
        )
            .prop_map(|(dt, base, canary)| Tick { dt, base, canary }),
        1..200,
    )
}

proptest! {
    #[test]
    fn never_flaps(run in ticks(), cool in 1u64..20, window in 1u64..10) {
        let cfg = config(&format!(
            r#"{{"window_s":{window},"min_requests":10,"max_error_rate":20,"max_p99_ms_over_baseline":100,"cool_off_s":{cool},"probe_percent":10}}"#
        ));
        let g = guard_of(&cfg);
        let mut r = Record::fresh(2);
        let mut now = 1_000_000u64;
        let mut last: Option<(State, u64)> = None;
        for t in run {
            now += t.dt;
            let (bn, be) = t.base;
            let (cn, ce, ms) = t.canary;
            r.add(&g, now, &[tally(bn, be.min(bn), 5), tally(cn, ce.min(cn), ms)]);
            for tr in r.step(&g, now) {
                if let Some((from, at)) = last {
                    let gap = now - at;
                    match (from, tr.to) {
                        (State::Tripped, State::Probing) => prop_assert!(gap >= cool * 1000),
                        (State::Probing, State::Normal) => prop_assert!(gap >= window * 1000),
                        (State::Probing, State::Tripped) | (State::Normal, State::Tripped) => {
                            prop_assert!(tr.verdict.is_some())
                        }
                        (a, b) => prop_assert!(false, "{a:?} -> {b:?}"),
                    }
                }
                last = Some((tr.to, now));
            }
        }
    }

    #[test]
    fn a_healthy_canary_is_never_tripped(run in ticks(), window in 1u64..10) {
        let cfg = config(&format!(
            r#"{{"window_s":{window},"min_requests":10,"max_error_rate":5,"max_error_rate_over_baseline":1,"max_p99_ms_over_baseline":20}}"#
        ));
        let g = guard_of(&cfg);
        let mut r = Record::fresh(2);
        let mut now = 0u64;
        for t in run {
            now += t.dt;
            let ms = t.canary.2;
            // The same latency distribution as the baseline, no errors.
            let same = tally(t.canary.0, 0, ms);
            r.add(&g, now, &[same, same]);
            prop_assert!(r.step(&g, now).is_empty());
        }
    }

    #[test]
    fn a_guarded_canary_only_ever_loses_keys(
        w2 in 0u32..=50, w3 in 0u32..=50, states in prop::collection::vec(0u8..3, 2), probe in 1u32..=100,
        keys in prop::collection::vec("[a-z0-9]{1,12}", 1..200),
    ) {
        // Three versions; any mix of canary states; every key the guard
        // sends to a canary is one the config sends there too.
        let json = format!(
            r#"{{"splits":[{{"model":"m","versions":[{{"name":"1","weight":{}}},{{"name":"2","weight":{w2}}},{{"name":"3","weight":{w3}}}],
                "guard":{{"max_error_rate":5,"cool_off_s":60,"probe_percent":{probe}}}}}]}}"#,
            100 - w2 - w3
        );
        let cfg = parse(json.as_bytes()).unwrap();
        let g = guard_of(&cfg);
        let mut r = Record::fresh(3);
        for (v, st) in r.versions.iter_mut().skip(1).zip(&states) {
            v.state = match st { 0 => State::Normal, 1 => State::Tripped, _ => State::Probing };
        }
        let eff = r.effective(&cfg.splits[0], &g, 0);
        prop_assert_eq!(eff.is_none(), states.iter().all(|&s| s == 0));
        let guarded = [eff];
        for k in &keys {
            let with = keyed_version(&cfg, &guarded, k);
            let without = keyed_version(&cfg, &[], k);
            prop_assert!(with == 0 || with == without, "{} moved from {} to {}", k, without, with);
            let state = |v: usize| states.get(v - 1).copied().unwrap_or(0);
            if with == 0 && without != 0 {
                prop_assert!(state(without) != 0, "{} left a normal canary", k);
            }
            if without != 0 && state(without) == 1 {
                prop_assert_eq!(with, 0, "{} still on a tripped canary", k);
            }
        }
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..3_000), fp in any::<u32>()) {
        let _ = Record::decode(&bytes, fp);
        let _ = Record::decode_or_fresh(Some(&bytes), fp, 2);
    }

    #[test]
    fn encode_round_trips(run in ticks(), fp in any::<u32>()) {
        let cfg = config(r#"{"window_s":2,"min_requests":5,"max_error_rate":30,"cool_off_s":3}"#);
        let g = guard_of(&cfg);
        let mut r = Record::fresh(2);
        let mut now = 0u64;
        for t in run {
            now += t.dt;
            r.add(&g, now, &[tally(t.base.0, t.base.1.min(t.base.0), 1), tally(t.canary.0, t.canary.1.min(t.canary.0), t.canary.2)]);
            r.step(&g, now);
        }
        prop_assert_eq!(Record::decode(&r.encode(fp), fp), Ok(r));
    }
}
