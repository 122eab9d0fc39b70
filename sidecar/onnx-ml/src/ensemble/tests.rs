use proptest::prelude::*;

use super::*;

/// A random complete-ish tree in attribute form: `(modes, features,
/// thresholds, true ids, false ids, missing flags, leaf weights per node)`.
fn tree_attrs(depth: u32, seed: &[u32], thresholds: &[f32], n_features: i64) -> TreeAttrs {
    let mut a = TreeAttrs {
        n_targets: 1,
        ..TreeAttrs::default()
    };
    let mut next = 0usize;
    let mut pick = || {
        let v = seed[next % seed.len()];
        next += 1;
        v
    };
    fn build(
        a: &mut TreeAttrs,
        depth: u32,
        pick: &mut dyn FnMut() -> u32,
        thresholds: &[f32],
        n_features: i64,
    ) -> i64 {
        let id = a.nodes_nodeids.len() as i64;
        a.nodes_treeids.push(0);
        a.nodes_nodeids.push(id);
        let leaf = depth == 0 || pick().is_multiple_of(5);
        if leaf {
            a.nodes_featureids.push(0);
            a.nodes_modes.push(Mode::Leaf);
            a.nodes_values.push(Threshold::F32(0.0));
            a.nodes_truenodeids.push(0);
            a.nodes_falsenodeids.push(0);
            a.nodes_missing_value_tracks_true.push(false);
            a.leaf_treeids.push(0);
            a.leaf_nodeids.push(id);
            a.leaf_targetids.push(0);
            a.leaf_weights.push(id as f32);
            return id;
        }
        a.nodes_featureids.push(i64::from(pick()) % n_features);
        a.nodes_modes.push(Mode::Leq);
        a.nodes_values.push(Threshold::F32(
            thresholds[pick() as usize % thresholds.len()],
        ));
        a.nodes_truenodeids.push(0);
        a.nodes_falsenodeids.push(0);
        a.nodes_missing_value_tracks_true
            .push(pick().is_multiple_of(2));
        let t = build(a, depth - 1, pick, thresholds, n_features);
        let f = build(a, depth - 1, pick, thresholds, n_features);
        a.nodes_truenodeids[id as usize] = t;
        a.nodes_falsenodeids[id as usize] = f;
        id
    }
    build(&mut a, depth, &mut pick, thresholds, n_features);
    a
}

/// LEQ → GTE with the next f32 up as threshold and swapped children (and
/// flipped missing-value tracking): the rewrite the example models use.
fn to_gte(a: &TreeAttrs) -> TreeAttrs {
    let mut b = a.clone();
    for i in 0..b.nodes_modes.len() {
        if b.nodes_modes[i] == Mode::Leq {
            b.nodes_modes[i] = Mode::Gte;
            if let Threshold::F32(t) = b.nodes_values[i] {
                b.nodes_values[i] = Threshold::F32(next_up(t));
            }
            let (t, f) = (b.nodes_truenodeids[i], b.nodes_falsenodeids[i]);
            b.nodes_truenodeids[i] = f;
            b.nodes_falsenodeids[i] = t;
            b.nodes_missing_value_tracks_true[i] = !b.nodes_missing_value_tracks_true[i];
        }
    }
    b
}

const GRID: [f32; 6] = [-1.5, -0.5, 0.0, 0.5, 1.0, 2.25];

fn feature() -> impl Strategy<Value = f32> {
    prop_oneof![
        (0..GRID.len()).prop_map(|i| GRID[i]),
        Just(f32::NAN),
        -3.0f32..3.0,
    ]
}

