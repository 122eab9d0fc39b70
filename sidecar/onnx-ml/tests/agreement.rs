//! Random tree ensembles (tests/fixtures/random_ensembles.json, made by
//! tests/make_fixtures.py with the onnx helper and onnxruntime) loaded
//! through tract with this crate's ops: labels must equal onnxruntime's and
//! scores be within 1e-5 (absolute, plus 1e-5 relative for large values;
//! 1e-4 after a PROBIT transform),
//! for the whole batch and for single rows.

use std::path::Path;

use serde::Deserialize;
use tract_onnx::prelude::*;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    post_transform: String,
    model: String,
    input: Input,
    scores: Scores,
    labels: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct Input {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<Num>,
}

#[derive(Deserialize)]
struct Scores {
    shape: Vec<usize>,
    data: Vec<Num>,
}

/// A number, or "nan" / "inf" / "-inf" (JSON has none of those).
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Num {
    Finite(f64),
    #[serde(deserialize_with = "special")]
    Special(f64),
}

fn special<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<f64>().map_err(serde::de::Error::custom)
}

impl Num {
    fn get(self) -> f64 {
        match self {
            Num::Finite(v) | Num::Special(v) => v,
        }
    }
}

fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn load(case: &Case, rows: usize) -> Arc<TypedRunnableModel> {
    let bytes = b64(&case.model);
    let mut model = onnx_ml_ops::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap_or_else(|e| panic!("{}: load: {e:?}", case.name));
    let dt = if case.input.dtype == "f64" {
        f64::datum_type()
    } else {
        f32::datum_type()
    };
    model
        .set_input_fact(0, InferenceFact::dt_shape(dt, [rows, case.input.shape[1]]))
        .unwrap();
    model
        .into_optimized()
        .unwrap_or_else(|e| panic!("{}: optimise: {e:?}", case.name))
        .into_runnable()
        .unwrap()
}

fn input(case: &Case, rows: std::ops::Range<usize>) -> Tensor {
    let cols = case.input.shape[1];
    let vals: Vec<f64> = case.input.data[rows.start * cols..rows.end * cols]
        .iter()
        .map(|v| v.get())
        .collect();
    let shape = [rows.len(), cols];
    if case.input.dtype == "f64" {
        Tensor::from_shape(&shape, &vals).unwrap()
    } else {
        let v: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
        Tensor::from_shape(&shape, &v).unwrap()
    }
}

/// Returns the largest score difference seen.
fn check(case: &Case, rows: std::ops::Range<usize>, plan: &Arc<TypedRunnableModel>) -> f64 {
    let outs = plan
        .run(tvec!(input(case, rows.clone()).into_tvalue()))
        .unwrap_or_else(|e| panic!("{}: run: {e:?}", case.name));
    let nt = case.scores.shape[1];
    let scores = outs.last().unwrap();
    assert_eq!(
        scores.shape(),
        &[rows.len(), nt],
        "{}: scores shape",
        case.name
    );
    let got = scores.to_plain_array_view::<f32>().unwrap();
    let got: Vec<f32> = got.iter().copied().collect();
    let want = &case.scores.data[rows.start * nt..rows.end * nt];
    let mut max = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(*g);
        match w.get() {
            w if !w.is_finite() => assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{}: score {i} rows {rows:?}: got {g}, want {w}",
                case.name
            ),
            w => {
                let d = (g - w).abs();
                // onnxruntime's probit is a float approximation that is
                // ill-conditioned near 0.5 (a difference of two ~4.33 terms);
                // its results there differ from the same formula by ~3e-5.
                let atol = if case.post_transform == "PROBIT" {
                    1e-4
                } else {
                    1e-5
                };
                assert!(
                    d <= atol + 1e-5 * w.abs(),
                    "{}: score {i} rows {rows:?}: got {g}, want {w}",
                    case.name
                );
                max = max.max(d);
            }
        }
    }
    if let Some(labels) = &case.labels {
        let want = &labels[rows.clone()];
        let got: Vec<serde_json::Value> = match outs[0].datum_type() {
            DatumType::I64 => outs[0]
                .to_plain_array_view::<i64>()
                .unwrap()
                .iter()
                .map(|&v| v.into())
                .collect(),
            DatumType::String => outs[0]
                .to_plain_array_view::<String>()
                .unwrap()
                .iter()
                .map(|v| v.clone().into())
                .collect(),
            dt => panic!("{}: label type {dt:?}", case.name),
        };
        assert_eq!(got, want, "{}: labels rows {rows:?}", case.name);
    }
    max
}

#[test]
fn random_ensembles_agree_with_onnxruntime() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/random_ensembles.json");
    let fixture: Fixture = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(
        fixture.cases.len() >= 200,
        "fixture has {} cases",
        fixture.cases.len()
    );
    let (mut classifiers, mut regressors, mut max) = (0, 0, 0f64);
    for case in &fixture.cases {
        let rows = case.input.shape[0];
        let plan = load(case, rows);
        max = max.max(check(case, 0..rows, &plan));
        let one = load(case, 1);
        for r in [0, rows / 2, rows - 1] {
            max = max.max(check(case, r..r + 1, &one));
        }
        match case.kind.as_str() {
            "classifier" => classifiers += 1,
            _ => regressors += 1,
        }
    }
    eprintln!(
        "{} classifiers, {} regressors agree; max score difference {max:e}",
        classifiers, regressors
    );
    assert!(classifiers > 50 && regressors > 50);
}
