#!/usr/bin/env bash
# Builds the benchmark's own filters (no-op floor, minimal header-hash)
# into bench/results/wasm/, optimised with the flags wasm-build.sh uses
# for the product module. Called by bench/filters.sh and
# bench/filters-instructions.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --target wasm32-wasip1 --profile wasm -p bench-noop -p bench-hash-route
mkdir -p bench/results/wasm
for f in noop hash-route; do
  src="target/wasm32-wasip1/wasm/bench_${f//-/_}.wasm"
  dst="bench/results/wasm/$f.wasm"
  if command -v wasm-opt >/dev/null 2>&1; then
    wasm-opt -Oz --strip-debug --strip-producers \
      --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
      --enable-mutable-globals --enable-multivalue --enable-reference-types \
      "$src" -o "$dst"
  else
    cp "$src" "$dst"
  fi
done
