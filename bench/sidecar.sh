#!/usr/bin/env bash
# Sidecar benchmark: infermesh-sidecar against in-process tract (its own
# engine, the floor), in-process onnxruntime, a FastAPI + uvicorn +
# onnxruntime OIP v2 server (bench/sidecar/fastapi_server.py, 1 worker) and
# MLServer 1.7 with an onnxruntime custom runtime. One load generator: wrk
# with bench/sidecar/post.lua POSTing a fixed batch-1 JSON body.
#
# Every server runs pinned to core 0, wrk to core 1 (the in-process loops
# also on core 0). Each round runs every variant once, in an order rotated
# every round; each server variant is a fresh process per round. Results:
# a table on stdout, raw JSON lines, logs and a summary in
# bench/results/sidecar-<timestamp>/.
#
# Variants: tract-inproc, ort-inproc, sidecar-i1 (--instances 1),
# sidecar-i2 (--instances 2: what the default, the CPU count, is on this
# 2-core machine when the sidecar is not pinned; pinned to one core the
# default would be 1), fastapi, mlserver.
#
# Knobs (env):
#   ROUNDS=3          rounds of every variant
#   DURATION=5        seconds per measured wrk run
#   WARMUP=1          seconds of unmeasured load before each measurement
#   MODELS=digits-mlp,tiny-cnn
#   CONCURRENCY=1,8,32  wrk connections
#   VARIANTS=tract-inproc,ort-inproc,sidecar-i1,sidecar-i2,fastapi,mlserver
#   PORT=18600        loopback ports PORT..PORT+2
#   SKIP_MLSERVER=1   do not install or run MLServer
# A default run takes about 9 minutes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

[ "$(nproc)" -ge 2 ] || { echo "sidecar.sh: needs 2 cores (server on 0, load on 1)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "sidecar.sh: taskset (util-linux) is missing" >&2; exit 1; }
if ! command -v wrk >/dev/null 2>&1; then
  echo "sidecar.sh: installing wrk" >&2
  apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

# Python baselines: the shared venv (FastAPI, uvicorn, onnxruntime) and,
# separately, MLServer (its protobuf pin clashes with the shared venv).
scripts/tools.sh bench >/dev/null
mlserver=""
if [ "${SKIP_MLSERVER:-0}" != 1 ]; then
  mvenv="$root/.tools/venv-mlserver"
  req="$root/bench/sidecar/requirements-mlserver.txt"
  stamp="$mvenv/.installed"
  sum="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    echo "sidecar.sh: installing MLServer into $mvenv" >&2
    if [ ! -x "$mvenv/bin/python" ]; then
      python3 -m venv "$mvenv"
      "$mvenv/bin/python" -m pip install -q --upgrade pip >/dev/null
    fi
    if "$mvenv/bin/python" -m pip install -q -r "$req"; then
      echo "$sum" >"$stamp"
    else
      echo "sidecar.sh: MLServer did not install; it is left out" >&2
    fi
  fi
  [ -f "$stamp" ] && mlserver="$mvenv/bin/mlserver"
fi

# The release sidecar and the in-process engine loop (an example of the
# sidecar crate, so it uses the sidecar's own Engine).
cargo build --release -p sidecar --bin infermesh-sidecar
cargo build --release -p sidecar --example engine_bench

echo "sidecar.sh: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
top -bn1 | sed -n '7,12p' >&2 || true

out="bench/results/sidecar-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
.tools/venv/bin/python bench/sidecar/run.py \
  --out "$out" \
  --sidecar-bin target/release/infermesh-sidecar \
  --engine-bench target/release/examples/engine_bench \
  --python .tools/venv/bin/python \
  --mlserver "$mlserver" \
  --rounds "${ROUNDS:-3}" --duration "${DURATION:-5}" --warmup "${WARMUP:-1}" \
  --models "${MODELS:-digits-mlp,tiny-cnn}" \
  --concurrency "${CONCURRENCY:-1,8,32}" \
  --variants "${VARIANTS:-tract-inproc,ort-inproc,sidecar-i1,sidecar-i2,fastapi,mlserver}" \
  --port "${PORT:-18600}" | tee "$out/table.txt"
echo "sidecar.sh: raw results in $out" >&2
