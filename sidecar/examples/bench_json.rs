//! Tensor codec micro-benchmark: nanoseconds per FP32 element to decode a
//! whole inference request (JSON `data`, or a binary tensor) into the
//! typed buffer, and to encode a response (JSON or binary). Bodies look
//! like what Python clients send: floats as Python's `repr` of float32
//! values (17 significant digits, e.g. `0.30000001192092896`).
//!
//!   cargo run --release -p sidecar --example bench_json [ITERS_SCALE]
//!   bench_json --count json|binary mlp|cnn BATCH CALLS
//!
//! `--count` only decodes one body CALLS times, untimed: run it under
//! `valgrind --tool=callgrind` with two CALLS values, and the difference
//! in instructions over the difference in elements is the instructions
//! per element, a figure other load on the machine does not change
//! (`bench/json.sh --count`).
//!
//! Prints one JSON line per case. Uses only the public `protocol` API.
//! Times are on-CPU time of the benchmark thread (`/proc/thread-self/
//! schedstat`), so a busy machine inflates them less than wall time.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use sidecar::engine::{Signature, Tensor};
use sidecar::model_repo::TensorSpec;
use sidecar::protocol::{self, OutputRequest};
use sidecar::tensor::{Data, DataType};

/// Deterministic float32 values in [0, 1).
fn values(n: usize) -> Vec<f32> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32) / (1u64 << 24) as f32
        })
        .collect()
}

fn sig(features: &[i64]) -> Signature {
    let mut shape = vec![-1];
    shape.extend_from_slice(features);
    Signature {
        inputs: vec![TensorSpec {
            name: "input".into(),
            datatype: DataType::F32,
            shape: shape.clone(),
        }],
        outputs: vec![TensorSpec {
            name: "output".into(),
            datatype: DataType::F32,
            shape,
        }],
        max_batch_size: 32,
    }
}

fn json_body(shape: &[usize], v: &[f32]) -> Vec<u8> {
    // f64's Display is the shortest round-trip text, as Python's repr.
    let data: Vec<String> = v.iter().map(|x| format!("{}", f64::from(*x))).collect();
    format!(
        r#"{{"id":"bench","inputs":[{{"name":"input","shape":{shape:?},"datatype":"FP32","data":[{}]}}]}}"#,
        data.join(", ")
    )
    .into_bytes()
}

fn binary_body(shape: &[usize], v: &[f32]) -> (Vec<u8>, usize) {
    let header = format!(
        r#"{{"inputs":[{{"name":"input","shape":{shape:?},"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}]}}"#,
        v.len() * 4
    );
    let mut body = header.clone().into_bytes();
    for x in v {
        body.extend_from_slice(&x.to_le_bytes());
    }
    (body, header.len())
}

/// Nanoseconds this thread has spent on a CPU (Linux schedstat), so that
/// time other processes take on a shared machine is not counted; wall
/// time where that is unavailable.
fn cpu_ns(start: Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| start.elapsed().as_nanos() as f64)
}

/// Median over `reps` timed runs of `iters` calls, in on-CPU ns per call.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    let reps = 7;
    let origin = Instant::now();
    let mut runs: Vec<f64> = (0..reps)
        .map(|_| {
            let t = cpu_ns(origin);
            for _ in 0..iters {
                f();
            }
            (cpu_ns(origin) - t) / iters as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[reps / 2]
}

/// Decodes one body `calls` times (for instruction counts).
fn count(args: &[String]) {
    let usage = "bench_json --count json|binary mlp|cnn BATCH CALLS";
    let [kind, model, batch, calls] = args else {
        panic!("{usage}");
    };
    let features: &[i64] = match model.as_str() {
        "mlp" => &[784],
        "cnn" => &[3, 32, 32],
        _ => panic!("{usage}"),
    };
    let batch: usize = batch.parse().expect("BATCH");
    let calls: usize = calls.parse().expect("CALLS");
    let sig = sig(features);
    let mut shape = vec![batch];
    shape.extend(features.iter().map(|d| *d as usize));
    let v = values(shape.iter().product());
    let (body, header_len) = match kind.as_str() {
        "json" => (json_body(&shape, &v), None),
        "binary" => {
            let (b, h) = binary_body(&shape, &v);
            (b, Some(h))
        }
        _ => panic!("{usage}"),
    };
    for _ in 0..calls {
        let d = protocol::decode(black_box(&body), header_len, &sig, 32).expect("decodes");
        black_box(d);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--count") {
        return count(&args[1..]);
    }
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let cases: [(&str, &[i64]); 2] = [("mlp", &[784]), ("cnn", &[3, 32, 32])];
    for (model, features) in cases {
        let sig = sig(features);
        for batch in [1usize, 32] {
            let mut shape = vec![batch];
            shape.extend(features.iter().map(|d| *d as usize));
            let n: usize = shape.iter().product();
            let v = values(n);
            let iters = ((2_000_000.0 * scale) as usize / n).max(3);
            let json = json_body(&shape, &v);
            let (bin, header_len) = binary_body(&shape, &v);
            // Correctness first: both bodies decode to the same bits.
            let a = protocol::decode(&json, None, &sig, 32).expect("json decodes");
            let b = protocol::decode(&bin, Some(header_len), &sig, 32).expect("binary decodes");
            assert_eq!(a.inputs[0].data, Data::F32(v.clone()));
            assert_eq!(b.inputs[0].data, Data::F32(v.clone()));

            let dec_json = time(iters, || {
                black_box(protocol::decode(black_box(&json), None, &sig, 32).ok());
            });
            // Binary calls are ~100x cheaper: more of them, so that each
            // timed run spans many scheduler ticks.
            let bin_iters = iters * 200;
            let dec_bin = time(bin_iters, || {
                black_box(protocol::decode(black_box(&bin), Some(header_len), &sig, 32).ok());
            });
            let outputs = vec![Tensor {
                shape: shape.clone(),
                data: Data::F32(v.clone()),
            }];
            let encode = |binary: bool| {
                let iters = if binary { bin_iters } else { iters };
                let wanted = [OutputRequest {
                    index: 0,
                    binary,
                    classification: None,
                }];
                time(iters, || {
                    black_box(
                        protocol::encode(
                            "m",
                            "1",
                            Some("bench"),
                            &sig,
                            &BTreeMap::new(),
                            &wanted,
                            black_box(&outputs),
                        )
                        .ok(),
                    );
                })
            };
            let (enc_json, enc_bin) = (encode(false), encode(true));
            let per = |ns: f64| (ns / n as f64 * 100.0).round() / 100.0;
            println!(
                "{{\"model\":\"{model}\",\"batch\":{batch},\"elements\":{n},\"json_body_bytes\":{},\
                 \"decode_json_ns_per_elem\":{},\"decode_binary_ns_per_elem\":{},\
                 \"encode_json_ns_per_elem\":{},\"encode_binary_ns_per_elem\":{}}}",
                json.len(),
                per(dec_json),
                per(dec_bin),
                per(enc_json),
                per(enc_bin)
            );
        }
    }
}
