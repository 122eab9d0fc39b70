#!/usr/bin/env bash
# Builds every infermesh filter for wasm32-wasip1 with the size-optimised
# `wasm` profile, runs wasm-opt when it is installed, and writes to OUT_DIR
# (default: dist/):
#   <filter>.wasm  <filter>.wasm.sha256   the modules and their sha256
#   oci/                                  an OCI image layout, one tag per
#                                         filter, in the form Istio pulls for
#                                         oci:// WasmPlugin URLs
# No Docker engine is needed. Usage: ./wasm-build.sh [OUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$root/dist}"
cd "$root"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi

# Every cdylib crate under filters/ is a filter (core and shim are libraries).
filters=()
for dir in filters/*/; do
  name="$(basename "$dir")"
  [ -f "$dir/Cargo.toml" ] && grep -q cdylib "$dir/Cargo.toml" && filters+=("$name")
done

pkgs=()
for f in "${filters[@]}"; do pkgs+=(-p "filter-$f"); done
cargo build --locked --target wasm32-wasip1 --profile wasm "${pkgs[@]}"

mkdir -p "$out"
opt="none"
if command -v wasm-opt >/dev/null 2>&1; then
  opt="$(wasm-opt --version | head -1)"
fi
printf '%-14s %10s %10s  %s\n' filter built optimised sha256
for f in "${filters[@]}"; do
  src="target/wasm32-wasip1/wasm/filter_${f//-/_}.wasm"
  dst="$out/$f.wasm"
  if [ "$opt" != none ]; then
    # Rust's wasm32-wasip1 output uses these post-MVP features; V8 (the
    # runtime Istio ships) supports all of them.
    wasm-opt -Oz --strip-debug --strip-producers \
      --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
      --enable-mutable-globals --enable-multivalue --enable-reference-types \
      "$src" -o "$dst"
  else
    cp "$src" "$dst"
  fi
  (cd "$out" && sha256sum "$f.wasm" >"$f.wasm.sha256")
  printf '%-14s %10s %10s  %s\n' "$f" "$(stat -c %s "$src")" "$(stat -c %s "$dst")" "$(cut -d' ' -f1 "$out/$f.wasm.sha256")"
done
[ "$opt" != none ] || echo "(wasm-opt not found: modules are not post-optimised; apt-get install binaryen)"

args=()
for f in "${filters[@]}"; do args+=("$f=$out/$f.wasm"); done
python3 "$root/scripts/oci_image.py" "$out/oci" "${args[@]}"
