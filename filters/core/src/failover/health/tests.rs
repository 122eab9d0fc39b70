use super::*;
use crate::config::failover::{parse, FailureRate};
use proptest::prelude::*;

fn probe(healthy: u16, unhealthy: u16) -> Probe {
    Probe {
        interval_ms: 1_000,
        timeout_ms: 200,
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
        paths: vec!["/v2/health/ready".into()],
    }
}

fn passive(consecutive: u16, rate: Option<(u8, u32, u64)>) -> Passive {
    Passive {
        consecutive_failures: consecutive,
        failure_rate: rate.map(|(percent, min_requests, window_ms)| FailureRate {
            percent,
            min_requests,
            window_ms,
        }),
    }
}

/// Claims a round at `now` and reports `ok` for it at `now + 10`.
fn round(rec: &mut Record, p: &Probe, now: u64, ok: bool) -> Update {
    let seq = rec.claim_probe(p, now).expect("a round is due");
    rec.on_probe_result(p, now + 10, seq, ok)
}

#[test]
fn probes_move_the_state_only_at_the_thresholds() {
    let p = probe(2, 3);
    let mut r = Record::default();
    assert!(r.is_healthy());
    assert_eq!(round(&mut r, &p, 1_000, false), Update::Changed);
    assert_eq!(round(&mut r, &p, 2_000, false), Update::Changed);
    assert!(r.is_healthy(), "2 failures < unhealthy_threshold 3");
    assert_eq!(
        round(&mut r, &p, 3_000, false),
        Update::Transition {
            to: State::Unhealthy,
            cause: Cause::Probe
        }
    );
    assert_eq!(
        (r.state, r.cause, r.changed_at_ms),
        (State::Unhealthy, Cause::Probe, 3_010)
    );
    assert_eq!(round(&mut r, &p, 4_000, true), Update::Changed);
    assert_eq!(round(&mut r, &p, 5_000, false), Update::Changed);
    assert_eq!(r.probe_successes, 0, "a failure resets the success run");
    assert_eq!(round(&mut r, &p, 6_000, true), Update::Changed);
    assert!(!r.is_healthy());
    assert_eq!(
        round(&mut r, &p, 7_000, true),
        Update::Transition {
            to: State::Healthy,
            cause: Cause::Probe
        }
    );
    // A success run while healthy changes counters, not the state.
    assert_eq!(round(&mut r, &p, 8_000, true), Update::Changed);
    assert!(r.is_healthy());
}

#[test]
fn stale_and_unclaimed_results_are_ignored() {
    let p = probe(1, 1);
    let mut r = Record::default();
    assert_eq!(
        r.on_probe_result(&p, 5, 0, false),
        Update::Unchanged,
        "nothing in flight"
    );
    let seq = r.claim_probe(&p, 1_000).unwrap();
    assert_eq!(
        r.on_probe_result(&p, 1_050, seq.wrapping_add(1), false),
        Update::Unchanged
    );
    assert!(r.probe_in_flight);
    assert_eq!(
        r.on_probe_result(&p, 1_060, seq, false),
        Update::Transition {
            to: State::Unhealthy,
            cause: Cause::Probe
        }
    );
    assert_eq!(
        r.on_probe_result(&p, 1_070, seq, true),
        Update::Unchanged,
        "reported twice"
    );
}

#[test]
fn probe_claims_follow_the_interval_and_the_lease() {
    let p = probe(1, 1); // interval 1000, timeout 200, grace 1000
    let mut r = Record::default();
    let s1 = r
        .claim_probe(&p, 10_000)
        .expect("first round is due at once");
    assert_eq!(r.claim_probe(&p, 10_001), None, "in flight");
    assert_eq!(r.claim_probe(&p, 11_199), None, "lease not expired");
    assert_eq!(r.on_probe_result(&p, 10_100, s1, true), Update::Changed);
    assert_eq!(r.claim_probe(&p, 10_999), None, "interval not over");
    let s2 = r.claim_probe(&p, 11_000).expect("due after the interval");
    assert_ne!(s1, s2);
    // The owner vanishes: the round is reclaimed after timeout + grace.
    assert_eq!(r.claim_probe(&p, 12_199), None);
    let s3 = r.claim_probe(&p, 12_200).expect("lost round reclaimed");
    assert_eq!(
        r.on_probe_result(&p, 12_250, s2, false),
        Update::Unchanged,
        "late result of the lost round"
    );
    assert!(r.probe_in_flight);
    assert_eq!(r.on_probe_result(&p, 12_260, s3, true), Update::Changed);
    // Clock skew of a few ms between workers: not due.
    assert_eq!(r.claim_probe(&p, 12_195), None);
    // The clock jumped back by more than an interval: start afresh.
    assert!(r.claim_probe(&p, 5_000).is_some());
}

