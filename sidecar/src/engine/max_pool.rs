//! ONNX `MaxPool` over 2-D NCHW FP32 images, registered over tract's own
//! op: tract walks each output pixel through a generic patch visitor (a
//! third of the example CNN's run at batch 1), this walks whole output
//! rows. Shapes and padding are tract's own (its `PoolSpec`), so both ops
//! agree on every attribute ONNX defines; whatever this op does not
//! cover (the `Indices` output, other ranks or types) is left to tract.

use std::sync::OnceLock;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::cnn::HirMaxPool;

type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;
type OpBuilder = fn(&ParsingContext, &NodeProto) -> Built;

/// tract's `MaxPool` builder, for the nodes this op leaves to tract.
static TRACT_BUILDER: OnceLock<OpBuilder> = OnceLock::new();

/// Registers this `MaxPool` over the one in `reg`.
pub fn register(reg: &mut OnnxOpRegister) {
    if let Some(builder) = reg.0.get("MaxPool") {
        let _ = TRACT_BUILDER.set(*builder);
    }
    reg.insert("MaxPool", build);
}

fn build(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let tract = TRACT_BUILDER.get();
    if node.output.len() != 1 {
        // The `Indices` output: tract's op computes it.
        return match tract {
            Some(builder) => builder(ctx, node),
            None => bail!(
                "MaxPool node {:?}: the Indices output is not supported",
                node.name
            ),
        };
    }
    let kernel: TVec<usize> = node.get_attr_tvec("kernel_shape")?;
    let dilations: Option<TVec<usize>> = node.get_attr_opt_tvec("dilations")?;
    let strides: Option<TVec<usize>> = node.get_attr_opt_tvec("strides")?;
    // tract indexes these per kernel axis and divides by strides.
    for (name, values) in [
        ("kernel_shape", Some(&kernel)),
        ("dilations", dilations.as_ref()),
        ("strides", strides.as_ref()),
    ] {
        if let Some(v) = values {
            if v.len() != kernel.len() || v.contains(&0) {
                bail!(
                    "MaxPool node {:?}: {name} {v:?} for a {}-D kernel",
                    node.name,
                    kernel.len()
                );
            }
        }
    }
    let spec = PoolSpec::new(
        DataFormat::NCHW,
        kernel,
        padding(node)?,
        dilations,
        strides,
        0,
        0,
    );
    Ok((expand(MaxPool2d(HirMaxPool::new(spec, None))), vec![]))
}

/// The padding as tract's ONNX parser reads it for pools: explicit `pads`
/// win over `auto_pad`; `ceil_mode` rounds the output size up.
fn padding(node: &NodeProto) -> TractResult<PaddingSpec> {
    let ceil_mode = node.get_attr_opt::<isize>("ceil_mode")?.unwrap_or(0) == 1;
    let rank = node.get_attr_tvec::<usize>("kernel_shape")?.len();
    if let Some(pads) = node.get_attr_opt_tvec::<usize>("pads")? {
        if pads.len() != 2 * rank {
            bail!(
                "MaxPool node {:?}: {} pads for a {rank}-D kernel",
                node.name,
                pads.len()
            );
        }
        let (before, after) = pads.split_at(rank);
        return Ok(PaddingSpec::ExplicitOnnxPool(
            before.into(),
            after.into(),
            ceil_mode,
        ));
    }
    Ok(match node.get_attr_opt::<&str>("auto_pad")? {
        None | Some("NOTSET") => {
            PaddingSpec::ExplicitOnnxPool(tvec!(0; rank), tvec!(0; rank), ceil_mode)
        }
        Some("VALID") => PaddingSpec::Valid,
        Some("SAME_UPPER") => PaddingSpec::SameUpper,
        Some("SAME_LOWER") => PaddingSpec::SameLower,
        Some(other) => bail!("MaxPool node {:?}: auto_pad {other:?}", node.name),
    })
}

