//! The only module that imports tract: load an ONNX file, fix its input
//! facts (with a symbolic batch dimension), optimise, run.
//!
//! The symbolic plan serves every batch size from the first request on.
//! Small batch sizes (up to [`CONCRETE_MAX_BATCH`]) also get a plan
//! optimised for that concrete shape, built on a background thread the
//! first time the size is seen and used from then on. Measured in
//! instructions per run (BENCHMARKS.md), concrete plans cut batch 1 by
//! 15-36 % on the example MLP and CNN, but from batch 8 on tract picks
//! matmul kernels for the known size that cost 1-25 % more than the ones
//! it runs for a symbolic size, so larger batches stay symbolic.
//!
//! Models with a convolution are the exception: tract convolves a batch
//! of one over a lazy im2col and any larger batch over a copied one, so
//! their batches run row by row on the batch-1 plan (1.6-1.9x the
//! throughput of the batch plan for the example CNN at batch 32 in the
//! sidecar, BENCHMARKS.md).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::model_repo::{ModelConfig, TensorSpec};

mod max_pool;

/// tract-onnx's ONNX parser with the project's ops registered: the tree
/// ensembles (`onnx_ml_ops`) and a row-wise 2-D `MaxPool`.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = onnx_ml_ops::onnx();
    max_pool::register(&mut onnx.op_register);
    onnx
}
use crate::tensor::{Data, DataType};

/// Loading or running a model failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ONNX file cannot be parsed or optimised by tract.
    #[error("model cannot be loaded by the engine")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The model and its config.json disagree, or the model has a shape
    /// this server cannot serve. The text is safe to show to clients.
    #[error("{0}")]
    Signature(String),
    /// A run failed inside tract.
    #[error("engine failed")]
    Run(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// tract produced something the signature did not announce.
    #[error("engine produced an unexpected output")]
    Output(String),
}

fn boxed(e: TractError) -> Box<dyn std::error::Error + Send + Sync> {
    e.into()
}

/// What a loaded model takes and returns, in OIP terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// 0 when the model has no batch dimension.
    pub max_batch_size: usize,
}

/// One input or output tensor: shape and flat data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// The largest batch size that gets a concrete-shape plan; larger ones
/// run on the symbolic plan. Each plan holds its own packed weights, so
/// this also bounds a model's plans to this many.
pub const CONCRETE_MAX_BATCH: usize = 4;

/// An optimised, runnable model. Cheap to share; runs may overlap.
pub struct Engine {
    plan: Arc<TypedRunnableModel>,
    signature: Signature,
    /// Per-batch-size plans; `None` when the model has no batch dimension.
    concrete: Option<Arc<ConcretePlans>>,
    /// Runs batches row by row on the batch-1 plan (see [`row_by_row`]).
    rows: bool,
}

/// Plans for concrete batch sizes, made from the decluttered symbolic
/// model.
struct ConcretePlans {
    model: TypedModel,
    batch: Symbol,
    slots: Mutex<HashMap<usize, Slot>>,
}

#[derive(Clone)]
enum Slot {
    Building,
    Ready(Arc<TypedRunnableModel>),
    /// tract could not specialise the model for this size; the symbolic
    /// plan serves it.
    Failed,
}

impl ConcretePlans {
    fn build(&self, batch: usize) -> TractResult<Arc<TypedRunnableModel>> {
        let subs = HashMap::from([(self.batch.clone(), TDim::Val(batch as i64))]);
        self.model
            .set_symbols(&subs)?
            .into_optimized()?
            .into_runnable()
    }

    fn finish(&self, batch: usize, built: TractResult<Arc<TypedRunnableModel>>) -> Slot {
        let slot = match built {
            Ok(plan) => Slot::Ready(plan),
            Err(e) => {
                tracing::warn!(batch, error = ?e, "no concrete-shape plan; the symbolic plan serves this batch size");
                Slot::Failed
            }
        };
        if let Ok(mut slots) = self.slots.lock() {
            slots.insert(batch, slot.clone());
        }
        slot
    }

