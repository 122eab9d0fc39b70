use super::*;
use crate::hash::bucket;
use proptest::prelude::*;

fn w(bp: &[Bp]) -> Weights {
    match Weights::new(bp.to_vec()) {
        Ok(w) => w,
        Err(e) => panic!("weights {bp:?} rejected: {e:?}"),
    }
}

#[test]
fn rejects_bad_vectors() {
    assert_eq!(Weights::new(vec![10_000]), Err(WeightsError::TooFew(1)));
    assert_eq!(Weights::new(vec![]), Err(WeightsError::TooFew(0)));
    assert_eq!(
        Weights::new(vec![9_000, 900]),
        Err(WeightsError::Sum(9_900))
    );
    assert_eq!(
        Weights::new(vec![2_000, 6_000, 2_000]),
        Err(WeightsError::SlotOverflow {
            index: 1,
            weight: 6_000,
            slot: 5_000
        })
    );
    assert!(Weights::new(vec![0, 10_000]).is_ok());
    assert!(Weights::new(vec![0, 5_000, 5_000]).is_ok());
}

#[test]
fn slots_tile_the_space() {
    for k in 1..=7 {
        let mut next = 0;
        for i in 1..=k {
            let (s, e) = slot(i, k);
            assert_eq!(s, next, "slot {i}/{k}");
            assert!(e > s);
            next = e;
        }
        assert_eq!(next, BUCKETS, "{k} slots end at {next}");
    }
}

#[test]
fn pick_follows_the_layout_exactly() {
    let two = w(&[7_000, 2_000, 1_000]);
    assert_eq!(two.pick(0), 1);
    assert_eq!(two.pick(1_999), 1);
    assert_eq!(two.pick(2_000), 0);
    assert_eq!(two.pick(4_999), 0);
    assert_eq!(two.pick(5_000), 2);
    assert_eq!(two.pick(5_999), 2);
    assert_eq!(two.pick(6_000), 0);
    assert_eq!(two.pick(9_999), 0);
    assert_eq!(two.pick(10_000), 1, "buckets wrap");
    let all_stable = w(&[10_000, 0]);
    assert!((0..BUCKETS).all(|b| all_stable.pick(b) == 0));
    let all_canary = w(&[0, 10_000]);
    assert!((0..BUCKETS).all(|b| all_canary.pick(b) == 1));
}

#[test]
fn shares_match_weights_over_hashed_keys() {
    let cases: [&[Bp]; 3] = [&[9_000, 1_000], &[7_000, 2_000, 1_000], &[9_900, 100]];
    for bp in cases {
        let weights = w(bp);
        let mut hits = vec![0u32; bp.len()];
        for i in 0..100_000 {
            let v = weights.pick(bucket("m", format!("user-{i}").as_bytes()));
            if let Some(h) = hits.get_mut(v) {
                *h += 1;
            }
        }
        for (v, (&got, &want)) in hits.iter().zip(bp).enumerate() {
            // want bp of 100 000 keys = want * 10; allow ±0.4 points.
            let want = want * 10;
            assert!(
                got.abs_diff(want) <= 400,
                "{bp:?}: version {v} got {got}, want {want}±400"
            );
        }
    }
}

#[test]
fn monotone_over_the_rollout_steps_for_100k_keys() {
    let steps = [100, 500, 2_500, 5_000];
    let mut previous: Option<Vec<usize>> = None;
    for canary in steps {
        let weights = w(&[10_000 - canary, canary]);
        let picks: Vec<usize> = (0..100_000)
            .map(|i| weights.pick(bucket("digits-mlp", format!("k{i}").as_bytes())))
            .collect();
        if let Some(prev) = &previous {
            let back = prev
                .iter()
                .zip(&picks)
                .filter(|(p, n)| **p == 1 && **n == 0)
                .count();
            assert_eq!(
                back, 0,
                "{back} keys went from canary back to stable at {canary}bp"
            );
        }
        previous = Some(picks);
    }
}

fn canary_vector() -> impl Strategy<Value = Vec<Bp>> {
    // 1..=3 canaries, each within its slot, baseline takes the rest.
    (1usize..=3).prop_flat_map(|k| {
        let cap = max_canary_weight(k);
        proptest::collection::vec(0..=cap, k).prop_map(|canaries| {
            let used: Bp = canaries.iter().sum();
            let mut v = vec![BUCKETS - used];
            v.extend(canaries);
            v
        })
    })
}

proptest! {
    #[test]
    fn raising_one_canary_only_takes_from_baseline(
        before in canary_vector(),
        which in 0usize..3,
        raise in 0u32..=10_000,
        buckets in proptest::collection::vec(0u32..BUCKETS, 200),
    ) {
        let k = before.len() - 1;
        let idx = 1 + which % k;
        let cap = max_canary_weight(k);
        let mut after = before.clone();
        let grow = raise.min(cap - after[idx]).min(after[0]);
        after[idx] += grow;
        after[0] -= grow;
        let (b, a) = (w(&before), w(&after));
        for bucket in buckets {
            let (p, n) = (b.pick(bucket), a.pick(bucket));
            // Only move allowed: baseline -> the raised canary.
            prop_assert!(p == n || (p == 0 && n == idx), "bucket {} moved {} -> {}", bucket, p, n);
        }
    }

    #[test]
    fn pick_is_always_a_valid_index(bp in canary_vector(), bucket in any::<u32>()) {
        let weights = w(&bp);
        prop_assert!(weights.pick(bucket) < bp.len());
    }

    #[test]
    fn exact_share_over_the_whole_space(bp in canary_vector()) {
        let weights = w(&bp);
        let mut hits = vec![0u32; bp.len()];
        for b in 0..BUCKETS {
            hits[weights.pick(b)] += 1;
        }
        prop_assert_eq!(hits, bp);
    }
}
