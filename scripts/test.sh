#!/usr/bin/env bash
# Runs every test of the project: unit and property tests, the e2e suite in
# a real Envoy (V8) against the shipped (wasm-opt'd) filter modules, the
# sidecar's tests, the tritonclient tests and the manifest validation.
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

# Test the modules exactly as they ship.
./wasm-build.sh >/dev/null
export INFERMESH_WASM_DIR="$root/dist"
export ENVOY_BIN="${ENVOY_BIN:-$root/.tools/bin/envoy}"

echo "== cargo test (workspace)"
cargo test --workspace --locked --no-fail-fast

[ "$quick" = 1 ] && exit 0

echo "== manifests (shared/schemas/validate.py)"
schemas="$root/../shared/schemas"
if [ -f "$schemas/validate.py" ]; then
  .tools/venv/bin/python "$schemas/validate.py" istio/
else
  echo "validate.py not found at $schemas: manifest schema check skipped" >&2
fi

if [ -d sidecar/tests/client ] && ls sidecar/tests/client/test_*.py >/dev/null 2>&1; then
  echo "== tritonclient against the sidecar"
  # cargo test built the binary for the sidecar's own process tests; a
  # separate `cargo build` would rebuild it with other features.
  [ -x target/debug/infermesh-sidecar ] || cargo build --locked -p sidecar
  SIDECAR_BIN="$root/target/debug/infermesh-sidecar" .tools/venv/bin/python -m pytest -q sidecar/tests/client
fi
