//! OIP v2 over real HTTP against the example models: numbers match the
//! onnxruntime references (JSON and binary tensors), metadata, health,
//! repository index, output selection, ids.

mod common;

use common::*;
use serde_json::{json, Value};

const MODELS: [&str; 3] = ["digits-mlp", "tiny-cnn", "digits-forest"];

/// Model versions in the example repository (each serves two).
fn example_versions() -> usize {
    std::fs::read_dir(examples())
        .unwrap()
        .filter_map(|m| m.ok())
        .filter(|m| m.path().join("config.json").is_file())
        .map(|m| {
            2.min(
                std::fs::read_dir(m.path())
                    .unwrap()
                    .filter(|v| {
                        v.as_ref()
                            .is_ok_and(|v| v.path().join("model.onnx").is_file())
                    })
                    .count(),
            )
        })
        .sum()
}

fn f32_le(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| (x.as_f64().unwrap() as f32).to_le_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_and_version_matches_reference_json_and_binary() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    for model in MODELS {
        let mut per_version = Vec::new();
        for version in ["1", "2"] {
            let reference = reference(model, version);
            let tol = &reference["tolerance"];
            let cases = reference["cases"].as_array().unwrap();
            let batches: Vec<u64> = cases
                .iter()
                .map(|c| c["inputs"]["input"]["shape"][0].as_u64().unwrap())
                .collect();
            assert!(
                batches.contains(&1) && batches.contains(&4),
                "{model}: cases {batches:?}"
            );
            for case in cases {
                let what = format!("{model}@{version} {} (JSON)", case["name"]);
                let path = format!("/v2/models/{model}/versions/{version}/infer");
                let r = post_json(addr, &path, &case_request(case)).await.unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "{what}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let body = r.json();
                assert_eq!(body["model_name"], model);
                assert_eq!(body["model_version"], version);
                assert_matches(&body, case, tol, &what);
                if case["inputs"]["input"]["shape"][0] == 4 {
                    per_version.push(body["outputs"].clone());
                }

                // Binary tensors both ways.
                let input = &case["inputs"]["input"];
                let bin = f32_le(&input["data"]);
                let header = serde_json::to_vec(&json!({
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": input["shape"],
                                "parameters": {"binary_data_size": bin.len()}}],
                    "parameters": {"binary_data_output": true},
                }))
                .unwrap();
                let mut payload = header.clone();
                payload.extend_from_slice(&bin);
                let hl = header.len().to_string();
                let r = request(
                    addr,
                    "POST",
                    &path,
                    &[("Inference-Header-Content-Length", &hl)],
                    &payload,
                )
                .await
                .unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "{what} binary: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let n: usize = r
                    .header("inference-header-content-length")
                    .unwrap()
                    .parse()
                    .unwrap();
                let mut head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
                let mut rest = &r.body[n..];
                for o in head["outputs"].as_array_mut().unwrap() {
                    let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
                    let (chunk, tail) = rest.split_at(size);
                    rest = tail;
                    o["data"] = match o["datatype"].as_str().unwrap() {
                        "FP32" => json!(chunk
                            .chunks(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect::<Vec<_>>()),
                        "INT64" => json!(chunk
                            .chunks(8)
                            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                            .collect::<Vec<_>>()),
                        other => panic!("unexpected datatype {other}"),
                    };
                }
                assert!(rest.is_empty(), "{what}: trailing binary bytes");
                assert_matches(&head, case, tol, &format!("{what} binary"));
            }
        }
        assert_ne!(
            per_version[0], per_version[1],
            "{model}: versions 1 and 2 answer the same"
        );
    }
    server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_health_index_and_routing() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    assert_eq!(
        get(addr, "/v2/health/live").await.unwrap().json(),
        json!({"live": true})
    );
    assert_eq!(
        get(addr, "/v2/health/ready").await.unwrap().json(),
        json!({"ready": true})
    );

    let meta = get(addr, "/v2").await.unwrap().json();
    assert_eq!(meta["name"], "infermesh-sidecar");
    assert!(meta["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));

    let m = get(addr, "/v2/models/digits-mlp").await.unwrap().json();
    assert_eq!(m["versions"], json!(["1", "2"]));
    assert_eq!(m["platform"], "onnx");
    assert_eq!(
        m["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 784]}])
    );
    assert_eq!(
        m["outputs"][0],
        json!({"name": "label", "datatype": "INT64", "shape": [-1]})
    );
    let m1 = get(addr, "/v2/models/tiny-cnn/versions/1")
        .await
        .unwrap()
        .json();
    assert_eq!(m1["versions"], json!(["1"]));
    assert_eq!(m1["inputs"][0]["shape"], json!([-1, 3, 32, 32]));

    // Triton's model configuration, as perf_analyzer reads it: dims
    // without the batch dimension when the model batches.
    let c = get(addr, "/v2/models/digits-mlp/config").await.unwrap();
    assert_eq!(c.status, 200);
    let c = c.json();
    assert_eq!(c["max_batch_size"], 32);
    assert_eq!(
        c["input"],
        json!([{"name": "input", "data_type": "TYPE_FP32", "dims": [784]}])
    );
    assert_eq!(
        c["output"][0],
        json!({"name": "label", "data_type": "TYPE_INT64", "dims": []})
    );
    let c1 = get(addr, "/v2/models/tiny-cnn/versions/1/config")
        .await
        .unwrap()
        .json();
    assert_eq!(c1["input"][0]["dims"], json!([3, 32, 32]));
    assert_eq!(
        get(addr, "/v2/models/nope/config").await.unwrap().status,
        404
    );

    let r = get(addr, "/v2/models/digits-forest/versions/2/ready")
        .await
        .unwrap();
    assert_eq!((r.status, r.json()["ready"].clone()), (200, json!(true)));
    assert_eq!(
        get(addr, "/v2/models/digits-forest/versions/3/ready")
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        get(addr, "/v2/models/nope/ready").await.unwrap().status,
        404
    );

    let idx = request(addr, "POST", "/v2/repository/index", &[], b"")
        .await
        .unwrap()
        .json();
    let ready: Vec<(String, String)> = idx
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == "READY")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(ready.len(), example_versions(), "{idx}");

    // Unversioned infer goes to the highest version; id echoed; outputs
    // selected; request id propagated; classification extension.
    let case = &reference("digits-mlp", "2")["cases"][0];
    let mut req = case_request(case);
    req["id"] = json!("req-42");
    req["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 2}}]);
    let body = serde_json::to_vec(&req).unwrap();
    let r = request(
        addr,
        "POST",
        "/v2/models/digits-mlp/infer",
        &[("x-request-id", "trace-abc")],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("trace-abc"));
    let v = r.json();
    assert_eq!(v["model_version"], "2");
    assert_eq!(v["id"], "req-42");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"][0]["datatype"], "BYTES");
    let top: &str = v["outputs"][0]["data"][0].as_str().unwrap();
    let want_label = case["outputs"]["label"]["data"][0].as_i64().unwrap();
    assert!(
        top.ends_with(&format!(":{want_label}:{want_label}")),
        "{top}"
    );

    // A generated request id when none is sent.
    let r = get(addr, "/v2/health/live").await.unwrap();
    assert!(r.header("x-request-id").is_some_and(|v| v.len() >= 16));

    // Wrong method: 405 with Allow.
    let r = request(addr, "GET", "/v2/models/digits-mlp/infer", &[], b"")
        .await
        .unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    assert!(!r.error().is_empty());

    // Metrics: bounded names present and counting.
    let text = metrics(addr).await;
    for name in [
        "infermesh_sidecar_requests_total",
        "infermesh_sidecar_request_duration_seconds_bucket",
        "infermesh_sidecar_queue_duration_seconds_bucket",
        "infermesh_sidecar_compute_duration_seconds_bucket",
        "infermesh_sidecar_batch_size_bucket",
        "infermesh_sidecar_pending_requests",
        "infermesh_sidecar_models_loaded",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert_eq!(
        metric(&text, "infermesh_sidecar_models_loaded", &[]),
        example_versions() as f64
    );
    let ok = metric(
        &text,
        "infermesh_sidecar_requests_total",
        &[
            ("model", "digits-mlp"),
            ("version", "2"),
            ("outcome", "success"),
        ],
    );
    assert!(ok >= 1.0, "{ok}");
    server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_model_is_skipped_and_reported_while_others_serve() {
    let repo = temp_dir("badmodel");
    copy_model(&repo, "digits-mlp", None);
    // Garbage ONNX, a config with an unknown field, a traversal-ish name.
    std::fs::create_dir_all(repo.join("garbage/1")).unwrap();
    std::fs::write(repo.join("garbage/1/model.onnx"), b"not an onnx file").unwrap();
    copy_model(
        &repo,
        "tiny-cnn",
        Some(r#"{"max_batch_size": 8, "bogus": 1}"#),
    );
    std::fs::create_dir_all(repo.join("bad name/1")).unwrap();
    // Config that disagrees with the model's datatype.
    copy_model(
        &repo,
        "digits-forest",
        Some(
            r#"{"max_batch_size": 4, "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1, 64]}]}"#,
        ),
    );

    let server = start(settings(&repo)).await.unwrap();
    let addr = server.addr;
    let idx = request(addr, "POST", "/v2/repository/index", &[], b"")
        .await
        .unwrap()
        .json();
    let find = |name: &str| -> Vec<Value> {
        idx.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .cloned()
            .collect()
    };
    assert!(find("digits-mlp").iter().all(|e| e["state"] == "READY"));
    let g = &find("garbage")[0];
    assert_eq!(g["state"], "UNAVAILABLE");
    assert!(
        g["reason"].as_str().unwrap().contains("cannot be loaded"),
        "{g}"
    );
    let t = &find("tiny-cnn")[0];
    assert!(t["reason"].as_str().unwrap().contains("bogus"), "{t}");
    assert!(find("bad name")[0]["reason"]
        .as_str()
        .unwrap()
        .contains("invalid model name"));
    let f = &find("digits-forest")[0];
    assert!(f["reason"].as_str().unwrap().contains("INT64"), "{f}");
    let all = idx.to_string();
    assert!(
        !all.contains(repo.to_str().unwrap()),
        "index leaks paths: {all}"
    );

    // The good model still answers correctly.
    let case = &reference("digits-mlp", "2")["cases"][0];
    let r = post_json(addr, "/v2/models/digits-mlp/infer", &case_request(case))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_matches(
        &r.json(),
        case,
        &json!({}),
        "digits-mlp after bad neighbours",
    );
    let r = post_json(addr, "/v2/models/garbage/infer", &case_request(case))
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    server.shutdown(std::time::Duration::from_secs(5)).await;
}
