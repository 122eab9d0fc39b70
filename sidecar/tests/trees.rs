//! The tree ensemble example models (ONNX-ML TreeEnsembleClassifier /
//! TreeEnsembleRegressor, with and without ZipMap, BRANCH_LEQ in version 1
//! and BRANCH_GTE in version 2) over real HTTP: every reference case
//! (batch 1 and 32, rows with missing values) sent as a binary tensor and
//! as JSON (missing values as Triton's `NaN` literal); labels must equal onnxruntime's, scores be within 1e-5
//! (plus 1e-7 relative, for regressor outputs in the hundreds).

mod common;

use common::*;
use serde_json::{json, Value};

const TREE_MODELS: [&str; 8] = [
    "wine-forest",
    "wine-forest-zipmap",
    "wine-gbt",
    "wine-gbt-zipmap",
    "cancer-gbt",
    "cancer-gbt-zipmap",
    "diabetes-forest",
    "diabetes-gbt",
];

/// reference.json writes missing values as the string "NaN".
fn f32_le(v: &Value) -> (Vec<u8>, bool) {
    let mut nan = false;
    let bytes = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| {
            let f = match x.as_f64() {
                Some(f) => f as f32,
                None => {
                    assert_eq!(x, "NaN");
                    nan = true;
                    f32::NAN
                }
            };
            f.to_le_bytes()
        })
        .collect();
    (bytes, nan)
}

/// Largest |got - want| over FP32 outputs; labels (INT64, BYTES) exact.
fn compare(resp: &Value, case: &Value, what: &str) -> f64 {
    let want = case["outputs"].as_object().unwrap();
    let outs = resp["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), want.len(), "{what}: outputs");
    let mut max = 0f64;
    for o in outs {
        let name = o["name"].as_str().unwrap();
        let w = &want[name];
        assert_eq!(o["datatype"], w["datatype"], "{what}: {name} datatype");
        assert_eq!(o["shape"], w["shape"], "{what}: {name} shape");
        if w["datatype"] == "FP32" {
            for (i, (g, e)) in o["data"]
                .as_array()
                .unwrap()
                .iter()
                .zip(w["data"].as_array().unwrap())
                .enumerate()
            {
                let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
                let d = (g - e).abs();
                // 1e-5 absolute; regressors answer in the hundreds, where
                // one float32 step is 1.5e-5, hence the small relative part.
                assert!(
                    d <= 1e-5 + 1e-7 * e.abs(),
                    "{what}: {name}[{i}] = {g}, onnxruntime {e}"
                );
                max = max.max(d);
            }
        } else {
            assert_eq!(o["data"], w["data"], "{what}: {name} labels");
        }
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_models_match_onnxruntime_with_missing_values() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    let mut max = 0f64;
    let mut nan_cases = 0;
    for model in TREE_MODELS {
        for version in ["1", "2"] {
            let reference = reference(model, version);
            for case in reference["cases"].as_array().unwrap() {
                let what = format!("{model}@{version} {}", case["name"]);
                let input = &case["inputs"]["input"];
                let (bin, nan) = f32_le(&input["data"]);
                nan_cases += usize::from(nan);
                let header = serde_json::to_vec(&json!({
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": input["shape"],
                                "parameters": {"binary_data_size": bin.len()}}]
                }))
                .unwrap();
                let hl = header.len().to_string();
                let mut body = header;
                body.extend_from_slice(&bin);
                let r = request(
                    addr,
                    "POST",
                    &format!("/v2/models/{model}/versions/{version}/infer"),
                    &[("Inference-Header-Content-Length", &hl)],
                    &body,
                )
                .await
                .unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "{what}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                max = max.max(compare(&r.json(), case, &what));

                // The same case as a plain JSON request; missing values as
                // Triton's bare NaN literal, the way Python's json sends them.
                let text = serde_json::to_string(&case_request(case))
                    .unwrap()
                    .replace("\"NaN\"", "NaN");
                assert_eq!(text.contains("NaN"), nan, "{what}");
                let r = request(
                    addr,
                    "POST",
                    &format!("/v2/models/{model}/versions/{version}/infer"),
                    &[("Content-Type", "application/json")],
                    text.as_bytes(),
                )
                .await
                .unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "{what} JSON: {}",
                    String::from_utf8_lossy(&r.body)
                );
                max = max.max(compare(&r.json(), case, &format!("{what} JSON")));
            }
        }
    }
    assert_eq!(
        nan_cases,
        TREE_MODELS.len() * 2,
        "one batch-32 case with NaN per version"
    );
    eprintln!("tree models: max |sidecar - onnxruntime| = {max:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipmap_models_serve_the_probability_tensor() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    let meta = get(addr, "/v2/models/wine-forest-zipmap")
        .await
        .unwrap()
        .json();
    let outputs = meta["outputs"].as_array().unwrap();
    let prob = outputs
        .iter()
        .find(|o| o["name"] == "output_probability")
        .unwrap_or_else(|| panic!("no output_probability in {meta}"));
    assert_eq!(prob["datatype"], "FP32");
    assert_eq!(prob["shape"], json!([-1, 3]));
    let label = outputs
        .iter()
        .find(|o| o["name"] == "output_label")
        .unwrap();
    assert_eq!(label["datatype"], "BYTES");

    // The column order is the class label list: the classification
    // extension names each column's label.
    let case = &reference("wine-forest-zipmap", "1")["cases"][0];
    let mut req = case_request(case);
    req["outputs"] = json!([{"name": "output_probability", "parameters": {"classification": 1}}]);
    let r = post_json(addr, "/v2/models/wine-forest-zipmap/versions/1/infer", &req)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let top = r.json()["outputs"][0]["data"][0]
        .as_str()
        .unwrap()
        .to_string();
    let want_label = case["outputs"]["output_label"]["data"][0].as_str().unwrap();
    assert!(
        top.ends_with(&format!(":{want_label}")),
        "top-1 {top:?}, label {want_label}"
    );
}