#[test]
fn live_failures_eject_only_a_healthy_cloud() {
    let ps = passive(3, None);
    let mut r = Record::default();
    assert_eq!(
        r.on_live_result(&ps, 1, true),
        Update::Unchanged,
        "nothing to count"
    );
    assert_eq!(r.on_live_result(&ps, 2, false), Update::Changed);
    assert_eq!(r.on_live_result(&ps, 3, false), Update::Changed);
    assert_eq!(
        r.on_live_result(&ps, 4, true),
        Update::Changed,
        "success resets the run"
    );
    assert_eq!(r.live_failures, 0);
    assert_eq!(r.on_live_result(&ps, 5, false), Update::Changed);
    assert_eq!(r.on_live_result(&ps, 6, false), Update::Changed);
    assert_eq!(
        r.on_live_result(&ps, 7, false),
        Update::Transition {
            to: State::Unhealthy,
            cause: Cause::LiveFailures
        }
    );
    assert_eq!(r.changed_at_ms, 7);
    assert_eq!(
        r.on_live_result(&ps, 8, false),
        Update::Unchanged,
        "ignored while out"
    );
    assert_eq!(
        r.on_live_result(&ps, 9, true),
        Update::Unchanged,
        "only probes readmit"
    );
    assert!(!r.is_healthy());
    // Readmission needs the full healthy_threshold run, counted from 0.
    let p = probe(2, 1);
    assert_eq!(round(&mut r, &p, 1_000, true), Update::Changed);
    assert!(matches!(
        round(&mut r, &p, 2_000, true),
        Update::Transition {
            to: State::Healthy,
            ..
        }
    ));
}

#[test]
fn failure_rate_in_a_window() {
    // 50% over ≥ 4 requests in 1 s; consecutive threshold out of reach.
    let ps = passive(100, Some((50, 4, 1_000)));
    let mut r = Record::default();
    for (t, ok) in [(0, true), (10, false), (20, true)] {
        assert_eq!(r.on_live_result(&ps, t, ok), Update::Changed);
    }
    assert_eq!((r.window_requests, r.window_failures), (3, 1));
    // 4th request fails: 2/4 = 50% ≥ 50%.
    assert_eq!(
        r.on_live_result(&ps, 30, false),
        Update::Transition {
            to: State::Unhealthy,
            cause: Cause::LiveFailureRate
        }
    );

    // The same pattern spread over two windows does not trip.
    let mut r = Record::default();
    for (t, ok) in [
        (0, true),
        (10, false),
        (20, true),
        (1_000, false),
        (1_010, true),
    ] {
        assert_ne!(
            r.on_live_result(&ps, t, ok),
            Update::Transition {
                to: State::Unhealthy,
                cause: Cause::LiveFailureRate
            }
        );
    }
    assert!(r.is_healthy());
    assert_eq!(
        (r.window_start_ms, r.window_requests, r.window_failures),
        (1_000, 2, 1)
    );
    // Below min_requests, even 100% failures do not trip.
    let mut r = Record::default();
    let ps = passive(100, Some((10, 5, 1_000)));
    for t in 0..4 {
        assert_eq!(r.on_live_result(&ps, t, false), Update::Changed);
    }
    assert!(matches!(
        r.on_live_result(&ps, 4, false),
        Update::Transition { .. }
    ));
}

