#!/usr/bin/env bash
# Runs every test of the project: unit and property tests, the shipped
# module on wasmtime (filters/host: scenarios, fuel budgets, a 30 s
# random-input smoke), the e2e suite in
# a real Envoy (V8) against the shipped (wasm-opt'd) filter modules, the
# sidecar's tests, the tritonclient and KServe client tests, the manifest
# validation, the injector's webhook checked with jsonpatch + validate.py,
# and the sidecar's container image (built, rebuilt for the same digest, run).
# Installs what it needs on first use (scripts/tools.sh).
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    Rust tests only (no manifest or client tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
quick=0
[ "${1:-}" = "--quick" ] && quick=1

scripts/tools.sh wasm envoy manifests objectstores
[ -f python/requirements-client.txt ] && scripts/tools.sh client
[ -f python/requirements-kserve.txt ] && scripts/tools.sh kserve
[ "$quick" = 1 ] || scripts/tools.sh inject image

# Test the modules exactly as they ship.
./wasm-build.sh >/dev/null
export INFERMESH_WASM_DIR="$root/dist"
export ENVOY_BIN="${ENVOY_BIN:-$root/.tools/bin/envoy}"

# filter-host's random-input smoke of the module runs this long (s).
export INFERMESH_FUZZ_SECS="${INFERMESH_FUZZ_SECS:-30}"
echo "== cargo test (workspace)"
cargo test --workspace --locked --no-fail-fast

[ "$quick" = 1 ] && exit 0

echo "== manifests (shared/schemas/validate.py)"
schemas="$root/../shared/schemas"
if [ -f "$schemas/validate.py" ]; then
  .tools/venv/bin/python "$schemas/validate.py" istio/ dist/istio/ examples/k8s/
else
  echo "validate.py not found at $schemas: manifest schema check skipped" >&2
fi
if [ -f "$schemas/check_istio_wasm_image.py" ]; then
  echo "== the OCI image against Istio's Wasm image fetcher rules"
  .tools/venv/bin/python "$schemas/check_istio_wasm_image.py" oci:dist/oci:infermesh
  # The digest the build wrote into dist/istio is the image's.
  grep -q "sha256: $(cat dist/oci/infermesh.manifest.sha256)" dist/istio/path-routing/infermesh-wasmplugin.yaml
fi

if [ -d sidecar/tests/client ] && ls sidecar/tests/client/test_*.py >/dev/null 2>&1; then
  echo "== tritonclient and the KServe client against the sidecar"
  # cargo test built the binary for the sidecar's own process tests; a
  # separate `cargo build` would rebuild it with other features.
  [ -x target/debug/infermesh-sidecar ] || cargo build --locked -p sidecar
  export SIDECAR_BIN="$root/target/debug/infermesh-sidecar"
  .tools/venv/bin/python -m pytest -q sidecar/tests/client/test_tritonclient.py sidecar/tests/client/test_batches.py
  .tools/venv-kserve/bin/python -m pytest -q sidecar/tests/client/test_kserve.py
fi

if [ -f "$schemas/validate.py" ]; then
  echo "== injector webhook (jsonpatch, validate.py on Kubernetes 1.29/1.33/1.37)"
  [ -x target/debug/infermesh ] || cargo build --locked -p infermesh
  VALIDATE_PY="$schemas/validate.py" INFERMESH_BIN="$root/target/debug/infermesh" \
    .tools/venv/bin/python -m pytest -q cli/tests/webhook
fi

echo "== sidecar image (scripts/sidecar-image.sh --debug, run with runc)"
scripts/sidecar-image-test.sh
