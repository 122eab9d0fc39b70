//! infermesh-sidecar: serves ONNX models over the Open Inference Protocol v2.

fn main() {}
