//! In-process tract: the floor for the sidecar's latency. Loads one model
//! version the way the server does (config.json, `Engine::load`) and calls
//! `Engine::run` on batch 1 in a loop on one thread. With `--codec` it
//! also decodes the OIP JSON request and encodes the JSON response around
//! each run (the server's per-request CPU work without HTTP and queueing).
//!
//! ```sh
//! cargo run --release -p sidecar --example engine_bench -- \
//!     examples/models/digits-mlp/1 BODY.json SECONDS [--codec] [--batch N] [--symbolic]
//! ```
//!
//! BODY.json is an OIP v2 infer request with one row (what the load
//! generator sends); `--batch N` repeats its rows to N. The engine runs
//! the plan built for the batch size (what the sidecar runs once a size
//! has been seen), or with `--symbolic` the plan for every size (what
//! serves a size's first requests). Prints one JSON line: calls, req_s,
//! p50_us, p99_us, mean_us.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sidecar::engine::Engine;
use sidecar::model_repo;
use sidecar::protocol;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(version_dir), Some(body_path), Some(seconds)) =
        (args.first(), args.get(1), args.get(2))
    else {
        bail!("usage: engine_bench MODEL_DIR/VERSION BODY.json SECONDS [--codec]");
    };
    let codec = args.iter().any(|a| a == "--codec");
    let symbolic = args.iter().any(|a| a == "--symbolic");
    let batch: usize = match args.iter().position(|a| a == "--batch") {
        Some(i) => args.get(i + 1).context("--batch N")?.parse()?,
        None => 1,
    };
    let seconds: f64 = seconds.parse().context("SECONDS")?;
    let version_dir = Path::new(version_dir);
    let model_dir = version_dir.parent().context("MODEL_DIR/VERSION")?;
    let config = match std::fs::read(model_dir.join("config.json")) {
        Ok(bytes) => model_repo::parse_config(&bytes).map_err(anyhow::Error::msg)?,
        Err(_) => model_repo::ModelConfig::default(),
    };
    let mut engine = Engine::load(&version_dir.join("model.onnx"), &config)?;
    if symbolic {
        engine = engine.without_concrete_plans();
    } else {
        engine.prepare(batch);
    }
    let body = repeat_rows(&std::fs::read(body_path).context("BODY.json")?, batch)?;
    let sig = engine.signature().clone();
    let labels = config.labels.clone();

    // Without --codec the request is decoded once and its tensors copied
    // per run, so a profile of the loop is the engine's.
    let decoded = protocol::decode(&body, None, &sig, 32).map_err(|e| anyhow::anyhow!(e.0))?;
    let one = || -> anyhow::Result<Duration> {
        if !codec {
            let inputs = decoded.inputs.clone();
            let t0 = Instant::now();
            std::hint::black_box(engine.run(inputs)?);
            return Ok(t0.elapsed());
        }
        let t0 = Instant::now();
        let req = protocol::decode(&body, None, &sig, 32).map_err(|e| anyhow::anyhow!(e.0))?;
        let out = engine.run(req.inputs)?;
        let enc = protocol::encode("m", "1", None, &sig, &labels, &req.outputs, &out)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        std::hint::black_box(enc.body.len());
        Ok(t0.elapsed())
    };

    // Warm-up: caches, allocator, tract's scratch space.
    let warm_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < warm_until {
        one()?;
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(1 << 20);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        samples.push(one()?);
    }
    samples.sort_unstable();
    let n = samples.len();
    let pct = |p: f64| -> f64 {
        let i = ((n as f64 - 1.0) * p).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let total: Duration = samples.iter().sum();
    let mean_us = total.as_secs_f64() * 1e6 / n.max(1) as f64;
    println!(
        "{{\"calls\": {n}, \"req_s\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"mean_us\": {:.1}, \"codec\": {codec}}}",
        1e6 / mean_us.max(1e-9),
        pct(0.5),
        pct(0.99),
        mean_us
    );
    Ok(())
}

/// The request with each input's rows repeated until it has `batch` rows.
fn repeat_rows(body: &[u8], batch: usize) -> anyhow::Result<Vec<u8>> {
    if batch == 1 {
        return Ok(body.to_vec());
    }
    let mut req: serde_json::Value = serde_json::from_slice(body)?;
    for input in req["inputs"].as_array_mut().context("inputs")? {
        let rows = input["shape"][0].as_u64().context("shape")? as usize;
        let data = input["data"].as_array().context("data")?.clone();
        let per_row = data.len() / rows.max(1);
        let out: Vec<serde_json::Value> =
            data.iter().cycle().take(per_row * batch).cloned().collect();
        input["shape"][0] = batch.into();
        input["data"] = out.into();
    }
    Ok(serde_json::to_vec(&req)?)
}