    /// The plan for `batch` if it is ready; otherwise starts building it
    /// (once, while there is room) and returns `None`.
    fn get_or_start(self: &Arc<Self>, batch: usize) -> Option<Arc<TypedRunnableModel>> {
        let mut slots = self.slots.lock().ok()?;
        match slots.get(&batch) {
            Some(Slot::Ready(plan)) => return Some(plan.clone()),
            Some(_) => return None,
            None if !(1..=CONCRETE_MAX_BATCH).contains(&batch) => return None,
            None => {}
        }
        slots.insert(batch, Slot::Building);
        drop(slots);
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("plan-build".into())
            .spawn(move || {
                let built = this.build(batch);
                this.finish(batch, built);
            });
        if spawned.is_err() {
            if let Ok(mut slots) = self.slots.lock() {
                slots.remove(&batch);
            }
        }
        None
    }

    /// Builds the plan for `batch` on this thread unless it exists.
    fn prepare(&self, batch: usize) -> bool {
        let existing = self.slots.lock().ok().and_then(|s| s.get(&batch).cloned());
        match existing {
            Some(Slot::Ready(_)) => true,
            Some(Slot::Failed) => false,
            // A background build may be under way; building here too only
            // costs time, and the later insert wins.
            Some(Slot::Building) | None => {
                matches!(self.finish(batch, self.build(batch)), Slot::Ready(_))
            }
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("signature", &self.signature)
            .finish()
    }
}

fn to_datum(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => bool::datum_type(),
        DataType::U8 => u8::datum_type(),
        DataType::U16 => u16::datum_type(),
        DataType::U32 => u32::datum_type(),
        DataType::U64 => u64::datum_type(),
        DataType::I8 => i8::datum_type(),
        DataType::I16 => i16::datum_type(),
        DataType::I32 => i32::datum_type(),
        DataType::I64 => i64::datum_type(),
        DataType::F16 => f16::datum_type(),
        DataType::F32 => f32::datum_type(),
        DataType::F64 => f64::datum_type(),
        DataType::Bytes => String::datum_type(),
    }
}

fn from_datum(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::String => DataType::Bytes,
        // tract types integer shape arithmetic (ArgMax, Shape, ...) as
        // symbolic dims; they are plain i64 once computed.
        DatumType::TDim => DataType::I64,
        _ => return None,
    })
}

