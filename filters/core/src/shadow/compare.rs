//! Shadow agreement: does the candidate answer a copied request as the
//! baseline answered the client?
//!
//! Both answers are OIP v2 inference responses. They agree when both
//! statuses are 200 and every output of the baseline's, compared as
//! [`Compare`] says, agrees with the candidate's output of the same name;
//! an output only the candidate has is not compared. Per output:
//! - `exact`: same datatype, shape and elements (labels, class ids,
//!   strings);
//! - `argmax`: same shape, and the index of the largest element of each
//!   row (the last dimension; the first on ties, as numpy) is the same;
//! - `tolerance`: same shape, and `|a - b| <= abs + rel * |a|` for every
//!   element, `a` the baseline's;
//! - `ignore`.
//!
//! An output not named in the config is compared with `tolerance` when
//! its datatype is floating point and `exact` otherwise. The largest
//! absolute difference between numeric elements (of outputs compared by
//! value) is reported whether or not they agree, for the histogram.

use serde::Deserialize;

use crate::config::canary::{Compare, OutputMode};

/// The outcome of one comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub verdict: Verdict,
    /// Largest absolute difference between numeric elements compared,
    /// `None` if no numeric output was compared.
    pub max_abs_diff: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Agree,
    /// `output` is the first output that differs, `why` how.
    Disagree {
        output: String,
        why: &'static str,
    },
    /// The baseline's answer cannot be compared: it failed (`status`) or
    /// is not an OIP response; not counted either way.
    Incomparable(&'static str),
}

#[derive(Deserialize)]
struct Response {
    outputs: Vec<Output>,
}

#[derive(Deserialize)]
struct Output {
    name: String,
    #[serde(default)]
    datatype: String,
    #[serde(default)]
    shape: Vec<i64>,
    data: serde_json::Value,
}

