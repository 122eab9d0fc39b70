//! In-process timing of a tree ensemble model through tract: this crate's
//! ops against tract-onnx's own TreeEnsembleClassifier.
//!
//!   bench_trees MODEL.onnx ROWS.bin N_FEATURES [--tract-too]
//!
//! ROWS.bin holds float32 rows. Prints one JSON line per (runtime, batch):
//! {"runtime": "tract+onnx-ml-ops", "batch": B, "us_per_sample": ...}, the
//! median of five ~0.5 s runs over batches of 1 and 32.

use std::time::Instant;

use tract_onnx::prelude::*;

fn plan(onnx: tract_onnx::Onnx, path: &str, cols: usize) -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = onnx.model_for_path(path)?;
    let n = model.symbols.sym("N");
    model.set_input_fact(0, f32::fact([n.to_dim(), cols.to_dim()]).into())?;
    model.into_optimized()?.into_runnable()
}

fn time(
    plan: &Arc<TypedRunnableModel>,
    rows: &[f32],
    cols: usize,
    batch: usize,
    budget_s: f64,
) -> TractResult<f64> {
    let batches: Vec<Tensor> = rows
        .chunks_exact(cols * batch)
        .take(256)
        .map(|c| Tensor::from_shape(&[batch, cols], c))
        .collect::<TractResult<_>>()?;
    for b in batches.iter().take(20) {
        plan.run(tvec!(b.clone().into_tvalue()))?;
    }
    let mut runs = Vec::new();
    for _ in 0..5 {
        let (mut n, t0) = (0usize, Instant::now());
        while t0.elapsed().as_secs_f64() < budget_s {
            for b in &batches {
                plan.run(tvec!(b.clone().into_tvalue()))?;
                n += batch;
                if t0.elapsed().as_secs_f64() >= budget_s {
                    break;
                }
            }
        }
        runs.push(t0.elapsed().as_secs_f64() / n as f64 * 1e6);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[2])
}

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bench_trees MODEL.onnx ROWS.bin N_FEATURES [--tract-too]");
        std::process::exit(64);
    }
    let cols: usize = args[3].parse()?;
    let bytes = std::fs::read(&args[2])?;
    let rows: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut runtimes = vec![("tract+onnx-ml-ops", onnx_ml_ops::onnx(), 0.5)];
    if args.iter().any(|a| a == "--tract-too") {
        runtimes.push(("tract-onnx", tract_onnx::onnx(), 2.0));
    }
    for (name, onnx, budget) in runtimes {
        let p = plan(onnx, &args[1], cols)?;
        for batch in [1, 32] {
            let us = time(&p, &rows, cols, batch, budget)?;
            println!("{{\"runtime\": \"{name}\", \"batch\": {batch}, \"us_per_sample\": {us:.3}}}");
        }
    }
    Ok(())
}