impl Engine {
    /// Loads `path`, checks it against `config`, optimises it for a batch
    /// dimension `N` in `1..=max_batch_size` (one plan for all sizes).
    pub fn load(path: &Path, config: &ModelConfig) -> Result<Engine, EngineError> {
        let mut model = onnx()
            .model_for_path(path)
            .map_err(|e| EngineError::Load(boxed(e)))?;
        let n_inputs = model
            .input_outlets()
            .map_err(|e| EngineError::Load(boxed(e)))?
            .len();
        let input_names: Vec<String> = (0..n_inputs)
            .map(|i| outlet_name(&model, true, i))
            .collect::<Result<_, _>>()?;

        let mut max_batch_size = config.max_batch_size;
        let inputs: Vec<TensorSpec> = match &config.inputs {
            Some(specs) => {
                if specs.len() != n_inputs {
                    return Err(EngineError::Signature(format!(
                        "config.json declares {} inputs, the model has {n_inputs}",
                        specs.len()
                    )));
                }
                // Order follows the model; the config may list them in any order.
                let mut ordered = Vec::with_capacity(n_inputs);
                for (i, name) in input_names.iter().enumerate() {
                    let spec = specs.iter().find(|s| &s.name == name).ok_or_else(|| {
                        EngineError::Signature(format!(
                            "model input {name:?} is not declared in config.json inputs"
                        ))
                    })?;
                    let fact = model
                        .input_fact(i)
                        .map_err(|e| EngineError::Load(boxed(e)))?;
                    if let Some(dt) = fact.datum_type.concretize() {
                        if dt != to_datum(spec.datatype) {
                            return Err(EngineError::Signature(format!(
                                "input {name:?}: config.json says {}, the model takes {dt:?}",
                                spec.datatype
                            )));
                        }
                    }
                    ordered.push(spec.clone());
                }
                ordered
            }
            None => {
                let mut specs = Vec::with_capacity(n_inputs);
                let mut all_batched = true;
                for (i, name) in input_names.iter().enumerate() {
                    let fact = model
                        .input_fact(i)
                        .map_err(|e| EngineError::Load(boxed(e)))?;
                    let dt = fact
                        .datum_type
                        .concretize()
                        .and_then(from_datum)
                        .ok_or_else(|| {
                            EngineError::Signature(format!(
                                "input {name:?} has no usable datatype; declare it in config.json"
                            ))
                        })?;
                    if fact.shape.is_open() {
                        return Err(EngineError::Signature(format!(
                            "input {name:?} has an unknown rank; declare it in config.json"
                        )));
                    }
                    let mut shape = Vec::new();
                    for (j, d) in fact.shape.dims().enumerate() {
                        match d.concretize().and_then(|d| d.to_i64().ok()) {
                            Some(v) if v > 0 => shape.push(v),
                            _ if j == 0 => shape.push(-1),
                            _ => {
                                return Err(EngineError::Signature(format!(
                                    "input {name:?} dimension {j} is not fixed; declare it in config.json"
                                )))
                            }
                        }
                    }
                    all_batched &= shape.first() == Some(&-1);
                    specs.push(TensorSpec {
                        name: name.clone(),
                        datatype: dt,
                        shape,
                    });
                }
                if !all_batched {
                    if specs.iter().any(|s| s.shape.first() == Some(&-1)) {
                        return Err(EngineError::Signature(
                            "only some inputs have a batch dimension; declare them in config.json"
                                .into(),
                        ));
                    }
                    max_batch_size = 0;
                }
                specs
            }
        };

        let batch = model.symbols.sym("N");
        for (i, spec) in inputs.iter().enumerate() {
            let shape: TVec<TDim> = spec
                .shape
                .iter()
                .map(|d| {
                    if *d < 0 {
                        batch.clone().into()
                    } else {
                        TDim::from(*d)
                    }
                })
                .collect();
            model
                .set_input_fact(i, InferenceFact::dt_shape(to_datum(spec.datatype), shape))
                .map_err(|e| EngineError::Load(boxed(e)))?;
        }
        if let Some(outs) = &config.outputs {
            let names: Vec<&str> = outs.iter().map(|o| o.name.as_str()).collect();
            let n_out = model
                .output_outlets()
                .map_err(|e| EngineError::Load(boxed(e)))?
                .len();
            let model_outs: Vec<String> = (0..n_out)
                .map(|i| outlet_name(&model, false, i))
                .collect::<Result<_, _>>()?;
            if let Some(missing) = names.iter().find(|n| !model_outs.iter().any(|m| m == *n)) {
                return Err(EngineError::Signature(format!(
                    "config.json output {missing:?} is not an output of the model"
                )));
            }
            model
                .select_outputs_by_name(&names)
                .map_err(|e| EngineError::Load(boxed(e)))?;
        }
        let typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| EngineError::Load(boxed(e)))?;