/// Compares the candidate's answer with the baseline's.
pub fn compare(
    cfg: &Compare,
    baseline_status: u32,
    baseline: &[u8],
    candidate_status: u32,
    candidate: &[u8],
) -> Comparison {
    let verdict = |v| Comparison {
        verdict: v,
        max_abs_diff: None,
    };
    if baseline_status != 200 {
        return verdict(Verdict::Incomparable("baseline_failed"));
    }
    if candidate_status != 200 {
        return verdict(Verdict::Disagree {
            output: String::new(),
            why: "status",
        });
    }
    let Ok(base) = serde_json::from_slice::<Response>(baseline) else {
        return verdict(Verdict::Incomparable("baseline_unreadable"));
    };
    if baseline == candidate {
        return Comparison {
            verdict: Verdict::Agree,
            max_abs_diff: base
                .outputs
                .iter()
                .any(|o| is_float(&o.datatype))
                .then_some(0.0),
        };
    }
    let Ok(cand) = serde_json::from_slice::<Response>(candidate) else {
        return verdict(Verdict::Disagree {
            output: String::new(),
            why: "unreadable",
        });
    };
    let mut max_abs_diff: Option<f64> = None;
    let mut first: Option<(String, &'static str)> = None;
    for b in &base.outputs {
        let mode = cfg
            .outputs
            .get(&b.name)
            .copied()
            .unwrap_or(if is_float(&b.datatype) {
                OutputMode::Tolerance
            } else {
                OutputMode::Exact
            });
        if mode == OutputMode::Ignore {
            continue;
        }
        let outcome = match cand.outputs.iter().find(|c| c.name == b.name) {
            None => Err("missing"),
            Some(c) => compare_output(cfg, mode, b, c, &mut max_abs_diff),
        };
        if let Err(why) = outcome {
            first.get_or_insert_with(|| (b.name.clone(), why));
        }
    }
    Comparison {
        verdict: match first {
            None => Verdict::Agree,
            Some((output, why)) => Verdict::Disagree { output, why },
        },
        max_abs_diff,
    }
}

fn is_float(datatype: &str) -> bool {
    matches!(datatype, "FP16" | "FP32" | "FP64" | "BF16")
}

fn compare_output(
    cfg: &Compare,
    mode: OutputMode,
    b: &Output,
    c: &Output,
    max_abs_diff: &mut Option<f64>,
) -> Result<(), &'static str> {
    if b.shape != c.shape {
        return Err("shape");
    }
    let (mut bs, mut cs) = (Vec::new(), Vec::new());
    flatten(&b.data, &mut bs);
    flatten(&c.data, &mut cs);
    if bs.len() != cs.len() {
        return Err("shape");
    }
    // The largest numeric difference, for every mode but `ignore`.
    let numeric: Option<Vec<(f64, f64)>> = bs
        .iter()
        .zip(&cs)
        .map(|(x, y)| Some((x.as_f64()?, y.as_f64()?)))
        .collect();
    if let Some(pairs) = &numeric {
        if let Some(d) = pairs.iter().map(|(x, y)| (x - y).abs()).reduce(f64::max) {
            *max_abs_diff = Some(max_abs_diff.map_or(d, |m| m.max(d)));
        }
    }
    match mode {
        OutputMode::Ignore => Ok(()),
        OutputMode::Exact => {
            if b.datatype != c.datatype {
                Err("datatype")
            } else if bs == cs {
                Ok(())
            } else {
                Err("values")
            }
        }
        OutputMode::Tolerance => {
            let pairs = numeric.ok_or("not numeric")?;
            let within = pairs
                .iter()
                .all(|(a, x)| (a - x).abs() <= cfg.abs_tolerance + cfg.rel_tolerance * a.abs());
            if within {
                Ok(())
            } else {
                Err("tolerance")
            }
        }
        OutputMode::Argmax => {
            let pairs = numeric.ok_or("not numeric")?;
            let row = b
                .shape
                .last()
                .and_then(|&n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .unwrap_or(pairs.len().max(1));
            let (ba, ca): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
            let same = ba
                .chunks(row)
                .zip(ca.chunks(row))
                .all(|(x, y)| argmax(x) == argmax(y));
            if same {
                Ok(())
            } else {
                Err("argmax")
            }
        }
    }
}

/// Index of the first largest element.
fn argmax(xs: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &x) in xs.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// The leaves of a (possibly nested, row-major) `data` array in order.
fn flatten<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Array(items) => {
            for i in items {
                flatten(i, out);
            }
        }
        leaf => out.push(leaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(outputs: &[(&str, OutputMode)]) -> Compare {
        Compare {
            outputs: outputs
                .iter()
                .map(|(n, m)| ((*n).to_owned(), *m))
                .collect::<BTreeMap<_, _>>(),
            ..Compare::default()
        }
    }

    fn answer(label: i64, probs: &[f64]) -> Vec<u8> {
        serde_json::json!({
            "model_name": "m", "model_version": "1",
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
                {"name": "probabilities", "datatype": "FP32", "shape": [1, probs.len()], "data": probs},
            ]
        })
        .to_string()
        .into_bytes()
    }

    fn verdict(c: &Compare, b: &[u8], x: &[u8]) -> Verdict {
        compare(c, 200, b, 200, x).verdict
    }

    #[test]
    fn identical_answers_agree_with_zero_difference() {
        let a = answer(3, &[0.1, 0.2, 0.7]);
        let c = compare(&Compare::default(), 200, &a, 200, &a);
        assert_eq!(c.verdict, Verdict::Agree);
        assert_eq!(c.max_abs_diff, Some(0.0));
    }

    #[test]
    fn a_different_label_disagrees_and_names_the_output() {
        let c = cfg(&[("probabilities", OutputMode::Ignore)]);
        assert_eq!(
            verdict(&c, &answer(3, &[0.5, 0.5]), &answer(4, &[0.5, 0.5])),
            Verdict::Disagree {
                output: "label".into(),
                why: "values"
            }
        );
    }

    #[test]
    fn argmax_compares_the_largest_index_per_row_not_the_values() {
        let c = cfg(&[("probabilities", OutputMode::Argmax)]);
        let base = answer(2, &[0.1, 0.2, 0.7]);
        let same_top = answer(2, &[0.3, 0.1, 0.6]);
        let other_top = answer(2, &[0.6, 0.1, 0.3]);
        let r = compare(&c, 200, &base, 200, &same_top);
        assert_eq!(r.verdict, Verdict::Agree);
        let d = r.max_abs_diff.unwrap();
        assert!((d - 0.2).abs() < 1e-9, "{d}");
        assert_eq!(
            verdict(&c, &base, &other_top),
            Verdict::Disagree {
                output: "probabilities".into(),
                why: "argmax"
            }
        );
    }

    #[test]
    fn argmax_is_per_row_of_a_batch() {
        let c = cfg(&[("p", OutputMode::Argmax)]);
        let body = |d: &[f64]| {
            serde_json::json!({"outputs": [{"name": "p", "datatype": "FP32", "shape": [2, 2], "data": d}]})
                .to_string()
                .into_bytes()
        };
        assert_eq!(
            verdict(
                &c,
                &body(&[1.0, 0.0, 0.0, 1.0]),
                &body(&[0.9, 0.1, 0.2, 0.8])
            ),
            Verdict::Agree
        );
        assert!(matches!(
            verdict(
                &c,
                &body(&[1.0, 0.0, 0.0, 1.0]),
                &body(&[0.9, 0.1, 0.8, 0.2])
            ),
            Verdict::Disagree { .. }
        ));
    }

    #[test]
    fn float_outputs_default_to_the_tolerances() {
        let c = Compare {
            abs_tolerance: 0.01,
            rel_tolerance: 0.0,
            ..Compare::default()
        };
        let base = answer(1, &[0.5, 0.5]);
        assert_eq!(
            verdict(&c, &base, &answer(1, &[0.505, 0.495])),
            Verdict::Agree
        );
        assert_eq!(
            verdict(&c, &base, &answer(1, &[0.52, 0.48])),
            Verdict::Disagree {
                output: "probabilities".into(),
                why: "tolerance"
            }
        );
        let rel = Compare {
            abs_tolerance: 0.0,
            rel_tolerance: 0.1,
            ..Compare::default()
        };
        let big = |x: f64| {
            serde_json::json!({"outputs": [{"name": "y", "datatype": "FP64", "shape": [1], "data": [x]}]})
                .to_string()
                .into_bytes()
        };
        assert_eq!(verdict(&rel, &big(1000.0), &big(1090.0)), Verdict::Agree);
        assert!(matches!(
            verdict(&rel, &big(1000.0), &big(1110.0)),
            Verdict::Disagree { .. }
        ));
    }

    #[test]
    fn nested_data_and_extra_candidate_outputs() {
        let c = Compare::default();
        let base =
            br#"{"outputs":[{"name":"y","datatype":"FP32","shape":[2,2],"data":[[1,2],[3,4]]}]}"#;
        let cand = br#"{"outputs":[{"name":"extra","datatype":"INT64","shape":[1],"data":[9]},{"name":"y","datatype":"FP32","shape":[2,2],"data":[1,2,3,4]}]}"#;
        assert_eq!(verdict(&c, base, cand), Verdict::Agree);
    }

    #[test]
    fn what_cannot_agree() {
        let c = Compare::default();
        let base = answer(1, &[0.5, 0.5]);
        let why = |x: &[u8]| match verdict(&c, &base, x) {
            Verdict::Disagree { why, .. } => why,
            v => panic!("{v:?}"),
        };
        assert_eq!(why(b"not json"), "unreadable");
        assert_eq!(
            why(br#"{"outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]}"#),
            "missing"
        );
        assert_eq!(
            why(br#"{"outputs":[{"name":"label","datatype":"INT64","shape":[1,1],"data":[1]},{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]}"#),
            "shape"
        );
        assert_eq!(
            why(br#"{"outputs":[{"name":"label","datatype":"INT32","shape":[1],"data":[1]},{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]}"#),
            "datatype"
        );
        assert_eq!(
            compare(&c, 200, &base, 400, br#"{"error":"bad"}"#).verdict,
            Verdict::Disagree {
                output: String::new(),
                why: "status"
            }
        );
    }

    #[test]
    fn a_failed_or_unreadable_baseline_is_not_counted() {
        let c = Compare::default();
        let a = answer(1, &[1.0]);
        assert_eq!(
            compare(&c, 503, b"{}", 200, &a).verdict,
            Verdict::Incomparable("baseline_failed")
        );
        assert_eq!(
            compare(&c, 200, b"<html>", 200, &a).verdict,
            Verdict::Incomparable("baseline_unreadable")
        );
    }

    #[test]
    fn strings_compare_exactly() {
        let c = Compare::default();
        let b = |s: &str| {
            serde_json::json!({"outputs": [{"name": "label", "datatype": "BYTES", "shape": [1], "data": [s]}]})
                .to_string()
                .into_bytes()
        };
        assert_eq!(verdict(&c, &b("class_0"), &b("class_0")), Verdict::Agree);
        assert!(matches!(
            verdict(&c, &b("class_0"), &b("class_1")),
            Verdict::Disagree { .. }
        ));
    }
}
