#!/usr/bin/env bash
# In-process engine benchmark: the sidecar's engine (tract with the
# project's ops, the plan the sidecar picks for the batch size:
# sidecar/examples/engine_bench.rs) against onnxruntime with one thread
# (bench/sidecar/ort_inproc.py), same model file, same rows
# (bench/sidecar/make_bodies.py, repeated to the batch size).
#
# Every loop runs pinned to core 0, one at a time; each round runs every
# cell once, variants of a cell back to back. Prints per cell the median
# over rounds of each variant's p50 and the engine / onnxruntime ratio.
# Raw JSON lines in bench/results/engine-<timestamp>/.
#
# Knobs (env):
#   ROUNDS=3          rounds of every cell
#   DURATION=3        seconds per measured loop (after 0.5 s of warm-up)
#   MODELS=tiny-cnn,digits-mlp
#   BATCHES=1,32
#   VERSION=2         example model version
#   BASELINE=PATH     another engine_bench binary (e.g. built from an
#                     earlier commit), run as variant "baseline"
#   CALLGRIND=1       also count instructions per Engine::run (valgrind
#                     callgrind, collecting inside Engine::run only) for
#                     engine and baseline: load-independent, unlike times
# A default run takes about 2 minutes (CALLGRIND adds about as much).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command -v taskset >/dev/null || { echo "engine.sh: taskset (util-linux) is missing" >&2; exit 1; }
scripts/tools.sh bench >/dev/null
cargo build --release -p sidecar --example engine_bench

rounds="${ROUNDS:-3}"
duration="${DURATION:-3}"
version="${VERSION:-2}"
IFS=, read -r -a models <<<"${MODELS:-tiny-cnn,digits-mlp}"
IFS=, read -r -a batches <<<"${BATCHES:-1,32}"
py=.tools/venv/bin/python
out="bench/results/engine-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/bodies"
"$py" bench/sidecar/make_bodies.py examples/models "$version" "$out/bodies" "${models[@]}"

echo "engine.sh: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/load.txt" >&2
top -bn1 | sed -n '7,12p' | tee -a "$out/load.txt" >&2 || true

variants=(engine ort)
[ -n "${BASELINE:-}" ] && variants=(baseline engine ort)
for ((r = 1; r <= rounds; r++)); do
  for m in "${models[@]}"; do
    dir="examples/models/$m/$version"
    for b in "${batches[@]}"; do
      for v in "${variants[@]}"; do
        case "$v" in
          engine) cmd=(target/release/examples/engine_bench "$dir" "$out/bodies/$m.json" "$duration" --batch "$b") ;;
          baseline) cmd=("$BASELINE" "$dir" "$out/bodies/$m.json" "$duration" --batch "$b") ;;
          ort) cmd=("$py" bench/sidecar/ort_inproc.py "$dir/model.onnx" "$out/bodies/$m.json" "$duration" "$b") ;;
        esac
        line="$(taskset -c 0 "${cmd[@]}")"
        echo "{\"round\": $r, \"model\": \"$m\", \"batch\": $b, \"variant\": \"$v\", \"result\": $line}" |
          tee -a "$out/raw.jsonl" >&2
      done
    done
  done
done
echo "engine.sh: load after the run: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load.txt" >&2

"$py" - "$out/raw.jsonl" <<'EOF' | tee "$out/table.txt"
import json, statistics, sys
from collections import defaultdict
p50 = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    p50[(r["model"], r["batch"], r["variant"])].append(r["result"]["p50_us"])
cells = sorted({(m, b) for m, b, _ in p50}, key=lambda c: (c[0], c[1]))
variants = [v for v in ("baseline", "engine", "ort") if any(k[2] == v for k in p50)]
head = "| model | batch | " + " | ".join(f"{v} p50 us" for v in variants)
head += " | engine / ort |" + (" engine / baseline |" if "baseline" in variants else "")
print(head)
print("|---|---:|" + "---:|" * (len(variants) + 1 + ("baseline" in variants)))
for m, b in cells:
    med = {v: statistics.median(p50[(m, b, v)]) for v in variants}
    row = f"| {m} | {b} | " + " | ".join(f"{med[v]:.1f}" for v in variants)
    row += f" | {med['engine'] / med['ort']:.2f} |"
    if "baseline" in variants:
        row += f" {med['engine'] / med['baseline']:.2f} |"
    print(row)
EOF

if [ "${CALLGRIND:-0}" = 1 ]; then
  command -v valgrind >/dev/null || { echo "engine.sh: valgrind is missing" >&2; exit 1; }
  echo "| model | batch | variant | instructions per run |"
  echo "|---|---:|---|---:|"
  for m in "${models[@]}"; do
    for b in "${batches[@]}"; do
      for v in "${variants[@]}"; do
        case "$v" in
          engine) bin=target/release/examples/engine_bench ;;
          baseline) bin="$BASELINE" ;;
          *) continue ;;
        esac
        cg="$out/callgrind.$m.$b.$v"
        valgrind --tool=callgrind --callgrind-out-file="$cg" \
          --toggle-collect='sidecar::engine::Engine::run*' \
          "$bin" "examples/models/$m/$version" "$out/bodies/$m.json" 1 --batch "$b" 2>/dev/null >/dev/null
        per_run="$("$py" bench/sidecar/callgrind_per_call.py "$cg" sidecar::engine::Engine::run)"
        echo "| $m | $b | $v | $per_run |"
      done
    done
  done | tee "$out/instructions.txt"
fi
echo "engine.sh: raw results in $out" >&2
