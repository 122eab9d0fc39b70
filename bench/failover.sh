#!/usr/bin/env bash
# Failover under load: three real inference sidecars on 127.0.0.2/3/4 are
# three clouds (aws, gcp, azure) behind a real Envoy; an open-loop client
# POSTs digits-mlp infer requests at RATE req/s and records every request's
# status, latency and serving cloud while the primary (aws) is
#   kill: SIGKILLed at FAULT_S, restarted on the same port at KILL_BACK_S,
#         run until KILL_END_S;
#   hang: SIGSTOPped at FAULT_S, SIGCONTed at HANG_BACK_S, run until
#         HANG_END_S (≥ 60 s stopped, so Envoy's re-probe of the ejected
#         host after base_ejection_time is inside the run).
# Variants (fresh sidecars and Envoy per variant and scenario):
#   native-priority     one cluster, a priority level per cloud, outlier
#                       detection + retries to other priorities
#   native-aggregate    a cluster per cloud under an aggregate cluster, same
#                       outlier detection and retries
#   native-priority-hc  native-priority + active HTTP health checks on
#                       /v2/health/ready (500 ms interval, 200 ms timeout)
#   infermesh           the failover Wasm filter (dist/infermesh.wasm) with
#                       header routes per cloud
# Results: a markdown table on stdout and bench/results/failover-<ts>/
# (table.md, <variant>-<scenario>.json with every request, logs).
#
# Knobs (env):
#   VARIANTS=native-priority,native-aggregate,native-priority-hc,infermesh
#   SCENARIOS=kill,hang   RATE=200   WARMUP_S=5   FAULT_S=10
#   KILL_BACK_S=25 KILL_END_S=60 HANG_BACK_S=80 HANG_END_S=110
#   WASM=path/to/infermesh.wasm  (default: build it with ./wasm-build.sh)
# A default run takes about 12 minutes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

variants="${VARIANTS:-native-priority,native-aggregate,native-priority-hc,infermesh}"

scripts/tools.sh envoy
cargo build --release -p sidecar --bin infermesh-sidecar
cargo build --release -p failover-bench

wasm_args=()
if [[ ",$variants," == *",infermesh,"* ]]; then
  wasm="${WASM:-}"
  if [ -z "$wasm" ]; then
    if ./wasm-build.sh >&2; then
      wasm="dist/infermesh.wasm"
    fi
  fi
  if [ -n "$wasm" ] && [ -f "$wasm" ]; then
    wasm_args=(--wasm "$wasm")
    echo "failover.sh: filter $wasm sha256 $(sha256sum "$wasm" | cut -c1-16)…" >&2
  else
    echo "failover.sh: NO failover filter could be built; the infermesh variant is left out" >&2
    variants="$(echo ",$variants," | sed 's/,infermesh,/,/; s/^,//; s/,$//')"
  fi
fi

echo "failover.sh: $(nproc) cores; load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
out="bench/results/failover-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
ENVOY_BIN="${ENVOY_BIN:-$root/.tools/bin/envoy}" target/release/failover-bench \
  --sidecar target/release/infermesh-sidecar \
  --out "$out" \
  "${wasm_args[@]}" \
  --variants "$variants" \
  --scenarios "${SCENARIOS:-kill,hang}" \
  --rate "${RATE:-200}" \
  --warmup-s "${WARMUP_S:-5}" --fault-s "${FAULT_S:-10}" \
  --kill-back-s "${KILL_BACK_S:-25}" --kill-end-s "${KILL_END_S:-60}" \
  --hang-back-s "${HANG_BACK_S:-80}" --hang-end-s "${HANG_END_S:-110}" | tee "$out/stdout.md"
echo "failover.sh: results in $out" >&2
