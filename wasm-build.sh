#!/usr/bin/env bash
# Builds every infermesh filter for wasm32-wasip1 with the size-optimised
# `wasm` profile, runs wasm-opt when it is installed, and writes to OUT_DIR
# (default: dist/):
#   infermesh.wasm infermesh.wasm.sha256  the module and its sha256
#   oci/                                  an OCI image layout (tag infermesh)
#                                         in the form Istio pulls for
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

# istio/ with the digests of this build: the WasmPlugin's `sha256` set to
# the OCI manifest digest Istio verifies for oci:// URLs, so it can be
# pulled IfNotPresent (and its url to
# $INFERMESH_IMAGE when set, e.g. registry.example.com/infermesh/infermesh:0.1.0),
# so a re-pushed tag is never served from a stale cache.
digest="$(cat "$out/oci/infermesh.manifest.sha256")"
rm -rf "$out/istio"
cp -r "$root/istio" "$out/istio"
plugin="$out/istio/path-routing/infermesh-wasmplugin.yaml"
sed -i "s|^  # sha256: .*|  sha256: $digest|; s|^  imagePullPolicy: Always|  imagePullPolicy: IfNotPresent|" "$plugin"
if [ -n "${INFERMESH_IMAGE:-}" ]; then
  sed -i "s|^  url: oci://.*|  url: oci://${INFERMESH_IMAGE}|" "$plugin"
fi
grep -q "^  sha256: $digest" "$plugin" || { echo "wasm-build.sh: could not set sha256 in $plugin" >&2; exit 1; }
echo "istio/ with sha256 $digest: $out/istio (kubectl apply -f $out/istio/base -f $out/istio/path-routing)"
