//! Reading the ONNX-ML attributes of a node into [`TreeAttrs`]. Every
//! missing or malformed attribute is an error that names it.

use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};

use crate::ensemble::{Aggregate, Mode, PostTransform, Threshold, TreeAttrs};
use crate::SpecError;

/// A classifier's labels, in score column order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClassLabels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl ClassLabels {
    pub fn len(&self) -> usize {
        match self {
            ClassLabels::Int(v) => v.len(),
            ClassLabels::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The labels as text (integers in decimal).
    pub fn to_strings(&self) -> Vec<String> {
        match self {
            ClassLabels::Int(v) => v.iter().map(|i| i.to_string()).collect(),
            ClassLabels::Str(v) => v.clone(),
        }
    }
}

fn err(attr: &'static str, msg: impl Into<String>) -> SpecError {
    SpecError::Attr {
        attr,
        msg: msg.into(),
    }
}

fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &'static str) -> Result<Vec<i64>, SpecError> {
    find(node, name)
        .map(|a| a.ints.clone())
        .ok_or_else(|| err(name, "is missing"))
}

fn ints_opt(node: &NodeProto, name: &'static str) -> Vec<i64> {
    find(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn string_opt(node: &NodeProto, name: &'static str) -> Result<Option<String>, SpecError> {
    match find(node, name) {
        None => Ok(None),
        Some(a) => String::from_utf8(a.s.clone())
            .map(Some)
            .map_err(|_| err(name, "is not UTF-8")),
    }
}

fn strings(node: &NodeProto, name: &'static str) -> Result<Option<Vec<String>>, SpecError> {
    let Some(a) = find(node, name) else {
        return Ok(None);
    };
    a.strings
        .iter()
        .map(|s| {
            String::from_utf8(s.clone()).map_err(|_| err(name, "holds a string that is not UTF-8"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Floats from `name` or, failing that, from the tensor `name_as_tensor`
/// (ai.onnx.ml opset 3), as f64 so that double thresholds stay exact.
fn floats(
    node: &NodeProto,
    name: &'static str,
    as_tensor: &'static str,
) -> Result<Option<Vec<f64>>, SpecError> {
    if let Some(a) = find(node, name) {
        if find(node, as_tensor).is_some() {
            return Err(err(name, format!("is given twice, also as {as_tensor}")));
        }
        return Ok(Some(a.floats.iter().map(|&f| f64::from(f)).collect()));
    }
    let Some(a) = find(node, as_tensor) else {
        return Ok(None);
    };
    let Some(t) = &a.t else {
        return Err(err(as_tensor, "holds no tensor"));
    };
    tensor_floats(t).map(Some).map_err(|m| err(as_tensor, m))
}

fn tensor_floats(t: &TensorProto) -> Result<Vec<f64>, String> {
    const FLOAT: i32 = 1;
    const DOUBLE: i32 = 11;
    if !t.raw_data.is_empty() {
        return match t.data_type {
            FLOAT if t.raw_data.len().is_multiple_of(4) => Ok(t
                .raw_data
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()),
            DOUBLE if t.raw_data.len().is_multiple_of(8) => Ok(t
                .raw_data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()),
            FLOAT | DOUBLE => Err("raw data length is not a whole number of elements".into()),
            other => Err(format!("element type {other} is not float or double")),
        };
    }
    match t.data_type {
        FLOAT => Ok(t.float_data.iter().map(|&f| f64::from(f)).collect()),
        DOUBLE => Ok(t.double_data.clone()),
        other => Err(format!("element type {other} is not float or double")),
    }
}

fn post_transform(node: &NodeProto) -> Result<PostTransform, SpecError> {
    match string_opt(node, "post_transform")? {
        None => Ok(PostTransform::None),
        Some(s) => PostTransform::parse(&s).ok_or_else(|| {
            err(
                "post_transform",
                format!("{s:?} is not NONE, SOFTMAX, LOGISTIC, SOFTMAX_ZERO or PROBIT"),
            )
        }),
    }
}

/// The `nodes_*` attributes, shared by both ops.
fn nodes(node: &NodeProto, attrs: &mut TreeAttrs) -> Result<(), SpecError> {
    attrs.nodes_treeids = ints(node, "nodes_treeids")?;
    attrs.nodes_nodeids = ints(node, "nodes_nodeids")?;
    attrs.nodes_featureids = ints(node, "nodes_featureids")?;
    attrs.nodes_truenodeids = ints(node, "nodes_truenodeids")?;
    attrs.nodes_falsenodeids = ints(node, "nodes_falsenodeids")?;
    attrs.nodes_missing_value_tracks_true = ints_opt(node, "nodes_missing_value_tracks_true")
        .into_iter()
        .map(|v| v != 0)
        .collect();
    let modes = strings(node, "nodes_modes")?.ok_or_else(|| err("nodes_modes", "is missing"))?;
    attrs.nodes_modes = modes
        .iter()
        .map(|m| {
            Mode::parse(m).ok_or_else(|| {
                err(
                    "nodes_modes",
                    format!("{m:?} is not one of BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT, BRANCH_EQ, BRANCH_NEQ, LEAF"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let double = find(node, "nodes_values_as_tensor").is_some();
    let values = floats(node, "nodes_values", "nodes_values_as_tensor")?
        .ok_or_else(|| err("nodes_values", "is missing"))?;
    attrs.nodes_values = values
        .into_iter()
        .map(|v| {
            if double {
                Threshold::F64(v)
            } else {
                Threshold::F32(v as f32)
            }
        })
        .collect();
    Ok(())
}

fn base_values(node: &NodeProto) -> Result<Vec<f32>, SpecError> {
    Ok(floats(node, "base_values", "base_values_as_tensor")?
        .unwrap_or_default()
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

/// Reads a `TreeEnsembleClassifier` node.
pub fn parse_classifier(node: &NodeProto) -> Result<(TreeAttrs, ClassLabels), SpecError> {
    let int_labels = find(node, "classlabels_int64s").map(|a| a.ints.clone());
    let str_labels = strings(node, "classlabels_strings")?;
    let labels = match (int_labels, str_labels) {
        (Some(i), None) => ClassLabels::Int(i),
        (None, Some(s)) => ClassLabels::Str(s),
        (None, None) => {
            return Err(err(
                "classlabels_int64s",
                "neither classlabels_int64s nor classlabels_strings is set",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(err(
                "classlabels_int64s",
                "classlabels_int64s and classlabels_strings are both set",
            ))
        }
    };
    if labels.len() < 2 {
        return Err(err(
            "classlabels_int64s",
            format!(
                "{} class labels; a classifier needs at least 2",
                labels.len()
            ),
        ));
    }
    let mut attrs = TreeAttrs::default();
    nodes(node, &mut attrs)?;
    attrs.leaf_treeids = ints(node, "class_treeids")?;
    attrs.leaf_nodeids = ints(node, "class_nodeids")?;
    attrs.leaf_targetids = ints(node, "class_ids")?;
    attrs.leaf_weights = floats(node, "class_weights", "class_weights_as_tensor")?
        .ok_or_else(|| err("class_weights", "is missing"))?
        .into_iter()
        .map(|v| v as f32)
        .collect();
    attrs.n_targets = labels.len();
    attrs.base_values = base_values(node)?;
    attrs.post_transform = post_transform(node)?;
    attrs.aggregate = Aggregate::Sum;
    Ok((attrs, labels))
}

/// Reads a `TreeEnsembleRegressor` node.
pub fn parse_regressor(node: &NodeProto) -> Result<TreeAttrs, SpecError> {
    let mut attrs = TreeAttrs::default();
    nodes(node, &mut attrs)?;
    attrs.leaf_treeids = ints(node, "target_treeids")?;
    attrs.leaf_nodeids = ints(node, "target_nodeids")?;
    attrs.leaf_targetids = ints(node, "target_ids")?;
    attrs.leaf_weights = floats(node, "target_weights", "target_weights_as_tensor")?
        .ok_or_else(|| err("target_weights", "is missing"))?
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let n_targets = find(node, "n_targets").map(|a| a.i).unwrap_or(1);
    if !(1..=1 << 20).contains(&n_targets) {
        return Err(err("n_targets", format!("{n_targets} is out of range")));
    }
    attrs.n_targets = n_targets as usize;
    attrs.base_values = base_values(node)?;
    attrs.post_transform = post_transform(node)?;
    attrs.aggregate = match string_opt(node, "aggregate_function")? {
        None => Aggregate::Sum,
        Some(s) => Aggregate::parse(&s).ok_or_else(|| {
            err(
                "aggregate_function",
                format!("{s:?} is not SUM, AVERAGE, MIN or MAX"),
            )
        })?,
    };
    Ok(attrs)
}

/// The class labels of a `ZipMap` node, in the order of the probability
/// columns.
pub fn zipmap_labels(node: &NodeProto) -> Result<ClassLabels, SpecError> {
    let int_labels = find(node, "classlabels_int64s").map(|a| a.ints.clone());
    let str_labels = strings(node, "classlabels_strings")?;
    match (int_labels, str_labels) {
        (Some(i), None) => Ok(ClassLabels::Int(i)),
        (None, Some(s)) => Ok(ClassLabels::Str(s)),
        _ => Err(err(
            "classlabels_int64s",
            "exactly one of classlabels_int64s and classlabels_strings must be set",
        )),
    }
}
