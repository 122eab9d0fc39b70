//! Hostile and broken requests: each gets the right 4xx with a JSON
//! `error`, and the server keeps answering good requests correctly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const INFER: &str = "/v2/models/digits-mlp/versions/2/infer";

fn input(shape: Value, datatype: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}),
    )
    .unwrap()
}

async fn good_request_still_works(addr: std::net::SocketAddr, after: &str) {
    let case = &reference("digits-mlp", "2")["cases"][0];
    let r = post_json(addr, INFER, &case_request(case)).await.unwrap();
    assert_eq!(
        r.status,
        200,
        "after {after}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_matches(
        &r.json(),
        case,
        &json!({}),
        &format!("good request after {after}"),
    );
    assert_eq!(get(addr, "/v2/health/live").await.unwrap().status, 200);
}

fn limited_settings() -> sidecar::config::Settings {
    let mut s = settings(&examples());
    s.max_body_bytes = 512 << 10;
    s.header_read_timeout = Duration::from_millis(500);
    s.body_read_timeout = Duration::from_millis(500);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_json_and_server_survives() {
    let server = start(limited_settings()).await.unwrap();
    let addr = server.addr;
    let zeros = |n: usize| json!(vec![0.0; n]);
    let bin_header = |size: usize| {
        serde_json::to_vec(
            &json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
            "parameters": {"binary_data_size": size}}]}),
        )
        .unwrap()
    };
    let bin_body = |size: usize, bytes: usize| {
        let mut b = bin_header(size);
        b.extend(vec![0u8; bytes]);
        b
    };
    let deep = format!(
        r#"{{"inputs": [{{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": {}0{}}}]}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let h = |n: usize| n.to_string();
    type Case = (
        &'static str,
        &'static str,
        String,
        Vec<(&'static str, String)>,
        Vec<u8>,
        u16,
    );
    let cases: Vec<Case> = vec![
        ("truncated JSON", "POST", INFER.into(), vec![], br#"{"inputs": [{"name": "input""#.to_vec(), 400),
        ("invalid JSON", "POST", INFER.into(), vec![], b"not json at all".to_vec(), 400),
        ("empty body", "POST", INFER.into(), vec![], Vec::new(), 400),
        ("wrong shape", "POST", INFER.into(), vec![], input(json!([1, 783]), "FP32", zeros(783)), 400),
        ("wrong rank", "POST", INFER.into(), vec![], input(json!([784]), "FP32", zeros(784)), 400),
        ("wrong datatype", "POST", INFER.into(), vec![], input(json!([1, 784]), "INT64", json!(vec![0; 784])), 400),
        ("unknown datatype", "POST", INFER.into(), vec![], input(json!([1, 784]), "FP128", zeros(784)), 400),
        ("BYTES for FP32 model", "POST", INFER.into(), vec![], input(json!([1, 784]), "BYTES", json!(vec!["a"; 784])), 400),
        ("strings in FP32 data", "POST", INFER.into(), vec![], input(json!([1, 2]), "FP32", json!(["a", "b"])), 400),
        ("negative dim", "POST", INFER.into(), vec![], input(json!([-1, 784]), "FP32", zeros(784)), 400),
        ("zero batch", "POST", INFER.into(), vec![], input(json!([0, 784]), "FP32", json!([])), 400),
        ("i64::MAX dim", "POST", INFER.into(), vec![], input(json!([9223372036854775807i64, 784]), "FP32", zeros(784)), 400),
        ("u64 overflow dim", "POST", INFER.into(), vec![],
            br#"{"inputs": [{"name": "input", "shape": [18446744073709551616, 784], "datatype": "FP32", "data": [0]}]}"#.to_vec(), 400),
        ("batch above max_batch_size", "POST", INFER.into(), vec![], input(json!([33, 784]), "FP32", zeros(33 * 784)), 400),
        ("too few elements", "POST", INFER.into(), vec![], input(json!([1, 784]), "FP32", zeros(783)), 400),
        ("too many elements", "POST", INFER.into(), vec![], input(json!([1, 784]), "FP32", zeros(785)), 400),
        ("deep nesting", "POST", INFER.into(), vec![], deep.into_bytes(), 400),
        ("unknown input", "POST", INFER.into(), vec![],
            serde_json::to_vec(&json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": zeros(784)}]})).unwrap(), 400),
        ("missing input", "POST", INFER.into(), vec![], br#"{"inputs": []}"#.to_vec(), 400),
        ("unknown output", "POST", INFER.into(), vec![],
            serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": zeros(784)}],
                "outputs": [{"name": "nope"}]})).unwrap(), 400),
        ("binary size too large", "POST", INFER.into(), vec![("Inference-Header-Content-Length", h(bin_header(4000).len()))],
            bin_body(4000, 3136), 400),
        ("binary size too small", "POST", INFER.into(), vec![("Inference-Header-Content-Length", h(bin_header(3000).len()))],
            bin_body(3000, 3136), 400),
        ("binary size not whole elements", "POST", INFER.into(), vec![("Inference-Header-Content-Length", h(bin_header(3135).len()))],
            bin_body(3135, 3135), 400),
        ("binary header length past body", "POST", INFER.into(), vec![("Inference-Header-Content-Length", h(99_999))],
            bin_body(3136, 3136), 400),
        ("binary header length not a number", "POST", INFER.into(), vec![("Inference-Header-Content-Length", "abc".into())],
            bin_body(3136, 3136), 400),
        ("binary_data_size without header", "POST", INFER.into(), vec![], bin_header(3136), 400),
        ("unknown model", "POST", "/v2/models/nope/infer".into(), vec![], input(json!([1, 784]), "FP32", zeros(784)), 404),
        ("unknown version", "POST", "/v2/models/digits-mlp/versions/9/infer".into(), vec![], input(json!([1, 784]), "FP32", zeros(784)), 404),
        ("non-numeric version", "POST", "/v2/models/digits-mlp/versions/x/infer".into(), vec![], Vec::new(), 400),
        ("traversal in model name", "POST", "/v2/models/../infer".into(), vec![], Vec::new(), 400),
        ("encoded traversal", "GET", "/v2/models/..%2F..%2Fetc/ready".into(), vec![], Vec::new(), 400),
        ("traversal in load", "POST", "/v2/repository/models/../load".into(), vec![], Vec::new(), 400),
        ("encoded traversal in load", "POST", "/v2/repository/models/%2e%2e/load".into(), vec![], Vec::new(), 400),
        ("load of unknown model", "POST", "/v2/repository/models/nope/load".into(), vec![], Vec::new(), 404),
        ("unknown route", "GET", "/v3/whatever".into(), vec![], Vec::new(), 404),
        ("wrong method", "DELETE", "/v2/health/live".into(), vec![], Vec::new(), 405),
        ("oversize with Content-Length", "POST", INFER.into(), vec![], vec![b' '; 600 << 10], 413),
    ];
    for (name, method, path, headers, body, want) in cases {
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = request(addr, method, &path, &hdrs, &body).await.unwrap();
        assert_eq!(
            r.status,
            want,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let err = r.error();
        assert!(!err.is_empty(), "{name}");
        assert!(
            !err.contains("/work") && !err.contains(".onnx"),
            "{name} leaks: {err}"
        );
        good_request_still_works(addr, name).await;
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_is_refused_before_the_body_is_read() {
    let server = start(limited_settings()).await.unwrap();
    let addr = server.addr;

    // Content-Length above the limit and no body at all: the answer must
    // not wait for the (never sent) body.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = parse_response(&buf[..n]).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.error().contains("exceeds"));
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "413 waited for the body"
    );

    // Chunked, no length: cut off once the streamed size passes the limit.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 << 10];
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..32 {
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut buf)).await;
    let r = parse_response(&buf).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.error().contains("exceeds"));
    writer.abort();
    good_request_still_works(addr, "oversize").await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let server = start(limited_settings()).await.unwrap();
    let addr = server.addr;

    // Headers trickled one byte per 100 ms: the connection is closed after
    // the 500 ms header timeout, long before the headers would finish.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let head = format!(
        "POST {INFER} HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(100)
    );
    let mut closed = false;
    for b in head.bytes() {
        if s.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing.
                let text = String::from_utf8_lossy(&probe[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "trickled headers were never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Body trickled: 408 with a JSON error after the body timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"inputs\"");
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = parse_response(&buf).unwrap();
    assert_eq!(r.status, 408);
    assert!(r.error().contains("timed out"));
    assert!(started.elapsed() >= Duration::from_millis(400));
    good_request_still_works(addr, "slow clients").await;
    server.shutdown(Duration::from_secs(5)).await;
}

/// A digits-mlp request whose 784 elements are zeros and then `last`.
fn with_last_element(last: &str) -> Vec<u8> {
    let mut data = "0,".repeat(783);
    data.push_str(last);
    format!(r#"{{"inputs": [{{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [{data}]}}]}}"#)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_numbers_are_refused_naming_the_element() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    let million = "1".repeat(1_000_000);
    let cases: Vec<(&str, String, &str)> = vec![
        ("overflow", "1e999".into(), "element 783: 1e999 is out of range for FP32"),
        ("lone minus", "-".into(), "element 783: -: invalid number"),
        ("no leading digit", ".5".into(), "element 783: .5 is not a valid FP32"),
        ("leading zero", "01".into(), "element 783: 01: invalid number: leading zero"),
        ("lowercase nan", "nan".into(), "element 783: nan is not a valid FP32"),
        ("a million digits", million, "element 783: 11111111111111111111111111111111... (1000000 bytes) is out of range for FP32"),
        ("string among numbers", "\"0\"".into(), "element 783: a string is not a valid FP32"),
        ("bool among numbers", "true".into(), "element 783: true is not a valid FP32"),
        ("null among numbers", "null".into(), "element 783: null is not a valid FP32"),
        ("array among numbers", "[0, [1]]".into(), "more data elements than the shape holds (784)"),
    ];
    for (name, last, want) in cases {
        let r = request(addr, "POST", INFER, &[], &with_last_element(&last))
            .await
            .unwrap();
        assert_eq!(
            r.status,
            400,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.error(), format!("input \"input\": {want}"), "{name}");
    }
    // NaN is a float, not a dimension, an id or a name.
    for (name, body) in [
        (
            "NaN in shape",
            r#"{"inputs": [{"name": "input", "shape": [1, NaN], "datatype": "FP32", "data": [0]}]}"#,
        ),
        ("NaN as id", r#"{"id": NaN, "inputs": []}"#),
        (
            "NaN as name",
            r#"{"inputs": [{"name": NaN, "shape": [1], "datatype": "FP32", "data": [0]}]}"#,
        ),
    ] {
        let r = request(addr, "POST", INFER, &[], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            r.status,
            400,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.error().contains("invalid inference request JSON"),
            "{name}: {}",
            r.error()
        );
    }
    good_request_still_works(addr, "malformed numbers").await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_floats_travel_as_triton_literals() {
    let server = start(settings(&examples())).await.unwrap();
    let addr = server.addr;
    // NaN in: the MLP's probabilities come out NaN, written as NaN.
    let r = request(addr, "POST", INFER, &[], &with_last_element("NaN"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8(r.body.clone()).unwrap();
    assert!(!text.contains("null"), "{text}");
    // serde_json has no NaN: read the literals as null to check the rest.
    let v: Value = serde_json::from_str(&text.replace("NaN", "null")).unwrap();
    let probs = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap();
    assert_eq!(probs["data"], json!(vec![Value::Null; 10]), "{text}");
    // Infinities in: accepted as floats.
    for lit in ["Infinity", "-Infinity"] {
        let r = request(addr, "POST", INFER, &[], &with_last_element(lit))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{lit}: {}", String::from_utf8_lossy(&r.body));
    }
    server.shutdown(Duration::from_secs(5)).await;
}
