//! Concrete-shape plans: for every example model and version, a run on
//! the symbolic plan (the first run of a batch size) and a run on the plan
//! built for that batch size both match the reference outputs
//! (onnxruntime's) within the reference tolerance, at batch 1 and 4;
//! batch 32 (symbolic only) too. A model with a convolution runs its
//! batches row by row on the batch-1 plan; its runs are checked the same
//! way.

mod common;

use common::{assert_matches, case_request, examples, reference};
use serde_json::{json, Value};
use sidecar::engine::{Engine, CONCRETE_MAX_BATCH};
use sidecar::model_repo;
use sidecar::protocol;

fn load(model: &str, version: &str) -> (Engine, model_repo::ModelConfig) {
    let dir = examples().join(model);
    let config = model_repo::parse_config(&std::fs::read(dir.join("config.json")).unwrap())
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let engine = Engine::load(&dir.join(version).join("model.onnx"), &config)
        .unwrap_or_else(|e| panic!("{model}@{version}: {e}"));
    (engine, config)
}

/// Runs a JSON request through decode, the engine and encode; the JSON
/// response.
fn infer(engine: &Engine, config: &model_repo::ModelConfig, request: &Value) -> Value {
    // reference.json spells missing values as strings; the wire form is
    // the bare literal.
    let body = serde_json::to_string(request)
        .unwrap()
        .replace("\"NaN\"", "NaN")
        .into_bytes();
    let sig = engine.signature();
    let req = protocol::decode(&body, None, sig, 32)
        .map_err(|e| e.0)
        .unwrap();
    let out = engine.run(req.inputs).unwrap();
    let enc = protocol::encode("m", "1", None, sig, &config.labels, &req.outputs, &out)
        .map_err(|e| e.0)
        .unwrap();
    serde_json::from_slice(&enc.body).unwrap()
}

/// The case with its rows cycled (or cut) to `rows` rows.
fn resized(case: &Value, rows: usize) -> Value {
    let grow = |tensors: &Value| -> Value {
        let mut out = serde_json::Map::new();
        for (name, t) in tensors.as_object().unwrap() {
            let mut shape = t["shape"].as_array().unwrap().clone();
            let have = shape[0].as_u64().unwrap() as usize;
            let data = t["data"].as_array().unwrap();
            let per_row = data.len() / have;
            shape[0] = json!(rows);
            let data: Vec<Value> = data.iter().cycle().take(per_row * rows).cloned().collect();
            out.insert(
                name.clone(),
                json!({"datatype": t["datatype"], "shape": shape, "data": data}),
            );
        }
        Value::Object(out)
    };
    json!({
        "name": format!("{} as batch {rows}", case["name"]),
        "inputs": grow(&case["inputs"]),
        "outputs": grow(&case["outputs"]),
    })
}

fn model_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn concrete_plans_match_the_reference_at_batch_1_4_and_32() {
    let names = model_names();
    assert!(names.len() >= 10, "{names:?}");
    for model in &names {
        for version in ["1", "2"] {
            let reference = reference(model, version);
            let tol = &reference["tolerance"];
            let given = reference["cases"].as_array().unwrap();
            let rows = |c: &Value| c["inputs"]["input"]["shape"][0].as_u64().unwrap();
            let one = given.iter().find(|c| rows(c) == 1).expect("a batch-1 case");
            let most = given.iter().max_by_key(|c| rows(c)).unwrap();
            let cases = [one.clone(), resized(most, 4), resized(most, 32)];
            let (engine, config) = load(model, version);
            // A model with a convolution runs every batch row by row on
            // its batch-1 plan: that is the one plan it builds.
            let rows_model = engine.runs_row_by_row();
            let mut sizes = Vec::new();
            for case in &cases {
                let batch = case["inputs"]["input"]["shape"][0].as_u64().unwrap() as usize;
                let request = case_request(case);
                let what = format!("{model}@{version} {}", case["name"]);
                // The first run of a size is on the symbolic plan (row by
                // row once the batch-1 plan is there).
                assert!(!engine.concrete_batch_sizes().contains(&batch), "{what}");
                let first = infer(&engine, &config, &request);
                assert_matches(&first, case, tol, &format!("{what} (first run)"));
                if batch > CONCRETE_MAX_BATCH && !rows_model {
                    assert!(!engine.prepare(batch), "{what}: a plan past the bound");
                    continue;
                }
                assert!(engine.prepare(batch), "{what}: no concrete plan");
                if rows_model {
                    sizes = vec![1];
                } else {
                    sizes.push(batch);
                    sizes.sort_unstable();
                }
                assert_eq!(engine.concrete_batch_sizes(), sizes, "{what}");
                let concrete = infer(&engine, &config, &request);
                let how = if rows_model { "row by row" } else { "concrete" };
                assert_matches(&concrete, case, tol, &format!("{what} ({how})"));
            }
        }
    }
}

/// Which example models run row by row: those with a convolution (the
/// CNNs), not the MLP, the linear models or the tree ensembles.
#[test]
fn models_with_a_convolution_run_row_by_row() {
    let rows: Vec<String> = model_names()
        .into_iter()
        .filter(|m| load(m, "1").0.runs_row_by_row())
        .collect();
    assert_eq!(rows, ["tiny-cnn"], "models that run row by row");
    // Without concrete plans there is no batch-1 plan to run rows on.
    let (engine, _) = load("tiny-cnn", "2");
    assert!(!engine.without_concrete_plans().runs_row_by_row());
}

#[test]
fn concrete_plans_are_bounded_and_other_sizes_still_run() {
    let (engine, config) = load("digits-mlp", "1");
    let case = reference("digits-mlp", "1")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["inputs"]["input"]["shape"][0] == 1)
        .unwrap()
        .clone();
    let tol = reference("digits-mlp", "1")["tolerance"].clone();
    for batch in 1..=CONCRETE_MAX_BATCH {
        assert!(engine.prepare(batch), "batch {batch}");
    }
    let full: Vec<usize> = (1..=CONCRETE_MAX_BATCH).collect();
    assert_eq!(engine.concrete_batch_sizes(), full);
    let beyond = CONCRETE_MAX_BATCH + 1;
    assert!(!engine.prepare(beyond));
    // A size past the bound runs on the symbolic plan, correctly, and
    // starts no build.
    let big = resized(&case, beyond);
    let out = infer(&engine, &config, &case_request(&big));
    assert_matches(&out, &big, &tol, "batch past the bound");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(engine.concrete_batch_sizes(), full);
}

#[test]
fn a_new_batch_size_gets_its_plan_in_the_background() {
    let (engine, config) = load("digits-mlp", "1");
    let case = reference("digits-mlp", "1")["cases"][0].clone();
    let batch = case["inputs"]["input"]["shape"][0].as_u64().unwrap() as usize;
    let request = case_request(&case);
    infer(&engine, &config, &request);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !engine.concrete_batch_sizes().contains(&batch) {
        assert!(
            std::time::Instant::now() < deadline,
            "no plan for batch {batch} after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tol = reference("digits-mlp", "1")["tolerance"].clone();
    assert_matches(
        &infer(&engine, &config, &request),
        &case,
        &tol,
        "after the build",
    );
}
