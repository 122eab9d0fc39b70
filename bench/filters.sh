#!/usr/bin/env bash
# Filter benchmark: Envoy native weighted_clusters vs Wasm filters on V8
# (no-op floor, minimal header-hash filter, the shipped infermesh.wasm with
# one or more stages, and the three single-stage modules it replaced, built
# from OLD_REF so both are measured in the same rounds).
#
# Envoy runs with --concurrency 1 pinned to core 0; wrk, the paced client
# and the upstream (a one-thread hyper server) share core 1. Each round
# starts a fresh Envoy per variant, in an order rotated every round.
# Results: a table on stdout, raw JSON and CSV in bench/results/.
#
# Knobs (env):
#   ROUNDS=5        rounds of every variant
#   DURATION=10     seconds per measured run (saturation and paced each)
#   RATE=3000       paced rate, req/s
#   WARMUP=2        seconds of unmeasured load before each measurement
#   VARIANTS=native,noop,hash,module-canary,module-router+canary,module-chain,
#            module-unconcerned
#                   (the one module: module-canary, module-router+canary,
#                   module-chain (all three stages), module-failover,
#                   module-chain-post (POST body copied for replay),
#                   module-canary-guard (module-canary with a guard),
#                   module-unconcerned (a request no stage decides on);
#                   the modules it replaced: canary, router+canary,
#                   router+canary+failover, and below; see bench/envoy/run_filters.py for
#                   the attribution variants: hash+path, hash+strip,
#                   hash+metric, hash+servedby, hash+all, canary-noserved,
#                   canary-trust; and the model-router ones: router (pinned
#                   OIP paths), router-body (POST /predict, version from a
#                   300-byte JSON body; paired with native-post, the same
#                   POSTs through weighted_clusters), router+canary, and
#                   router-post (router-body's filter, the same POST sent to
#                   a pinned path: the body is not read); and the failover
#                   ones: failover (alone, routes on x-infermesh-cloud),
#                   failover-post (the POST body copied for replay; paired
#                   with native-post), router+canary+failover (the chain))
#   REBUILD_CANARY=1  rebuild dist/*.wasm with ./wasm-build.sh even if present
#   OLD_REF=ee632cb   the commit whose single-stage modules (canary,
#                   model-router, failover) the old variants run
#   BASE_PORT=28080 loopback ports BASE_PORT..BASE_PORT+10
#   NICE=-10        nice level of Envoy, load and upstream (0 when not root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

[ "$(nproc)" -ge 2 ] || { echo "filters.sh: needs 2 cores (Envoy on 0, load on 1)" >&2; exit 1; }

if ! command -v wrk >/dev/null 2>&1; then
  echo "filters.sh: installing wrk" >&2
  apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
command -v taskset >/dev/null || { echo "filters.sh: taskset (util-linux) is missing" >&2; exit 1; }
[ -x .tools/bin/envoy ] || scripts/tools.sh envoy
if [ "${REBUILD_CANARY:-0}" = 1 ] || [ ! -f dist/infermesh.wasm ]; then
  ./wasm-build.sh
fi

# The single-stage modules infermesh.wasm replaced, for the old variants:
# built once from OLD_REF in a scratch worktree (its own target dir).
old_ref="${OLD_REF:-ee632cb}"
old_out="bench/results/wasm/old"
if [ ! -f "$old_out/$old_ref" ] && git cat-file -e "$old_ref^{commit}" 2>/dev/null; then
  old_tree="$(mktemp -d)/tree"
  git worktree add -q --detach "$old_tree" "$old_ref"
  (cd "$old_tree" && ./wasm-build.sh "$old_tree/dist" >&2) || echo "filters.sh: building $old_ref failed" >&2
  mkdir -p "$old_out"
  for f in canary model-router failover; do
    [ -f "$old_tree/dist/$f.wasm" ] && cp "$old_tree/dist/$f.wasm" "$old_out/$f.wasm"
  done
  touch "$old_out/$old_ref"
  git worktree remove --force "$old_tree"
fi

cargo build --release -p bench-tools
bench/build-filters.sh

echo "filters.sh: load before start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec python3 bench/envoy/run_filters.py
