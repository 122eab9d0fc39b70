#!/usr/bin/env bash
# Sidecar benchmark: infermesh-sidecar against in-process tract (its own
# engine, the floor), in-process onnxruntime, a tuned FastAPI + uvicorn +
# onnxruntime OIP v2 server (bench/sidecar/fastapi_server.py, 1 worker;
# JSON and binary tensors) and MLServer 1.7 with an onnxruntime custom
# runtime, on three models: `forest` (100 trees, depth 8, 16 features; made
# by bench/trees/make_forest.py), digits-mlp (784-256-128-10) and tiny-cnn
# (3x32x32).
#
# Cells: batch x concurrency (b1c1, b1c8, b1c32, b32c8 by default). Loads
# per cell:
#   wrk-json   wrk with bench/sidecar/post.lua POSTing a fixed OIP v2 JSON
#              body (bench/sidecar/make_bodies.py)
#   pa-json    Triton's perf_analyzer (tritonclient 2.50.0 wheel, installed
#   pa-binary  by `scripts/tools.sh perf`) sending JSON or binary tensors
#              (`-i http -b B --input-data`, async, one thread): a second,
#              independent client. It reads Triton's model config endpoint,
#              which MLServer lacks: MLServer gets wrk-json rows only.
#
# Every server runs pinned to core 0, the load generator to core 1 (the
# in-process loops also on core 0). Each round runs every variant once, in
# an order rotated every round; each server variant is a fresh process per
# round. Results: tables on stdout (first sidecar vs FastAPI per cell and
# load: req/s, p50, ratio, target >= 2x; then every variant), raw JSON
# lines, logs and a summary in bench/results/sidecar-<timestamp>/.
#
# Variants: tract-inproc, ort-inproc (batch 1), sidecar-i1 (--instances 1),
# sidecar-i2 (--instances 2: what the default, the CPU count, is on this
# 2-core machine when the sidecar is not pinned; pinned to one core the
# default would be 1), fastapi, mlserver.
#
# Knobs (env):
#   QUICK=1           a short smoke run (about 5 minutes): ROUNDS=1
#                     DURATION=2 WARMUP=1 VARIANTS=sidecar-i1,fastapi
#                     SKIP_MLSERVER=1 unless set otherwise
#   ROUNDS=3          rounds of every variant
#   DURATION=5        seconds per measurement (wrk: whole seconds;
#                     perf_analyzer: three windows of DURATION/3)
#   WARMUP=1          seconds of unmeasured wrk load before each wrk run
#                     (0: none; perf_analyzer warms up on its own)
#   MODELS=forest,digits-mlp,tiny-cnn
#   CELLS=b1c1,b1c8,b1c32,b32c8   bBATCHcCONCURRENCY
#   LOADS=wrk-json,pa-json,pa-binary
#   VARIANTS=tract-inproc,ort-inproc,sidecar-i1,sidecar-i2,fastapi,mlserver
#   PORT=18600        loopback ports PORT..PORT+2
#   SKIP_MLSERVER=1   do not install or run MLServer
# A default run takes about 45 minutes; run it on a quiet machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

[ "$(nproc)" -ge 2 ] || { echo "sidecar.sh: needs 2 cores (server on 0, load on 1)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "sidecar.sh: taskset (util-linux) is missing" >&2; exit 1; }
if ! command -v wrk >/dev/null 2>&1; then
  echo "sidecar.sh: installing wrk" >&2
  apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

if [ "${QUICK:-0}" = 1 ]; then
  : "${ROUNDS:=1}" "${DURATION:=2}" "${WARMUP:=1}" "${VARIANTS:=sidecar-i1,fastapi}"
  : "${SKIP_MLSERVER:=1}"
fi

# Python baselines: the shared venv (FastAPI, uvicorn, onnxruntime; the
# models group makes the forest) and, separately, MLServer (its protobuf
# pin clashes with the shared venv); perf_analyzer in its own venv.
scripts/tools.sh bench models >/dev/null
perf_analyzer=""
case "${LOADS:-pa-}" in
  *pa-*) scripts/tools.sh perf >/dev/null && perf_analyzer="$root/.tools/bin/perf_analyzer" ;;
esac
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

# The forest model (deterministic, ~3 MB, not committed): made once.
forest="$root/target/trees-bench"
case ",${MODELS:-forest}," in
  *,forest,*)
    if [ ! -f "$forest/repo/forest/1/model.onnx" ] || [ ! -f "$forest/x.bin" ]; then
      echo "sidecar.sh: making the forest model in $forest" >&2
      .tools/venv/bin/python bench/trees/make_forest.py "$forest" >/dev/null
    fi ;;
esac

# The release sidecar and the in-process engine loop (an example of the
# sidecar crate, so it uses the sidecar's own Engine; built only when
# tract-inproc is measured: with the examples' dev-dependencies cargo
# builds the crate and its dependencies a second time).
cargo build --release -p sidecar --bin infermesh-sidecar
engine_bench=""
case ",${VARIANTS:-tract-inproc}," in
  *,tract-inproc,*)
    cargo build --release -p sidecar --example engine_bench
    engine_bench=target/release/examples/engine_bench ;;
esac

echo "sidecar.sh: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
top -bn1 | sed -n '7,12p' >&2 || true

out="bench/results/sidecar-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
.tools/venv/bin/python bench/sidecar/run.py \
  --out "$out" \
  --sidecar-bin target/release/infermesh-sidecar \
  --engine-bench "$engine_bench" \
  --python .tools/venv/bin/python \
  --mlserver "$mlserver" \
  --rounds "${ROUNDS:-3}" --duration "${DURATION:-5}" --warmup "${WARMUP:-1}" \
  --models "${MODELS:-forest,digits-mlp,tiny-cnn}" \
  --forest-dir "$forest" \
  --cells "${CELLS:-b1c1,b1c8,b1c32,b32c8}" \
  --loads "${LOADS:-wrk-json,pa-json,pa-binary}" \
  --perf-analyzer "$perf_analyzer" \
  --variants "${VARIANTS:-tract-inproc,ort-inproc,sidecar-i1,sidecar-i2,fastapi,mlserver}" \
  --port "${PORT:-18600}" | tee "$out/table.txt"
echo "sidecar.sh: raw results in $out" >&2
