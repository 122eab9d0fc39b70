//! ONNX-ML tree ensembles for tract-onnx: `TreeEnsembleClassifier`,
//! `TreeEnsembleRegressor` and `ZipMap`, registered over tract's own
//! versions so that models exported by scikit-learn (skl2onnx), XGBoost or
//! LightGBM load with a compact, fast evaluator that agrees with
//! onnxruntime.
//!
//! ```no_run
//! use tract_onnx::prelude::*;
//!
//! let model = onnx_ml_ops::onnx().model_for_path("forest.onnx");
//! ```
//!
//! `ZipMap` turns class probabilities into a sequence of maps, which a
//! tensor runtime cannot represent: here it passes the `[N, classes]` FP32
//! probability tensor through unchanged, columns in the order of its
//! `classlabels_*` attribute (use [`zipmap_labels`] to read them).

mod attrs;
pub mod ensemble;
mod ops;

pub use attrs::{parse_classifier, parse_regressor, zipmap_labels, ClassLabels};
pub use ensemble::{Aggregate, Ensemble, Label, Mode, PostTransform, Threshold, TreeAttrs};

use tract_onnx::model::OnnxOpRegister;

/// A model attribute is missing, malformed or inconsistent, or an input
/// does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("attribute {attr}: {msg}")]
    Attr { attr: &'static str, msg: String },
    #[error("{0}")]
    Input(String),
}

/// Registers the ops of this crate into an ONNX op register, replacing
/// tract-onnx's `TreeEnsembleClassifier` and adding `TreeEnsembleRegressor`
/// and `ZipMap`. tract's register is keyed by op type alone; these names
/// only exist in the `ai.onnx.ml` domain.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("TreeEnsembleClassifier", ops::tree_classifier);
    reg.insert("TreeEnsembleRegressor", ops::tree_regressor);
    reg.insert("ZipMap", ops::zipmap);
}

/// tract-onnx's ONNX framework with this crate's ops registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}