        let n_out = typed
            .output_outlets()
            .map_err(|e| EngineError::Load(boxed(e)))?
            .len();
        let mut outputs = Vec::with_capacity(n_out);
        for i in 0..n_out {
            let name = outlet_name(&typed, false, i)?;
            let fact = typed
                .output_fact(i)
                .map_err(|e| EngineError::Load(boxed(e)))?;
            let dt = from_datum(fact.datum_type).ok_or_else(|| {
                EngineError::Signature(format!(
                    "output {name:?} has an unsupported datatype {:?}",
                    fact.datum_type
                ))
            })?;
            let shape: Vec<i64> = fact
                .shape
                .iter()
                .map(|d| d.to_i64().unwrap_or(-1))
                .collect();
            let spec = TensorSpec {
                name: name.clone(),
                datatype: dt,
                shape,
            };
            let spec = match config
                .outputs
                .as_ref()
                .and_then(|o| o.iter().find(|o| o.name == name))
            {
                Some(declared) => {
                    if declared.datatype != dt {
                        return Err(EngineError::Signature(format!(
                            "output {name:?}: config.json says {}, the model returns {dt}",
                            declared.datatype
                        )));
                    }
                    declared.clone()
                }
                None => spec,
            };
            outputs.push(spec);
        }
        let plan = typed
            .clone()
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| EngineError::Load(boxed(e)))?;
        let rows = max_batch_size > 0 && row_by_row(&typed, &batch);
        let concrete = (max_batch_size > 0).then(|| {
            Arc::new(ConcretePlans {
                model: typed,
                batch,
                slots: Mutex::new(HashMap::new()),
            })
        });
        Ok(Engine {
            plan,
            signature: Signature {
                inputs,
                outputs,
                max_batch_size,
            },
            concrete,
            rows,
        })
    }

    /// Builds the concrete-shape plan for `batch` now, on this thread
    /// (ahead of traffic, or in tests); false when the model has no batch
    /// dimension, the size gets no concrete plan, or tract cannot
    /// specialise it.
    /// For a model that runs row by row, every size is served by the
    /// batch-1 plan, which is the one built.
    pub fn prepare(&self, batch: usize) -> bool {
        let batch = if self.rows && batch > 1 { 1 } else { batch };
        match &self.concrete {
            Some(c) if (1..=CONCRETE_MAX_BATCH).contains(&batch) => c.prepare(batch),
            _ => false,
        }
    }

    /// This engine with the symbolic plan only (to measure what the
    /// concrete-shape plans change).
    pub fn without_concrete_plans(mut self) -> Engine {
        self.concrete = None;
        self
    }

    /// Whether batches run row by row on the batch-1 plan (models with a
    /// convolution; see `row_by_row`).
    pub fn runs_row_by_row(&self) -> bool {
        self.rows && self.concrete.is_some()
    }

    /// The batch sizes that have a concrete-shape plan ready.
    pub fn concrete_batch_sizes(&self) -> Vec<usize> {
        let Some(c) = &self.concrete else {
            return Vec::new();
        };
        let mut sizes: Vec<usize> = c
            .slots
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(_, slot)| matches!(slot, Slot::Ready(_)))
                    .map(|(b, _)| *b)
                    .collect()
            })
            .unwrap_or_default();
        sizes.sort_unstable();
        sizes
    }

    /// The plan for a run whose first input has `batch` rows.
    fn plan_for(&self, batch: Option<usize>) -> Arc<TypedRunnableModel> {
        match (&self.concrete, batch) {
            (Some(c), Some(b)) => c.get_or_start(b).unwrap_or_else(|| self.plan.clone()),
            _ => self.plan.clone(),
        }
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs one (batched) request. Inputs follow `signature().inputs` in
    /// order and were checked against it; outputs follow `outputs`.
    /// Blocking: call it from a blocking thread.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let batch = inputs.first().and_then(|t| t.shape.first().copied());
        let mut values: TVec<TValue> = TVec::new();
        for t in inputs {
            values.push(to_tract(t)?.into_tvalue());
        }
        let row_plan = match (&self.concrete, batch) {
            (Some(c), Some(b)) if self.rows && b > 1 => c.get_or_start(1),
            _ => None,
        };
        let outs = match (row_plan, batch) {
            (Some(plan), Some(b)) => run_rows(&plan, &values, b),
            _ => self.plan_for(batch).run(values),
        }
        .map_err(|e| EngineError::Run(boxed(e)))?;
        if outs.len() != self.signature.outputs.len() {
            return Err(EngineError::Output(format!(
                "{} outputs, expected {}",
                outs.len(),
                self.signature.outputs.len()
            )));
        }
        outs.iter().map(|t| from_tract(t)).collect()
    }
}

/// Whether batches of this model run faster row by row on its batch-1
/// plan than on a plan for the whole batch: true for models with a
/// convolution, whose outputs all have the batch dimension first. tract
/// runs a convolution at batch 1 over a lazy im2col that reads the image
/// where it lies; at any larger batch (concrete or symbolic) it copies
/// every patch out first, which costs 1.5x the instructions per image
/// (BENCHMARKS.md).
fn row_by_row(model: &TypedModel, batch: &Symbol) -> bool {
    let has_conv = model
        .nodes()
        .iter()
        .any(|n| n.op_is::<tract_onnx::tract_core::ops::cnn::Conv>());
    let batched_outputs = model.output_outlets().is_ok_and(|outs| {
        outs.iter().all(|o| {
            model
                .outlet_fact(*o)
                .is_ok_and(|f| f.shape.dims().first() == Some(&TDim::Sym(batch.clone())))
        })
    });
    has_conv && batched_outputs
}

