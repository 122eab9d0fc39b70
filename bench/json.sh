#!/usr/bin/env bash
# Tensor codec micro-benchmark (sidecar/examples/bench_json.rs): ns per
# FP32 element to decode a whole OIP request into the typed buffer, JSON
# (floats as Python writes float32 values, 17 digits) and binary, and to
# encode the response, for the MLP (784 features) and CNN (3x32x32) input
# shapes at batch 1 and 32. Pinned to core 0; one JSON line per case.
#
#   bench/json.sh [SCALE]     SCALE multiplies the iterations (default 1)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --locked -p sidecar --example bench_json >&2
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
taskset -c 0 target/release/examples/bench_json "${1:-1}"
