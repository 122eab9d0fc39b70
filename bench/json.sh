#!/usr/bin/env bash
# Tensor codec micro-benchmark (sidecar/examples/bench_json.rs): ns per
# FP32 element to decode a whole OIP request into the typed buffer, JSON
# (floats as Python writes float32 values, 17 digits) and binary, and to
# encode the response, for the MLP (784 features) and CNN (3x32x32) input
# shapes at batch 1 and 32. Pinned to core 0; one JSON line per case.
#
#   bench/json.sh [SCALE]     SCALE multiplies the iterations (default 1)
#   bench/json.sh --count     instructions per element to decode, counted
#                             by valgrind's callgrind: the same on a busy
#                             machine as on a quiet one
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --locked -p sidecar --example bench_json >&2
bin=target/release/examples/bench_json
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if [ "${1:-}" != --count ]; then
  exec taskset -c 0 "$bin" "${1:-1}"
fi

command -v valgrind >/dev/null || { echo "json.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Total instructions of one run of `bench_json --count ...`.
instructions() {
  valgrind --tool=callgrind --callgrind-out-file="$tmp/out" "$bin" --count "$@" >/dev/null 2>"$tmp/log"
  sed -n 's/^summary: //p' "$tmp/out"
}
for kind in json binary; do
  for model in mlp cnn; do
    for batch in 1 32; do
      case $model in mlp) per=784 ;; cnn) per=3072 ;; esac
      n=$((per * batch))
      # Two call counts; the difference removes start-up and body setup.
      lo=1; hi=$(( batch == 1 ? 21 : 3 ))
      a="$(instructions "$kind" "$model" "$batch" "$lo")"
      b="$(instructions "$kind" "$model" "$batch" "$hi")"
      awk -v k="$kind" -v m="$model" -v bt="$batch" -v n="$n" -v a="$a" -v b="$b" -v c="$((hi - lo))" \
        'BEGIN { printf "{\"decode\":\"%s\",\"model\":\"%s\",\"batch\":%d,\"elements\":%d,\"instructions_per_elem\":%.2f}\n", k, m, bt, n, (b - a) / (c * n) }'
    done
  done
done
