//! Dynamic batching, the bounded queue, timeouts, and load/unload while
//! requests are in flight.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn mlp_config(delay_us: u64, preferred: u64) -> String {
    json!({
        "platform": "onnx", "max_batch_size": 32,
        "dynamic_batching": {"max_delay_us": delay_us, "preferred_batch_size": preferred},
        "version_policy": {"latest": 2},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    })
    .to_string()
}

/// Single-row cases cut out of the reference's batch-4 case (plus batch-1).
fn row_cases(version: &str) -> Vec<Value> {
    let r = reference("digits-mlp", version);
    let mut out = Vec::new();
    for case in r["cases"].as_array().unwrap() {
        let rows = case["inputs"]["input"]["shape"][0].as_u64().unwrap() as usize;
        let x = case["inputs"]["input"]["data"].as_array().unwrap();
        let p = case["outputs"]["probabilities"]["data"].as_array().unwrap();
        let l = case["outputs"]["label"]["data"].as_array().unwrap();
        for i in 0..rows {
            out.push(json!({
                "inputs": {"input": {"datatype": "FP32", "shape": [1, 784], "data": x[i * 784..(i + 1) * 784]}},
                "outputs": {
                    "label": {"datatype": "INT64", "shape": [1], "data": [l[i]]},
                    "probabilities": {"datatype": "FP32", "shape": [1, 10], "data": p[i * 10..(i + 1) * 10]}
                }
            }));
        }
    }
    out
}

async fn infer_case(addr: SocketAddr, version: &str, case: &Value) -> anyhow::Result<Resp> {
    post_json(
        addr,
        &format!("/v2/models/digits-mlp/versions/{version}/infer"),
        &case_request(case),
    )
    .await
}

