#!/usr/bin/env python3
"""Writes an OCI image layout holding Wasm filters, as Istio pulls them.

    oci_image.py LAYOUT_DIR TAG=FILE.wasm [TAG=FILE.wasm ...]

Each module becomes one image (tag = filter name) in Istio's "compat"
form: an OCI manifest whose single layer is a gzip'd tar holding
`plugin.wasm`. Istio compares WasmPlugin.spec.sha256 with the *manifest*
digest for oci:// URLs; it is printed per tag and written to
LAYOUT_DIR/<tag>.manifest.sha256. Output is byte-reproducible (fixed
mtimes, owners and gzip header), so the digests only change when a module
does. Copy to a registry with e.g. `skopeo copy oci:dist/oci:canary
docker://REGISTRY/infermesh/canary:TAG` or `oras cp`.
Standard library only.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def blob(root, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(root, "blobs", "sha256", digest)
    with open(path, "wb") as fh:
        fh.write(data)
    return "sha256:" + digest


def layer_tgz(wasm):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mtime, info.mode = len(wasm), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tf.addfile(info, io.BytesIO(wasm))
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as g:
        g.write(tar)
    return tar, gz.getvalue()


def image(root, tag, wasm):
    tar, tgz = layer_tgz(wasm)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"org.opencontainers.image.title": tag}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blob(root, cfg), "size": len(cfg)},
        "layers": [{"mediaType": OCI_LAYER, "digest": blob(root, tgz), "size": len(tgz)}],
    }
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return {
        "mediaType": OCI_MANIFEST,
        "digest": blob(root, raw),
        "size": len(raw),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }


def main(argv):
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        raise SystemExit(__doc__)
    root = argv[1]
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "blobs", "sha256"))
    with open(os.path.join(root, "oci-layout"), "w") as fh:
        json.dump({"imageLayoutVersion": "1.0.0"}, fh)
    manifests = []
    for spec in argv[2:]:
        tag, path = spec.split("=", 1)
        with open(path, "rb") as fh:
            wasm = fh.read()
        if wasm[:4] != b"\0asm":
            raise SystemExit("%s is not a Wasm module" % path)
        desc = image(root, tag, wasm)
        manifests.append(desc)
        digest = desc["digest"].split(":", 1)[1]
        with open(os.path.join(root, tag + ".manifest.sha256"), "w") as fh:
            fh.write(digest + "\n")
        print("oci %-12s manifest sha256 %s (WasmPlugin.spec.sha256 for oci://)" % (tag, digest))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    with open(os.path.join(root, "index.json"), "w") as fh:
        json.dump(index, fh, sort_keys=True, separators=(",", ":"))


if __name__ == "__main__":
    main(sys.argv)
