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
cargo build --target wasm32-wasip1 --profile wasm -p bench-noop -p bench-hash-route
mkdir -p bench/results/wasm
for f in noop hash-route; do
  src="target/wasm32-wasip1/wasm/bench_${f//-/_}.wasm"
  dst="bench/results/wasm/$f.wasm"
  if command -v wasm-opt >/dev/null 2>&1; then
    # As bench/filters.sh and wasm-build.sh do.
    wasm-opt -Oz --strip-debug --strip-producers \
      --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
      --enable-mutable-globals --enable-multivalue --enable-reference-types \
      "$src" -o "$dst"
  else
    cp "$src" "$dst"
  fi
done
exec python3 bench/envoy/count_filters.py
