#!/usr/bin/env bash
# Instructions per request of the filter variants inside a real Envoy,
# counted by valgrind's callgrind (bench/envoy/count_filters.py): exact
# for the same build and input, whatever else the machine runs.
#
# Knobs (env): VARIANTS (those of bench/filters.sh; VARIANT@NAME runs
# VARIANT with bench/results/wasm/ab/NAME.wasm as the module),
# REQUESTS=1000, WARMUP_REQUESTS=2000, COUNT_RATE=50 (req/s in the counted
# window), IDLE_S=5 (idle window for the timers), BASE_PORT=28080.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  echo "filters-instructions.sh: installing valgrind" >&2
  apt-get install -y valgrind >/dev/null || { apt-get update >/dev/null && apt-get install -y valgrind >/dev/null; }
fi
[ -x .tools/bin/envoy ] || scripts/tools.sh envoy
[ -f dist/infermesh.wasm ] || ./wasm-build.sh
cargo build --release -p bench-tools
bench/build-filters.sh
exec python3 bench/envoy/count_filters.py