async fn wait_pending(addr: SocketAddr, version: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(addr).await;
        let p = metric(
            &text,
            "infermesh_sidecar_pending_requests",
            &[("model", "digits-mlp"), ("version", version)],
        );
        if p >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pending never reached {n} (at {p})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_coalesced_and_each_gets_its_answer() {
    let repo = temp_dir("batch");
    copy_model(&repo, "digits-mlp", Some(&mlp_config(300_000, 8)));
    let server = start(settings(&repo)).await.unwrap();
    let addr = server.addr;
    let cases = row_cases("2");
    assert!(cases.len() >= 5);
    let labels = [("model", "digits-mlp"), ("version", "2")];
    let before = metrics(addr).await;
    let count0 = metric(&before, "infermesh_sidecar_batch_size_count", &labels);
    let sum0 = metric(&before, "infermesh_sidecar_batch_size_sum", &labels);

    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let case = cases[i % cases.len()].clone();
            tokio::spawn(async move { (infer_case(addr, "2", &case).await.unwrap(), case) })
        })
        .collect();
    for t in tasks {
        let (r, case) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_matches(&r.json(), &case, &json!({}), "coalesced request");
    }
    let after = metrics(addr).await;
    let runs = metric(&after, "infermesh_sidecar_batch_size_count", &labels) - count0;
    let rows = metric(&after, "infermesh_sidecar_batch_size_sum", &labels) - sum0;
    assert_eq!(rows, 8.0, "every row ran once");
    assert!(
        runs < 8.0,
        "8 concurrent requests ran in {runs} engine runs: no batching"
    );
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_and_slow_requests_504() {
    let repo = temp_dir("queue");
    copy_model(&repo, "digits-mlp", Some(&mlp_config(1_000_000, 8)));
    let mut s = settings(&repo);
    s.queue_capacity = 2;
    let server = start(s).await.unwrap();
    let addr = server.addr;
    let cases = row_cases("2");
    let held: Vec<_> = (0..2)
        .map(|i| {
            let case = cases[i].clone();
            tokio::spawn(async move { (infer_case(addr, "2", &case).await.unwrap(), case) })
        })
        .collect();
    wait_pending(addr, "2", 2.0).await;
    let r = infer_case(addr, "2", &cases[2]).await.unwrap();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.error().contains("full"));
    // Another version has its own queue.
    let v1 = row_cases("1");
    let r = infer_case(addr, "1", &v1[0]).await.unwrap();
    assert_eq!(r.status, 200);
    for t in held {
        let (r, case) = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_matches(&r.json(), &case, &json!({}), "held request");
    }
    let text = metrics(addr).await;
    assert_eq!(
        metric(
            &text,
            "infermesh_sidecar_requests_total",
            &[
                ("model", "digits-mlp"),
                ("version", "2"),
                ("outcome", "queue_full")
            ]
        ),
        1.0
    );
    server.shutdown(Duration::from_secs(5)).await;

    // A deadline shorter than the batching delay: 504 at the deadline.
    let mut s = settings(&repo);
    s.request_timeout = Duration::from_millis(150);
    let server = start(s).await.unwrap();
    let started = Instant::now();
    let r = infer_case(server.addr, "2", &cases[0]).await.unwrap();
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.error().contains("timed out"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let text = metrics(server.addr).await;
    assert_eq!(
        metric(
            &text,
            "infermesh_sidecar_requests_total",
            &[("model", "digits-mlp"), ("outcome", "timeout")]
        ),
        1.0
    );
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_never_fail_in_flight_requests() {
    let repo = temp_dir("reload");
    copy_model(&repo, "digits-mlp", Some(&mlp_config(50_000, 8)));
    let server = start(settings(&repo)).await.unwrap();
    let addr = server.addr;
    let cases = row_cases("2");

    // Continuous traffic while the model is reloaded twice.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let cases = cases.clone();
            tokio::spawn(async move {
                let mut done = 0;
                for i in 0..8 {
                    let case = &cases[(c + i) % cases.len()];
                    let r = infer_case(addr, "2", case).await.unwrap();
                    assert_eq!(
                        r.status,
                        200,
                        "during reload: {}",
                        String::from_utf8_lossy(&r.body)
                    );
                    assert_matches(&r.json(), case, &json!({}), "during reload");
                    done += 1;
                }
                done
            })
        })
        .collect();
    for _ in 0..2 {
        let r = request(
            addr,
            "POST",
            "/v2/repository/models/digits-mlp/load",
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), 8);
    }

    // Requests held in the batcher when the model is unloaded still finish.
    copy_model(&repo, "digits-mlp", Some(&mlp_config(800_000, 8)));
    let r = request(
        addr,
        "POST",
        "/v2/repository/models/digits-mlp/load",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let held: Vec<_> = (0..3)
        .map(|i| {
            let case = cases[i].clone();
            tokio::spawn(async move { (infer_case(addr, "2", &case).await.unwrap(), case) })
        })
        .collect();
    wait_pending(addr, "2", 3.0).await;
    let r = request(
        addr,
        "POST",
        "/v2/repository/models/digits-mlp/unload",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // New requests see the model gone at once.
    let r = infer_case(addr, "2", &cases[0]).await.unwrap();
    assert_eq!(r.status, 404);
    let r = get(addr, "/v2/models/digits-mlp/ready").await.unwrap();
    assert_eq!(r.status, 503);
    for t in held {
        let (r, case) = t.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "in-flight request failed on unload: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_matches(&r.json(), &case, &json!({}), "in flight across unload");
    }
    let idx = request(addr, "POST", "/v2/repository/index", &[], b"")
        .await
        .unwrap()
        .json();
    assert!(
        idx.as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "UNAVAILABLE"),
        "{idx}"
    );
    let text = metrics(addr).await;
    assert_eq!(metric(&text, "infermesh_sidecar_models_loaded", &[]), 0.0);

    // And back.
    let r = request(
        addr,
        "POST",
        "/v2/repository/models/digits-mlp/load",
        &[],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let r = infer_case(addr, "2", &cases[1]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_matches(&r.json(), &cases[1], &json!({}), "after reload");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_caught_nothing_stops_delaying_lone_requests() {
    let repo = temp_dir("sparse");
    copy_model(&repo, "digits-mlp", Some(&mlp_config(400_000, 8)));
    let server = start(settings(&repo)).await.unwrap();
    let addr = server.addr;
    let cases = row_cases("2");

    // The first request waits out the 400 ms window alone.
    let started = Instant::now();
    let r = infer_case(addr, "2", &cases[0]).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(started.elapsed() >= Duration::from_millis(400));

    // Traffic is sparse now: the next lone requests run at once, right.
    for case in &cases[1..3] {
        let started = Instant::now();
        let r = infer_case(addr, "2", case).await.unwrap();
        assert_eq!(r.status, 200);
        assert_matches(&r.json(), case, &json!({}), "lone request");
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "a lone request after an empty window waited {:?}",
            started.elapsed()
        );
    }

    // Concurrent requests are still coalesced: they queue together while
    // a run is under way, which marks the traffic dense again.
    let labels = [("model", "digits-mlp"), ("version", "2")];
    let before = metrics(addr).await;
    let count0 = metric(&before, "infermesh_sidecar_batch_size_count", &labels);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let case = cases[i % cases.len()].clone();
            tokio::spawn(async move { (infer_case(addr, "2", &case).await.unwrap(), case) })
        })
        .collect();
    for t in tasks {
        let (r, case) = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_matches(&r.json(), &case, &json!({}), "concurrent request");
    }
    let after = metrics(addr).await;
    let runs = metric(&after, "infermesh_sidecar_batch_size_count", &labels) - count0;
    assert!(runs < 16.0, "16 concurrent requests ran in {runs} runs");
    server.shutdown(Duration::from_secs(5)).await;
}