proptest! {
    #[test]
    fn gte_rewrite_gives_the_same_answers(
        depth in 0u32..6,
        seed in prop::collection::vec(any::<u32>(), 1..64),
        rows in prop::collection::vec(prop::collection::vec(feature(), 3), 1..20),
    ) {
        let leq = tree_attrs(depth, &seed, &GRID, 3);
        let gte = to_gte(&leq);
        let a = Ensemble::build(&leq).unwrap();
        let b = Ensemble::build(&gte).unwrap();
        let x: Vec<f32> = rows.concat();
        prop_assert_eq!(a.regress(&x, 3).unwrap(), b.regress(&x, 3).unwrap());
    }

    #[test]
    fn batch_equals_rows_one_by_one(
        depth in 0u32..6,
        seed in prop::collection::vec(any::<u32>(), 1..64),
        rows in prop::collection::vec(prop::collection::vec(feature(), 3), 1..20),
    ) {
        let e = Ensemble::build(&tree_attrs(depth, &seed, &GRID, 3)).unwrap();
        let x: Vec<f32> = rows.concat();
        let batch = e.regress(&x, 3).unwrap();
        for (r, row) in rows.iter().enumerate() {
            prop_assert_eq!(e.regress(row, 3).unwrap()[0].to_bits(), batch[r].to_bits());
        }
    }

    #[test]
    fn double_thresholds_round_to_the_same_comparisons(t in any::<f64>(), x in any::<f32>()) {
        prop_assume!(t.is_finite());
        for mode in [Mode::Leq, Mode::Lt, Mode::Gte, Mode::Gt, Mode::Eq, Mode::Neq] {
            let t32 = round_threshold(mode, t);
            let x64 = f64::from(x);
            let want = match mode {
                Mode::Leq => x64 <= t,
                Mode::Lt => x64 < t,
                Mode::Gte => x64 >= t,
                Mode::Gt => x64 > t,
                Mode::Eq => x64 == t,
                Mode::Neq => x64 != t,
                Mode::Leaf => unreachable!(),
            };
            prop_assert_eq!(compare(mode, x, t32), want, "{:?} x={} t={}", mode, x, t);
        }
    }

    /// Arbitrary attribute soup: build answers Ok or Err, never panics,
    /// and an Ok ensemble evaluates any input without panicking.
    #[test]
    fn build_never_panics(
        n in 1usize..12,
        ids in prop::collection::vec(-2i64..12, 60),
        modes in prop::collection::vec(0u32..7, 12),
        weights in prop::collection::vec(-2.0f32..2.0, 0..12),
        x in prop::collection::vec(feature(), 8),
    ) {
        let a = TreeAttrs {
            nodes_treeids: ids[0..n].iter().map(|v| v.rem_euclid(2)).collect(),
            nodes_nodeids: ids[12..12 + n].to_vec(),
            nodes_featureids: ids[24..24 + n].to_vec(),
            nodes_modes: modes[..n].iter().map(|&m| Mode::from_bits(m)).collect(),
            nodes_values: vec![Threshold::F32(0.5); n],
            nodes_truenodeids: ids[36..36 + n].to_vec(),
            nodes_falsenodeids: ids[48..48 + n].to_vec(),
            nodes_missing_value_tracks_true: vec![],
            leaf_treeids: weights.iter().enumerate().map(|(i, _)| ids[i] % 2).collect(),
            leaf_nodeids: weights.iter().enumerate().map(|(i, _)| ids[12 + i]).collect(),
            leaf_targetids: weights.iter().map(|_| 0).collect(),
            leaf_weights: weights.clone(),
            n_targets: 2,
            ..TreeAttrs::default()
        };
        if let Ok(e) = Ensemble::build(&a) {
            let _ = e.classify(&x, 8);
            let _ = e.regress(&x, 4);
        }
    }
}

#[test]
fn dangling_child_is_an_error_naming_the_attribute() {
    let mut a = tree_attrs(2, &[1, 2, 3], &GRID, 2);
    a.nodes_falsenodeids[0] = 99;
    let e = Ensemble::build(&a).unwrap_err().to_string();
    assert!(e.contains("nodes_falsenodeids") && e.contains("99"), "{e}");
}

#[test]
fn cycle_is_an_error() {
    let mut a = tree_attrs(1, &[1, 2, 3], &GRID, 2);
    // Node 1 points back to the root: the root gets a parent.
    a.nodes_modes[1] = Mode::Leq;
    a.nodes_truenodeids[1] = 0;
    a.nodes_falsenodeids[1] = 2;
    assert!(Ensemble::build(&a).is_err());
}

#[test]
fn too_few_input_columns_is_an_error() {
    let e = Ensemble::build(&tree_attrs(3, &[1, 2, 3, 4], &GRID, 5)).unwrap();
    if e.n_features() > 1 {
        let err = e.regress(&[0.0f32; 4], 1).unwrap_err().to_string();
        assert!(err.contains("features per row"), "{err}");
    }
}