#[test]
fn fingerprint_and_key_follow_the_config() {
    let a =
        parse(br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb"}]}"#).unwrap();
    let moved =
        parse(br#"{"clouds":[{"name":"a","cluster":"ca2"},{"name":"b","cluster":"cb"}]}"#).unwrap();
    let probed = parse(br#"{"clouds":[{"name":"a","cluster":"ca"},{"name":"b","cluster":"cb"}],"health":{"probe":{"models":[{"model":"m"}]}}}"#).unwrap();
    let tuned = parse(br#"{"clouds":[{"name":"a","cluster":"ca","cost":3},{"name":"b","cluster":"cb"}],"health":{"probe":{"interval_ms":1500}}}"#).unwrap();
    assert_ne!(fingerprint(&a, 0), fingerprint(&a, 1));
    assert_ne!(
        fingerprint(&a, 0),
        fingerprint(&moved, 0),
        "cluster changed"
    );
    assert_eq!(fingerprint(&a, 1), fingerprint(&moved, 1));
    assert_ne!(
        fingerprint(&a, 0),
        fingerprint(&probed, 0),
        "probe paths changed"
    );
    assert_eq!(
        fingerprint(&a, 0),
        fingerprint(&tuned, 0),
        "tuning keeps state"
    );
    assert_eq!(shared_key("aws-eu"), "infermesh.failover.health.v1.aws-eu");
    assert_eq!(tick_ms(&probe(1, 1)), 200);
    assert_eq!(
        tick_ms(&Probe {
            interval_ms: 100,
            ..probe(1, 1)
        }),
        50
    );
    assert_eq!(
        tick_ms(&Probe {
            interval_ms: 60_000,
            ..probe(1, 1)
        }),
        1_000
    );
}

/// proxy-wasm shared data as Envoy implements it: a CAS token that
/// changes on every write; a write with a stale token fails.
#[derive(Default)]
struct SharedData {
    bytes: Option<Vec<u8>>,
    cas: u32,
}

impl SharedData {
    fn get(&self) -> (Option<Vec<u8>>, u32) {
        (self.bytes.clone(), self.cas)
    }
    fn set(&mut self, bytes: &[u8], cas: u32) -> bool {
        if cas != 0 && cas != self.cas {
            return false;
        }
        self.bytes = Some(bytes.to_vec());
        self.cas += 1;
        true
    }
}

#[test]
fn workers_sharing_a_record_probe_once_per_interval() {
    let p = probe(2, 2); // interval 1000
    let fp = 42;
    let mut shared = SharedData::default();
    shared.set(&Record::default().encode(fp), 0);
    // Four workers tick every 200 ms, slightly out of phase; each reads,
    // and a worker interleaving between another's read and write makes
    // that write fail (CAS), as it would in Envoy.
    let mut probes: Vec<(u64, usize)> = Vec::new();
    let mut pending: Vec<(u64, u32)> = Vec::new();
    let mut lost = 0;
    for t in (0..20_000u64).step_by(200) {
        let reads: Vec<(Option<Vec<u8>>, u32)> = (0..4).map(|_| shared.get()).collect();
        for (w, (bytes, cas)) in reads.into_iter().enumerate() {
            let now = t + w as u64;
            let mut rec = Record::decode_or_fresh(bytes.as_deref(), fp);
            let mut claimed = rec.claim_probe(&p, now);
            let mut cas = cas;
            // A loser re-reads and recomputes, up to a few times.
            for _ in 0..4 {
                let Some(seq) = claimed else { break };
                if shared.set(&rec.encode(fp), cas) {
                    probes.push((now, w));
                    pending.push((now + 50, seq));
                    break;
                }
                lost += 1;
                let (b, c) = shared.get();
                rec = Record::decode_or_fresh(b.as_deref(), fp);
                cas = c;
                claimed = rec.claim_probe(&p, now);
            }
        }
        // Results come back within 50 ms.
        pending.retain(|&(at, seq)| {
            if at > t + 200 {
                return true;
            }
            let (b, cas) = shared.get();
            let mut rec = Record::decode_or_fresh(b.as_deref(), fp);
            if rec.on_probe_result(&p, at, seq, true) != Update::Unchanged {
                assert!(shared.set(&rec.encode(fp), cas));
            }
            false
        });
    }
    assert_eq!(
        probes.len(),
        20,
        "one round per second for 20 s: {probes:?}"
    );
    for pair in probes.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= 1_000, "rounds too close: {pair:?}");
    }
    assert!(
        lost > 20,
        "workers contended for the slots ({lost} CAS losses)"
    );
}

proptest! {
    /// Probe results whose runs stay below the thresholds never change the
    /// state, whatever the interleaving.
    #[test]
    fn hysteresis_never_flaps(
        healthy in 2u16..6,
        unhealthy in 2u16..6,
        start_unhealthy in any::<bool>(),
        results in proptest::collection::vec(any::<bool>(), 1..200),
    ) {
        let p = probe(healthy, unhealthy);
        let mut r = Record::default();
        if start_unhealthy {
            r.state = State::Unhealthy;
        }
        let start = r.state;
        // Cut every run short of the threshold that would flip `start`.
        let limit = if start_unhealthy { healthy } else { unhealthy };
        let flipping = start_unhealthy; // results equal to this extend the run
        let mut run = 0u16;
        let mut t = 1_000u64;
        for ok in results {
            let ok = if ok == flipping && run + 1 >= limit { !flipping } else { ok };
            run = if ok == flipping { run + 1 } else { 0 };
            let update = round(&mut r, &p, t, ok);
            prop_assert!(!matches!(update, Update::Transition { .. }), "{:?} at {}", update, t);
            t += 1_000;
        }
        prop_assert_eq!(r.state, start);
    }

    /// A run that reaches the threshold always flips the state.
    #[test]
    fn a_full_run_always_flips(healthy in 1u16..6, unhealthy in 1u16..6, noise in proptest::collection::vec(any::<bool>(), 0..20)) {
        let p = probe(healthy, unhealthy);
        let mut r = Record::default();
        let mut t = 1_000u64;
        for ok in noise {
            round(&mut r, &p, t, ok);
            t += 1_000;
        }
        let (want, ok, n) = if r.is_healthy() {
            (State::Unhealthy, false, unhealthy)
        } else {
            (State::Healthy, true, healthy)
        };
        for _ in 0..n {
            round(&mut r, &p, t, ok);
            t += 1_000;
        }
        prop_assert_eq!(r.state, want);
    }
}
