#!/usr/bin/env bash
# Tree ensemble benchmark: a scikit-learn RandomForestClassifier (100
# trees, depth 8, 16 features, 3 classes; made by bench/trees/make_forest.py,
# not committed) in-process and over HTTP.
#
#   in-process, per-sample time at batch 1 and 32:
#     onnxruntime (1 thread), tract + onnx-ml-ops (the sidecar's engine),
#     and tract-onnx's own TreeEnsembleClassifier (before onnx-ml-ops)
#   HTTP, requests/s with wrk (batch-1 JSON body) at concurrency 1 and 8:
#     infermesh-sidecar (--instances 1) vs FastAPI + uvicorn + onnxruntime
#     (bench/sidecar/fastapi_server.py, 1 worker, 1 onnxruntime thread)
#
# Servers and in-process loops run on core 0, wrk on core 1. ROUNDS rounds
# alternate the variants; the table shows the median per variant. Results
# go to bench/results/trees-<timestamp>/ (raw JSON lines and a summary).
#
# Knobs (env): ROUNDS=3  DURATION=5 (s per wrk run)  PORT=18700
#              TRACT_TOO=1 (also time tract-onnx's own op; slow)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-3}" duration="${DURATION:-5}" port="${PORT:-18700}"
out="bench/results/trees-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
work="$root/target/trees-bench"

command -v wrk >/dev/null || { echo "trees.sh: wrk is missing (apt-get install wrk)" >&2; exit 1; }
scripts/tools.sh models bench >/dev/null
py="$root/.tools/venv/bin/python"
# Two builds: with --example, cargo would build only examples of both.
cargo build --release -p sidecar
cargo build --release -p onnx-ml-ops --example bench_trees
sidecar="$root/target/release/infermesh-sidecar"
bench="$root/target/release/examples/bench_trees"

echo "== model (deterministic) and onnxruntime in-process" >&2
raw="$out/raw.jsonl"
: >"$raw"
for r in $(seq "$rounds"); do
  taskset -c 0 "$py" bench/trees/make_forest.py "$work" | sed "s/^{/{\"round\": $r, /" >>"$raw"
  extra=()
  [ "${TRACT_TOO:-1}" = 1 ] && [ "$r" = 1 ] && extra=(--tract-too)
  taskset -c 0 "$bench" "$work/repo/forest/1/model.onnx" "$work/x.bin" 16 "${extra[@]}" \
    | sed "s/^{/{\"round\": $r, /" >>"$raw"
done

wait_ready() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "trees.sh: server on $port never became ready" >&2; return 1
}

http() { # name, command...
  local name="$1"; shift
  taskset -c 0 "$@" >"$out/$name.log" 2>&1 &
  local pid=$!
  wait_ready
  for conc in 1 8; do
    BODY="$work/body-b1.json" TARGET_PATH=/v2/models/forest/infer taskset -c 1 \
      wrk -t1 -c"$conc" -d1s -s bench/sidecar/post.lua "http://127.0.0.1:$port" >/dev/null
    res="$(BODY="$work/body-b1.json" TARGET_PATH=/v2/models/forest/infer taskset -c 1 \
      wrk -t1 -c"$conc" -d"${duration}s" --timeout 10s -s bench/sidecar/post.lua \
      "http://127.0.0.1:$port" | sed -n 's/^RESULT //p')"
    echo "{\"round\": $r, \"runtime\": \"$name\", \"concurrency\": $conc, \"wrk\": $res}" >>"$raw"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "== HTTP" >&2
for r in $(seq "$rounds"); do
  http sidecar "$sidecar" --model-repository "$work/repo" --listen "127.0.0.1:$port" --instances 1
  http fastapi "$py" bench/sidecar/fastapi_server.py --model-repository "$work/repo" --port "$port" --threads 1
done

"$py" - "$raw" "$out/summary.json" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: statistics.median(xs) if xs else float("nan")
s = {"inproc_us_per_sample": {}, "http_rps": {}, "http_p50_us": {}}
for rt in sorted({r["runtime"] for r in rows if "batch" in r}):
    for b in (1, 32):
        xs = [r["us_per_sample"] for r in rows if r["runtime"] == rt and r.get("batch") == b]
        if xs:
            s["inproc_us_per_sample"][f"{rt} b{b}"] = med(xs)
for rt in ("sidecar", "fastapi"):
    for c in (1, 8):
        ws = [r["wrk"] for r in rows if r["runtime"] == rt and r.get("concurrency") == c]
        if ws:
            s["http_rps"][f"{rt} c{c}"] = med([w["requests"] / (w["duration_us"] / 1e6) for w in ws])
            s["http_p50_us"][f"{rt} c{c}"] = med([w["p50_us"] for w in ws])
json.dump(s, open(sys.argv[2], "w"), indent=1)
ip = s["inproc_us_per_sample"]
for b in (1, 32):
    o, t = ip.get(f"onnxruntime b{b}"), ip.get(f"tract+onnx-ml-ops b{b}")
    old = ip.get(f"tract-onnx b{b}")
    print(f"in-process batch {b:>2}: onnxruntime {o:.2f} us/sample, tract+onnx-ml-ops {t:.2f}"
          f" ({t / o:.2f}x)" + (f", tract-onnx's own op {old:.1f}" if old else ""))
h = s["http_rps"]
for c in (1, 8):
    a, b = h.get(f"sidecar c{c}"), h.get(f"fastapi c{c}")
    print(f"HTTP c{c}: sidecar {a:.0f} req/s (p50 {s['http_p50_us'][f'sidecar c{c}']:.0f} us), "
          f"FastAPI+onnxruntime {b:.0f} req/s (p50 {s['http_p50_us'][f'fastapi c{c}']:.0f} us): {a / b:.1f}x")
PY
echo "results: $out" >&2