/// One run per row of the inputs' first dimension on `plan`, outputs
/// stacked back along it.
fn run_rows(
    plan: &Arc<TypedRunnableModel>,
    inputs: &[TValue],
    batch: usize,
) -> TractResult<TVec<TValue>> {
    let mut per_output: Vec<Vec<tract_onnx::prelude::Tensor>> = Vec::new();
    // One state for every row: a run resets its values but keeps the op
    // states, which a fresh state per row would rebuild.
    let mut state = plan.spawn()?;
    for row in 0..batch {
        let one: TVec<TValue> = inputs
            .iter()
            .map(|t| t.slice(0, row, row + 1).map(|t| t.into_tvalue()))
            .collect::<TractResult<_>>()?;
        let outs = state.run(one)?;
        per_output.resize_with(outs.len(), || Vec::with_capacity(batch));
        for (i, o) in outs.into_iter().enumerate() {
            per_output[i].push(o.into_tensor());
        }
    }
    per_output
        .iter()
        .map(|parts| tract_onnx::prelude::Tensor::stack_tensors(0, parts).map(|t| t.into_tvalue()))
        .collect()
}

fn outlet_name<F, O>(model: &Graph<F, O>, input: bool, i: usize) -> Result<String, EngineError>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    let outlets = if input {
        model.input_outlets()
    } else {
        model.output_outlets()
    }
    .map_err(|e| EngineError::Load(boxed(e)))?;
    let Some(outlet) = outlets.get(i) else {
        return Err(EngineError::Signature(
            "model has fewer outlets than expected".into(),
        ));
    };
    Ok(match model.outlet_label(*outlet) {
        Some(label) => label.to_string(),
        None => model.node(outlet.node).name.clone(),
    })
}

fn to_tract(t: Tensor) -> Result<tract_onnx::prelude::Tensor, EngineError> {
    use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
    let shape = IxDyn(&t.shape);
    macro_rules! arr {
        ($v:expr) => {
            ArrayD::from_shape_vec(shape, $v)
                .map(|a| a.into_tensor())
                .map_err(|e| EngineError::Run(Box::new(e)))
        };
    }
    match t.data {
        Data::Bool(v) => arr!(v),
        Data::U8(v) => arr!(v),
        Data::U16(v) => arr!(v),
        Data::U32(v) => arr!(v),
        Data::U64(v) => arr!(v),
        Data::I8(v) => arr!(v),
        Data::I16(v) => arr!(v),
        Data::I32(v) => arr!(v),
        Data::I64(v) => arr!(v),
        Data::F16(v) => arr!(v),
        Data::F32(v) => arr!(v),
        Data::F64(v) => arr!(v),
        Data::Bytes(v) => {
            let strings: Vec<String> = v
                .into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            arr!(strings)
        }
    }
}

fn from_tract(t: &tract_onnx::prelude::Tensor) -> Result<Tensor, EngineError> {
    let shape = t.shape().to_vec();
    macro_rules! vec_of {
        ($t:ty) => {
            t.to_plain_array_view::<$t>()
                .map(|a| a.iter().cloned().collect::<Vec<$t>>())
                .map_err(|e| EngineError::Output(e.to_string()))?
        };
    }
    let data = match t.datum_type() {
        DatumType::Bool => Data::Bool(vec_of!(bool)),
        DatumType::U8 => Data::U8(vec_of!(u8)),
        DatumType::U16 => Data::U16(vec_of!(u16)),
        DatumType::U32 => Data::U32(vec_of!(u32)),
        DatumType::U64 => Data::U64(vec_of!(u64)),
        DatumType::I8 => Data::I8(vec_of!(i8)),
        DatumType::I16 => Data::I16(vec_of!(i16)),
        DatumType::I32 => Data::I32(vec_of!(i32)),
        DatumType::I64 => Data::I64(vec_of!(i64)),
        DatumType::F16 => Data::F16(vec_of!(f16)),
        DatumType::F32 => Data::F32(vec_of!(f32)),
        DatumType::F64 => Data::F64(vec_of!(f64)),
        DatumType::String => Data::Bytes(
            t.to_plain_array_view::<String>()
                .map_err(|e| EngineError::Output(e.to_string()))?
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        ),
        DatumType::TDim => {
            let cast = t
                .cast_to::<i64>()
                .map_err(|e| EngineError::Output(e.to_string()))?;
            Data::I64(
                cast.to_plain_array_view::<i64>()
                    .map_err(|e| EngineError::Output(e.to_string()))?
                    .iter()
                    .copied()
                    .collect(),
            )
        }
        other => return Err(EngineError::Output(format!("datatype {other:?}"))),
    };
    Ok(Tensor { shape, data })
}
