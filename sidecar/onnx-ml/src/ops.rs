//! tract glue: the op builders registered for the ONNX parser, their
//! inference rules, and the typed ops that run an [`Ensemble`].

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::tract_ndarray::{Array1, Array2};
use tract_onnx::tract_hir::internal::*;

use crate::attrs::{self, ClassLabels};
use crate::ensemble::{Ensemble, Label};

type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

fn context(node: &NodeProto, e: crate::SpecError) -> TractError {
    format_err!("{} node {:?}: {e}", node.op_type, node.name)
}

pub fn tree_classifier(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let (attrs, labels) = attrs::parse_classifier(node).map_err(|e| context(node, e))?;
    let ensemble = Ensemble::build(&attrs).map_err(|e| context(node, e))?;
    let op = Trees {
        ensemble: Arc::new(ensemble),
        labels: Some(Arc::new(labels)),
    };
    Ok((expand(op), vec![]))
}

pub fn tree_regressor(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let attrs = attrs::parse_regressor(node).map_err(|e| context(node, e))?;
    let ensemble = Ensemble::build(&attrs).map_err(|e| context(node, e))?;
    let op = Trees {
        ensemble: Arc::new(ensemble),
        labels: None,
    };
    Ok((expand(op), vec![]))
}

pub fn zipmap(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let labels = attrs::zipmap_labels(node).map_err(|e| context(node, e))?;
    Ok((
        expand(ZipMap {
            labels: Arc::new(labels),
        }),
        vec![],
    ))
}

/// A tree ensemble: a classifier when it has labels (outputs: label `[N]`,
/// scores `[N, classes]`), else a regressor (output: `[N, targets]`).
#[derive(Debug, Clone)]
pub struct Trees {
    ensemble: Arc<Ensemble>,
    labels: Option<Arc<ClassLabels>>,
}

// Ops are compared by identity: two loads of the same model are distinct.
impl PartialEq for Trees {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.ensemble, &other.ensemble)
    }
}

impl Eq for Trees {}

impl Trees {
    fn label_type(&self) -> Option<DatumType> {
        self.labels.as_deref().map(|l| match l {
            ClassLabels::Int(_) => i64::datum_type(),
            ClassLabels::Str(_) => String::datum_type(),
        })
    }
}

impl Expansion for Trees {
    fn name(&self) -> StaticName {
        if self.labels.is_some() {
            "TreeEnsembleClassifier".into()
        } else {
            "TreeEnsembleRegressor".into()
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} trees, {} nodes, {} features, {} outputs per row",
            self.ensemble.n_trees(),
            self.ensemble.n_nodes(),
            self.ensemble.n_features(),
            self.ensemble.n_targets()
        )])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.labels.is_some() { 2 } else { 1 })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, self.nboutputs()?)?;
        s.equals(&inputs[0].rank, 2)?;
        let scores = match self.label_type() {
            Some(dt) => {
                s.equals(&outputs[0].datum_type, dt)?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                &outputs[1]
            }
            None => &outputs[0],
        };
        s.equals(&scores.datum_type, f32::datum_type())?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], self.ensemble.n_targets().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, RunTrees(self.clone()), inputs)
    }
}

/// The typed, runnable form of [`Trees`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTrees(Trees);

impl Op for RunTrees {
    fn name(&self) -> StaticName {
        Expansion::name(&self.0)
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Expansion::info(&self.0)
    }

    op_as_typed_op!();
}

fn features_f32<T: Copy>(v: &[T], f: impl Fn(T) -> f32) -> Vec<f32> {
    v.iter().map(|&x| f(x)).collect()
}

impl EvalOp for RunTrees {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        if shape.len() != 2 {
            bail!("tree ensemble input must be 2-D, got shape {shape:?}");
        }
        let (rows, cols) = (shape[0], shape[1]);
        let ens = &*self.0.ensemble;
        let view = input.try_as_plain_ram()?;
        macro_rules! run {
            ($x:expr) => {
                match self.0.labels.as_deref() {
                    Some(labels) => {
                        let (idx, scores) = ens.classify($x, cols)?;
                        let scores = Array2::from_shape_vec((rows, ens.n_targets()), scores)?;
                        let labels = match labels {
                            ClassLabels::Int(l) => {
                                Array1::from_iter(idx.iter().map(|i| match *i {
                                    Label::Class(i) => l.get(i).copied().unwrap_or_default(),
                                    Label::Raw(v) => v,
                                }))
                                .into_tensor()
                            }
                            ClassLabels::Str(l) => Array1::from_iter(idx.iter().map(|i| {
                                let i = match *i {
                                    Label::Class(i) => i,
                                    Label::Raw(v) => v as usize,
                                };
                                l.get(i).cloned().unwrap_or_default()
                            }))
                            .into_tensor(),
                        };
                        tvec!(labels.into_tvalue(), scores.into_tensor().into_tvalue())
                    }
                    None => {
                        let y = ens.regress($x, cols)?;
                        let y = Array2::from_shape_vec((rows, ens.n_targets()), y)?;
                        tvec!(y.into_tensor().into_tvalue())
                    }
                }
            };
        }
        Ok(match input.datum_type() {
            DatumType::F32 => run!(view.as_slice::<f32>()?),
            DatumType::F64 => run!(view.as_slice::<f64>()?),
            DatumType::I64 => run!(&features_f32(view.as_slice::<i64>()?, |v| v as f32)),
            DatumType::I32 => run!(&features_f32(view.as_slice::<i32>()?, |v| v as f32)),
            dt => bail!("tree ensemble input must be float, double, int64 or int32, got {dt:?}"),
        })
    }
}

impl TypedOp for RunTrees {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        if input.rank() != 2 {
            bail!("tree ensemble input must be 2-D, got {input:?}");
        }
        if !matches!(
            input.datum_type,
            DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32
        ) {
            bail!(
                "tree ensemble input must be float, double, int64 or int32, got {:?}",
                input.datum_type
            );
        }
        if let Ok(cols) = input.shape[1].to_usize() {
            if cols < self.0.ensemble.n_features() {
                bail!(
                    "the input has {cols} features per row, the trees read feature {}",
                    self.0.ensemble.n_features() - 1
                );
            }
        }
        let n = input.shape[0].clone();
        let scores = f32::fact([n.clone(), self.0.ensemble.n_targets().to_dim()]);
        Ok(match self.0.label_type() {
            Some(dt) => tvec!(dt.fact([n]), scores),
            None => tvec!(scores),
        })
    }

    as_op!();
}

/// ONNX-ML `ZipMap`: per row, a map from class label to probability. Maps
/// are not tensors: the probabilities pass through as the `[N, classes]`
/// FP32 tensor, columns in label order.
#[derive(Debug, Clone)]
pub struct ZipMap {
    labels: Arc<ClassLabels>,
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "probabilities pass through as [N, {}] FP32; labels {:?}",
            self.labels.len(),
            self.labels.to_strings()
        )])
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&inputs[0].shape[1], self.labels.len().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, PassProbabilities, inputs)
    }
}

/// The typed form of [`ZipMap`]: hands its input back. A node of its own
/// (rather than no node) so the model output keeps the ZipMap output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassProbabilities;

impl Op for PassProbabilities {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PassProbabilities {
    op_out_of_plan!();

    fn forwards_input(&self) -> Option<usize> {
        Some(0)
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(inputs)
    }
}

impl TypedOp for PassProbabilities {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}
