#!/usr/bin/env bash
# Builds the inference sidecar's container image without a container
# engine: a static (musl) infermesh-sidecar, stripped, in an OCI image
# layout (scripts/oci_image.py --sidecar), and prints its size and digest.
#
#   scripts/sidecar-image.sh [--debug] [OUT_DIR]     (default: dist/sidecar-oci)
#
# --debug builds with the dev profile (what CI's image test uses: the
# release build of tract for a second target takes many minutes on 2 cores).
# Push with e.g. `skopeo copy oci:dist/sidecar-oci:sidecar
# docker://REGISTRY/infermesh/sidecar:0.1.0`. The digest depends only on the
# binary and the labels (revision, version; created = the commit's time),
# so rebuilding the same commit gives the same digest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target=x86_64-unknown-linux-musl
profile=release
if [ "${1:-}" = "--debug" ]; then profile=dev; shift; fi
out="${1:-$root/dist/sidecar-oci}"

# musl's target is statically linked by default (crt-static). tools.sh
# installs the rustup target and musl-gcc, with which tract-linalg
# assembles its x86_64 kernels (cc-rs looks for it on this target).
scripts/tools.sh image >&2
cargo build --locked --target "$target" --profile "$profile" -p sidecar --bin infermesh-sidecar
dir=$([ "$profile" = dev ] && echo debug || echo release)
bin="target/$target/$dir/infermesh-sidecar"
staged="target/$target/$dir/infermesh-sidecar.image"
# Symbols and debug info are of no use in the image; strip is deterministic.
strip -o "$staged" "$bin" 2>/dev/null || cp "$bin" "$staged"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain 2>/dev/null)" ] || revision="$revision-dirty"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
python3 scripts/oci_image.py --sidecar "$out" sidecar "$staged" \
  "source=${INFERMESH_SOURCE_URL:-https://github.com/infermesh/infermesh}" \
  "revision=$revision" "version=$version"
layer="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]+"/index.json")); print(d["manifests"][0]["digest"])' "$out")"
size="$(du -sb "$out/blobs" | cut -f1)"
printf 'sidecar image: %s (%s profile), binary %s bytes, layout %s bytes, manifest %s\n' \
  "$out" "$profile" "$(stat -c %s "$staged")" "$size" "$layer"
