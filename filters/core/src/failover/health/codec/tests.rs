use super::*;
use crate::config::failover::{FailureRate, Passive, Probe};
use proptest::prelude::*;

#[test]
fn records_round_trip_and_reject_garbage() {
    let mut r = Record::default();
    let p = Probe {
        interval_ms: 1_000,
        timeout_ms: 100,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        paths: Vec::new(),
    };
    let passive = Passive {
        consecutive_failures: 9,
        failure_rate: Some(FailureRate {
            percent: 50,
            min_requests: 2,
            window_ms: 1_000,
        }),
    };
    r.claim_probe(&p, 123_456_789).unwrap();
    r.on_live_result(&passive, 123_456_800, false);
    assert!(r.probe_in_flight && r.window_failures == 1 && r.live_failures == 1);
    let bytes = r.encode(0xdead_beef);
    assert_eq!(bytes.len(), RECORD_BYTES);
    assert_eq!(bytes[0], FORMAT);
    assert_eq!(Record::decode(&bytes, 0xdead_beef), Ok(r));
    assert_eq!(Record::decode(&bytes, 1), Err(DecodeError::Fingerprint));
    assert_eq!(
        Record::decode(&bytes[..55], 0xdead_beef),
        Err(DecodeError::Length(55))
    );
    assert_eq!(Record::decode(&[], 0), Err(DecodeError::Length(0)));
    let mut other = bytes;
    other[0] = 2;
    assert_eq!(
        Record::decode(&other, 0xdead_beef),
        Err(DecodeError::Format(2))
    );
    let mut flipped = bytes;
    flipped[20] ^= 1;
    assert_eq!(
        Record::decode(&flipped, 0xdead_beef),
        Err(DecodeError::Check)
    );
    assert_eq!(
        Record::decode_or_fresh(Some(&flipped), 0xdead_beef),
        Record::default()
    );
    assert_eq!(Record::decode_or_fresh(None, 7), Record::default());
    assert_eq!(Record::decode_or_fresh(Some(&bytes), 0xdead_beef), r);
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        (
            any::<bool>(),
            0u8..4,
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
        ),
        (
            any::<u64>(),
            any::<bool>(),
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |((unhealthy, cause, changed, ps, pf, seq), (started, inflight, lf, ws, wr, wf))| {
                Record {
                    state: if unhealthy {
                        State::Unhealthy
                    } else {
                        State::Healthy
                    },
                    cause: Cause::ALL[usize::from(cause)],
                    changed_at_ms: changed,
                    probe_successes: ps,
                    probe_failures: pf,
                    probe_seq: seq,
                    probe_started_ms: started,
                    probe_in_flight: inflight,
                    live_failures: lf,
                    window_start_ms: ws,
                    window_requests: wr,
                    window_failures: wf.min(wr),
                }
            },
        )
}

proptest! {
    #[test]
    fn encode_decode_round_trips(r in arb_record(), fp in any::<u32>()) {
        prop_assert_eq!(Record::decode(&r.encode(fp), fp), Ok(r));
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), fp in any::<u32>()) {
        // Random bytes essentially never pass the check word.
        let got = Record::decode(&bytes, fp);
        prop_assert!(got.is_err(), "{:?}", got);
        prop_assert_eq!(Record::decode_or_fresh(Some(&bytes), fp), Record::default());
    }

    #[test]
    fn decode_never_panics_on_mutated_records(r in arb_record(), at in 0usize..RECORD_BYTES, x in 1u8..) {
        let mut b = r.encode(9);
        b[at] ^= x;
        prop_assert!(Record::decode(&b, 9).is_err());
    }

}
