//! infermesh-sidecar: serves ONNX models over the Open Inference Protocol v2
//! (KServe / Triton REST) with tract-onnx, dynamic batching, Prometheus
//! metrics and a graceful drain.

pub mod api;
pub mod batching;
pub mod config;
pub mod engine;
pub mod json;
pub mod metrics;
pub mod model_repo;
pub mod object_repo;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod tensor;