/// The inference-time op: tract's shape rules; wires [`RunMaxPool2d`]
/// where it applies and tract's `MaxPool` elsewhere.
#[derive(Debug, Clone)]
struct MaxPool2d(HirMaxPool);

impl Expansion for MaxPool2d {
    fn name(&self) -> StaticName {
        "MaxPool".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        self.0.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?;
        let channels = match fact.shape.dims() {
            [_, c, _, _]
                if fact.datum_type == f32::datum_type() && self.0.pool_spec.rank() == 2 =>
            {
                c.to_usize().ok()
            }
            _ => None,
        };
        let Some(c) = channels else {
            return self.0.wire(prefix, model, inputs);
        };
        let spec = PoolSpec {
            input_channels: c,
            output_channels: c,
            ..self.0.pool_spec.clone()
        };
        model.wire_node(prefix, RunMaxPool2d(spec), inputs)
    }
}

/// The typed, runnable op: `[N, C, H, W]` FP32 in, `[N, C, OH, OW]` out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunMaxPool2d(pub PoolSpec);

impl Op for RunMaxPool2d {
    fn name(&self) -> StaticName {
        "MaxPool2d".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(self.0.info())
    }

    op_as_typed_op!();
}

impl EvalOp for RunMaxPool2d {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let &[n, c, h, w] = input.shape() else {
            bail!("MaxPool2d input must be 4-D, got {:?}", input.shape());
        };
        let geo = Geometry::new(&self.0, h, w)?;
        let mut output = Tensor::zero::<f32>(&[n, c, geo.oh, geo.ow])?;
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        {
            let mut dst = output.try_as_plain_ram_mut()?;
            let dst = dst.as_slice_mut::<f32>()?;
            if h * w == 0 {
                // Windows over padding only.
                dst.fill(f32::MIN);
            } else if geo.oh * geo.ow > 0 {
                for (plane, out) in src
                    .chunks_exact(h * w)
                    .zip(dst.chunks_exact_mut(geo.oh * geo.ow))
                {
                    geo.pool_plane(plane, out);
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RunMaxPool2d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        if inputs[0].rank() != 4 || inputs[0].datum_type != f32::datum_type() {
            bail!("MaxPool2d takes a 4-D FP32 input, got {:?}", inputs[0]);
        }
        self.0.output_facts(inputs)
    }

    as_op!();
}

/// One image plane's pooling, resolved for an input size.
#[derive(Debug)]
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    pad_top: usize,
    /// Per kernel column: the output columns `lo..hi` whose tap lands
    /// inside the input row, and the input column of the tap for `lo`.
    spans: TVec<(usize, usize, usize)>,
    /// 2x2 kernel, stride 2, no dilation, every window inside the image.
    two_by_two: bool,
}

impl Geometry {
    fn new(spec: &PoolSpec, h: usize, w: usize) -> TractResult<Geometry> {
        let pads = spec.computed_padding(&[h, w]);
        let (kernel, strides, dilations) = (&spec.kernel_shape, spec.strides(), spec.dilations());
        let (Some(&[kh, kw]), Some(&[sh, sw]), Some(&[dh, dw]), [py, px]) = (
            kernel.get(..2),
            strides.get(..2),
            dilations.get(..2),
            &pads[..],
        ) else {
            bail!("MaxPool2d: a 2-D kernel, strides and dilations are needed");
        };
        if sh == 0 || sw == 0 {
            bail!("MaxPool2d: strides must be positive");
        }
        let (oh, ow) = (py.convoluted, px.convoluted);
        let (pad_top, pad_left) = (py.pad_before, px.pad_before);
        let spans = (0..kw)
            .filter_map(|kx| {
                // Input column of output column `o`: o * sw + kx * dw - pad_left.
                let offset = (kx * dw) as isize - pad_left as isize;
                let last = w as isize - 1 - offset;
                if last < 0 {
                    return None;
                }
                let lo = if offset >= 0 {
                    0
                } else {
                    (offset.unsigned_abs()).div_ceil(sw)
                };
                let hi = (last as usize / sw + 1).min(ow);
                (lo < hi).then(|| (lo, hi, ((lo * sw) as isize + offset) as usize))
            })
            .collect();
        let two_by_two = [kh, kw, sh, sw, dh, dw] == [2, 2, 2, 2, 1, 1]
            && pad_top == 0
            && pad_left == 0
            && 2 * oh <= h
            && 2 * ow <= w;
        Ok(Geometry {
            h,
            w,
            oh,
            ow,
            kh,
            sh,
            sw,
            dh,
            pad_top,
            spans,
            two_by_two,
        })
    }

