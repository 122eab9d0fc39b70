#!/usr/bin/env python3
"""Writes OCI image layouts without a container engine: Wasm filters, as
Istio pulls them, and the inference sidecar's container image.

    oci_image.py LAYOUT_DIR TAG=FILE.wasm [TAG=FILE.wasm ...]
    oci_image.py --sidecar LAYOUT_DIR TAG BINARY [LABEL=VALUE ...]

Each module becomes one image (tag = filter name) in Istio's "compat"
form: an OCI manifest whose single layer is a gzip'd tar holding
`plugin.wasm`. Istio compares WasmPlugin.spec.sha256 with the *manifest*
digest for oci:// URLs; it is printed per tag and written to
LAYOUT_DIR/<tag>.manifest.sha256. Output is byte-reproducible (fixed
mtimes, owners and gzip header), so the digests only change when a module
does. Copy to a registry with e.g. `skopeo copy oci:dist/oci:canary
docker://REGISTRY/infermesh/canary:TAG` or `oras cp`.

--sidecar writes one linux/amd64 image: BINARY (a static executable) as
/usr/local/bin/infermesh-sidecar, /etc/passwd and /etc/group with the
non-root user `nonroot` (65532), /models (the model repository mount
point) and /tmp. It runs as 65532:65532 with the binary as entrypoint; its
defaults are environment variables (INFERMESH_LISTEN=0.0.0.0:8000,
INFERMESH_MODEL_REPOSITORY=/models), so arguments given to the container
add to them instead of replacing them. LABEL=VALUE pairs become the
image's org.opencontainers.image.* labels (e.g. source=URL revision=SHA
version=0.1.0); SOURCE_DATE_EPOCH, if set, is the `created` time (else
the epoch), so the digest depends only on the inputs.
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
import time

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


def layer_tgz(entries):
    """entries: (path, data or None for a directory, mode, uid) in order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for path, data, mode, uid in entries:
            info = tarfile.TarInfo(path)
            info.mtime, info.mode = 0, mode
            info.uid = info.gid = uid
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as g:
        g.write(tar)
    return tar, gz.getvalue()


def image(root, tag, entries, config):
    """Writes one single-layer image; returns its index descriptor."""
    tar, tgz = layer_tgz(entries)
    config = dict(config, architecture="amd64", os="linux")
    config["rootfs"] = {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}
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


def new_layout(root):
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "blobs", "sha256"))
    with open(os.path.join(root, "oci-layout"), "w") as fh:
        json.dump({"imageLayoutVersion": "1.0.0"}, fh)


def write_index(root, manifests):
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    with open(os.path.join(root, "index.json"), "w") as fh:
        json.dump(index, fh, sort_keys=True, separators=(",", ":"))


SIDECAR_UID = 65532
SIDECAR_BIN = "usr/local/bin/infermesh-sidecar"


def sidecar(argv):
    if len(argv) < 3 or any("=" not in a for a in argv[3:]):
        raise SystemExit(__doc__)
    root, tag, binary = argv[0], argv[1], argv[2]
    with open(binary, "rb") as fh:
        exe = fh.read()
    if exe[:4] != b"\x7fELF":
        raise SystemExit("%s is not an ELF executable" % binary)
    if b"ld-linux" in exe[:4096]:
        raise SystemExit("%s is dynamically linked; the image has no libc" % binary)
    u = SIDECAR_UID
    passwd = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n" % (u, u)
    group = b"root:x:0:\nnonroot:x:%d:\n" % u
    entries = [
        ("etc", None, 0o755, 0),
        ("etc/group", group, 0o644, 0),
        ("etc/passwd", passwd, 0o644, 0),
        ("home", None, 0o755, 0),
        ("home/nonroot", None, 0o700, u),
        ("models", None, 0o755, 0),
        ("tmp", None, 0o1777, 0),
        ("usr", None, 0o755, 0),
        ("usr/local", None, 0o755, 0),
        ("usr/local/bin", None, 0o755, 0),
        (SIDECAR_BIN, exe, 0o755, 0),
    ]
    labels = {"org.opencontainers.image.title": "infermesh-sidecar",
              "org.opencontainers.image.description":
                  "infermesh inference sidecar: ONNX models over the Open Inference Protocol v2",
              "org.opencontainers.image.licenses": "Apache-2.0"}
    for kv in argv[3:]:
        k, v = kv.split("=", 1)
        labels["org.opencontainers.image." + k] = v
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    labels["org.opencontainers.image.created"] = created
    config = {
        "created": created,
        "config": {
            "User": "%d:%d" % (u, u),
            "Entrypoint": ["/" + SIDECAR_BIN],
            "Env": ["PATH=/usr/local/bin", "INFERMESH_LISTEN=0.0.0.0:8000",
                    "INFERMESH_MODEL_REPOSITORY=/models"],
            "ExposedPorts": {"8000/tcp": {}},
            "WorkingDir": "/",
            "StopSignal": "SIGTERM",
            "Labels": labels,
        },
        "history": [{"created": created, "created_by": "scripts/oci_image.py --sidecar"}],
    }
    new_layout(root)
    desc = image(root, tag, entries, config)
    desc["annotations"].update({k: v for k, v in labels.items()
                                if k in ("org.opencontainers.image.version",
                                         "org.opencontainers.image.revision")})
    write_index(root, [desc])
    digest = desc["digest"].split(":", 1)[1]
    with open(os.path.join(root, tag + ".manifest.sha256"), "w") as fh:
        fh.write(digest + "\n")
    print("oci %s manifest sha256:%s" % (tag, digest))


def main(argv):
    if len(argv) > 1 and argv[1] == "--sidecar":
        return sidecar(argv[2:])
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        raise SystemExit(__doc__)
    root = argv[1]
    new_layout(root)
    manifests = []
    for spec in argv[2:]:
        tag, path = spec.split("=", 1)
        with open(path, "rb") as fh:
            wasm = fh.read()
        if wasm[:4] != b"\0asm":
            raise SystemExit("%s is not a Wasm module" % path)
        desc = image(root, tag, [("plugin.wasm", wasm, 0o644, 0)],
                     {"config": {"Labels": {"org.opencontainers.image.title": tag}}})
        manifests.append(desc)
        digest = desc["digest"].split(":", 1)[1]
        with open(os.path.join(root, tag + ".manifest.sha256"), "w") as fh:
            fh.write(digest + "\n")
        print("oci %-12s manifest sha256 %s (WasmPlugin.spec.sha256 for oci://)" % (tag, digest))
    write_index(root, manifests)


if __name__ == "__main__":
    main(sys.argv)