    /// Pools one `h x w` plane into one `oh x ow` plane.
    fn pool_plane(&self, src: &[f32], dst: &mut [f32]) {
        if self.two_by_two {
            for (oy, row) in dst.chunks_exact_mut(self.ow).enumerate() {
                let top = &src[2 * oy * self.w..][..2 * self.ow];
                let bottom = &src[(2 * oy + 1) * self.w..][..2 * self.ow];
                for ((o, t), b) in row
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    *o = max(max(max(f32::MIN, t[0]), t[1]), max(b[0], b[1]));
                }
            }
            return;
        }
        for (oy, row) in dst.chunks_exact_mut(self.ow).enumerate() {
            row.fill(f32::MIN);
            for ky in 0..self.kh {
                let Some(iy) = (oy * self.sh + ky * self.dh).checked_sub(self.pad_top) else {
                    continue;
                };
                if iy >= self.h {
                    continue;
                }
                let irow = &src[iy * self.w..][..self.w];
                for &(lo, hi, start) in &self.spans {
                    let taps = irow[start..].iter().step_by(self.sw);
                    for (o, &v) in row[lo..hi].iter_mut().zip(taps) {
                        *o = max(*o, v);
                    }
                }
            }
        }
    }
}

/// `b` when it is larger, else `a`: a NaN tap never replaces a value
/// (tract's comparison), and it compiles to one `maxps`.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a < b {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::{
        type_proto, AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, TypeProto,
        ValueInfoProto,
    };
    use tract_onnx::prelude::{Framework, InferenceFact, InferenceModelExt};
    use tract_onnx::tract_core::ops::cnn::MaxPool;

    use super::*;

    fn padding_strategy() -> impl Strategy<Value = PaddingSpec> {
        prop_oneof![
            Just(PaddingSpec::Valid),
            Just(PaddingSpec::SameUpper),
            Just(PaddingSpec::SameLower),
            (
                (0usize..3, 0usize..3),
                (0usize..3, 0usize..3),
                any::<bool>()
            )
                .prop_map(|((t, l), (b, r), ceil)| PaddingSpec::ExplicitOnnxPool(
                    tvec!(t, l),
                    tvec!(b, r),
                    ceil
                )),
        ]
    }

    prop_compose! {
        fn case()(
            n in prop_oneof![Just(1usize), Just(4), Just(32), 1usize..6],
            c in 1usize..4,
            h in 1usize..14,
            w in 1usize..14,
            kernel in (1usize..5, 1usize..5),
            strides in (1usize..4, 1usize..4),
            dilations in (1usize..3, 1usize..3),
            padding in padding_strategy(),
            seed in any::<u64>(),
        ) -> (PoolSpec, [usize; 4], u64) {
            let spec = PoolSpec::new(
                DataFormat::NCHW,
                tvec!(kernel.0, kernel.1),
                padding,
                Some(tvec!(dilations.0, dilations.1)),
                Some(tvec!(strides.0, strides.1)),
                c,
                c,
            );
            (spec, [n, c, h, w], seed)
        }
    }

    /// Values from a small LCG: negative, positive, repeated.
    fn image(shape: &[usize], mut seed: u64) -> Tensor {
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) % 2001) as f32 / 100.0 - 10.0
            })
            .collect();
        Tensor::from_shape(shape, &data).expect("shape fits data")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>()
            .expect("f32 output")
            .iter()
            .copied()
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Same output shape and values as tract's own MaxPool on the
        /// same spec: kernels 1-4, strides 1-3, dilations 1-2, explicit
        /// pads with and without ceil_mode, auto_pad VALID and SAME_*,
        /// odd sizes, batch 1, 4, 32.
        #[test]
        fn agrees_with_tract((spec, shape, seed) in case()) {
            let fact = f32::fact(shape);
            let facts = MaxPool::new(spec.clone(), None).output_facts(&[&fact]);
            // Windows larger than the padded image: no output to compare.
            prop_assume!(facts.as_ref().is_ok_and(|f| f[0]
                .shape
                .as_concrete()
                .is_some_and(|s| s.iter().all(|&d| d > 0))));
            let ours = RunMaxPool2d(spec.clone());
            prop_assert_eq!(ours.output_facts(&[&fact]).expect("facts"), facts.expect("facts"));
            let input = image(&shape, seed).into_tvalue();
            let want = MaxPool::new(spec, None)
                .eval_out_of_plan(tvec!(input.clone()))
                .expect("tract's eval")
                .expect("stateless");
            let got = ours
                .eval_out_of_plan(tvec!(input))
                .expect("eval")
                .expect("stateless");
            prop_assert_eq!(got[0].shape(), want[0].shape());
            prop_assert_eq!(values(&got[0]), values(&want[0]));
        }
    }

    fn ints(name: &str, values: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: values.to_vec(),
            ..Default::default()
        }
    }

    fn int(name: &str, value: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: value,
            ..Default::default()
        }
    }

    fn string(name: &str, value: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::String as i32,
            s: value.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// A one-node ONNX model: `MaxPool(x)` with these attributes.
    fn pool_model(attribute: Vec<AttributeProto>, outputs: &[&str]) -> ModelProto {
        // FP32 tensors of unknown shape (ONNX elem_type 1).
        let value = |name: &str| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: 1,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "pool".into(),
                node: vec![NodeProto {
                    name: "pool".into(),
                    op_type: "MaxPool".into(),
                    input: vec!["x".into()],
                    output: outputs.iter().map(|o| o.to_string()).collect(),
                    attribute,
                    ..Default::default()
                }],
                input: vec![value("x")],
                output: outputs.iter().map(|o| value(o)).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Loads `proto` with `onnx` for a `[N, 3, 7, 9]` FP32 input (N
    /// symbolic, as the engine loads models, or fixed) and runs it.
    fn load_and_run(
        onnx: &tract_onnx::Onnx,
        proto: &ModelProto,
        symbolic: bool,
        input: &Tensor,
    ) -> (Vec<String>, TVec<TValue>) {
        let mut model = onnx.model_for_proto_model(proto).expect("parse");
        let n: TDim = if symbolic {
            model.symbols.sym("N").into()
        } else {
            input.shape()[0].into()
        };
        model
            .set_input_fact(
                0,
                InferenceFact::dt_shape(f32::datum_type(), tvec![n, 3.into(), 7.into(), 9.into()]),
            )
            .expect("input fact");
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .expect("optimise");
        let ops = plan
            .model()
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        let out = plan.run(tvec!(input.clone().into_tvalue())).expect("run");
        (ops, out)
    }

    /// Through the ONNX parser: the registered op serves single-output
    /// 2-D pools, symbolic batch or not, and agrees with tract-onnx's own
    /// parse of the same node; a node asking for Indices is tract's.
    #[test]
    fn registered_for_onnx_nodes_and_agrees_with_tract() {
        let ours = crate::engine::onnx();
        let tract = tract_onnx::onnx();
        let cases: Vec<Vec<AttributeProto>> = vec![
            vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 0, 1, 1]),
                int("ceil_mode", 1),
            ],
            vec![
                ints("kernel_shape", &[2, 3]),
                ints("dilations", &[2, 1]),
                string("auto_pad", "SAME_UPPER"),
            ],
            vec![ints("kernel_shape", &[3, 2]), string("auto_pad", "VALID")],
        ];
        for (i, attrs) in cases.into_iter().enumerate() {
            let proto = pool_model(attrs, &["y"]);
            for (batch, symbolic) in [(1, false), (4, true), (32, true)] {
                let input = image(&[batch, 3, 7, 9], i as u64);
                let (ops, got) = load_and_run(&ours, &proto, symbolic, &input);
                let (tract_ops, want) = load_and_run(&tract, &proto, symbolic, &input);
                assert!(ops.iter().any(|o| o == "MaxPool2d"), "case {i}: {ops:?}");
                assert!(!tract_ops.iter().any(|o| o == "MaxPool2d"));
                assert_eq!(got[0].shape(), want[0].shape(), "case {i}");
                assert_eq!(values(&got[0]), values(&want[0]), "case {i}");
            }
        }
        let proto = pool_model(vec![ints("kernel_shape", &[2, 2])], &["y", "indices"]);
        let input = image(&[2, 3, 7, 9], 7);
        let (ops, got) = load_and_run(&ours, &proto, false, &input);
        let (_, want) = load_and_run(&tract, &proto, false, &input);
        assert!(!ops.iter().any(|o| o == "MaxPool2d"), "{ops:?}");
        assert_eq!(got.len(), 2);
        assert!(got.iter().zip(&want).all(|(g, w)| **g == **w));
    }

    /// Attributes tract would index out of range or divide by: a load
    /// error naming the attribute, not a panic.
    #[test]
    fn malformed_attributes_fail_the_load() {
        for (attrs, named) in [
            (
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[0, 1])],
                "strides",
            ),
            (
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2])],
                "strides",
            ),
            (vec![ints("kernel_shape", &[2, 0])], "kernel_shape"),
            (
                vec![ints("kernel_shape", &[2, 2]), ints("dilations", &[1, 1, 1])],
                "dilations",
            ),
            (
                vec![ints("kernel_shape", &[2, 2]), ints("pads", &[1, 1])],
                "pads",
            ),
        ] {
            let err = crate::engine::onnx()
                .model_for_proto_model(&pool_model(attrs, &["y"]))
                .expect_err(named);
            assert!(format!("{err:?}").contains(named), "{named}: {err:?}");
        }
    }

    #[test]
    fn two_by_two_stride_two_takes_each_window_max() {
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            tvec!(2, 2),
            PaddingSpec::ExplicitOnnxPool(tvec!(0, 0), tvec!(0, 0), false),
            None,
            Some(tvec!(2, 2)),
            1,
            1,
        );
        // 1x1x3x5: the odd last row and column are dropped (floor mode).
        let input = Tensor::from_shape(
            &[1, 1, 3, 5],
            &[
                1.0f32, 9.0, -3.0, -4.0, 50.0, //
                2.0, 3.0, -2.0, -1.0, 60.0, //
                70.0, 80.0, 90.0, 95.0, 99.0,
            ],
        )
        .expect("shape");
        let out = RunMaxPool2d(spec)
            .eval_out_of_plan(tvec!(input.into_tvalue()))
            .expect("eval")
            .expect("stateless");
        assert_eq!(out[0].shape(), &[1, 1, 1, 2]);
        assert_eq!(values(&out[0]), [9.0, -1.0]);
    }

    #[test]
    fn rejects_inputs_that_are_not_4d() {
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            tvec!(2, 2),
            PaddingSpec::Valid,
            None,
            None,
            1,
            1,
        );
        let input = Tensor::from_shape(&[1, 4, 4], &[0.0f32; 16]).expect("shape");
        let err = RunMaxPool2d(spec)
            .eval_out_of_plan(tvec!(input.into_tvalue()))
            .expect_err("3-D input");
        assert!(err.to_string().contains("4-D"), "{err}");
    }
}
