#!/usr/bin/env bash
# Checks the sidecar's container image end to end:
#   1. builds it twice (scripts/sidecar-image.sh) and requires the same
#      manifest digest and identical layouts (the assembly is
#      deterministic; cargo reuses the binary the first build made);
#   2. unpacks it with umoci into an OCI runtime bundle, whose process
#      (entrypoint, environment, user, working directory) umoci takes from
#      the image config unchanged; adds only a read-only bind mount of
#      examples/models at /models and a read-only root filesystem;
#   3. runs it with runc in its own network namespace, checks that it runs
#      as 65532, and from inside that namespace (nsenter) waits for
#      /v2/health/ready on the image's default 0.0.0.0:8000 and sends a
#      digits-mlp infer request whose answer must match reference.json;
#   4. stops it with SIGTERM (clean exit expected).
#
#   scripts/sidecar-image-test.sh [--release]
# Default: the dev-profile binary (CI time); --release checks the image
# that ships. Needs root, runc and umoci (scripts/tools.sh image).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
profile=--debug
[ "${1:-}" = "--release" ] && profile=

# runc rather than crun: Debian 12's crun refuses hosts whose cgroups are
# in v1/v2 hybrid mode; runc runs on v1, hybrid and v2.
runtime="${OCI_RUNTIME:-runc}"
for tool in "$runtime" umoci nsenter; do
  command -v "$tool" >/dev/null || { echo "sidecar-image-test: $tool missing (scripts/tools.sh image)" >&2; exit 1; }
done

work="$(mktemp -d /tmp/infermesh-image-XXXXXX)"
id="infermesh-image-test-$$"
cleanup() {
  $runtime kill "$id" KILL >/dev/null 2>&1 || true
  $runtime delete --force "$id" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Reproducible: two builds, one digest.
scripts/sidecar-image.sh $profile "$work/a" | tee "$work/build-a.txt"
scripts/sidecar-image.sh $profile "$work/b" >"$work/build-b.txt"
a="$(cat "$work/a/sidecar.manifest.sha256")"
b="$(cat "$work/b/sidecar.manifest.sha256")"
[ "$a" = "$b" ] || { echo "FAIL: digests differ: $a vs $b" >&2; exit 1; }
diff -r "$work/a" "$work/b" >/dev/null || { echo "FAIL: layouts differ" >&2; exit 1; }
echo "ok    reproducible: both builds sha256:$a"

# 2. Unpack into a runtime bundle as the image config says.
umoci unpack --image "$work/a:sidecar" "$work/bundle" >/dev/null
python3 - "$work/bundle/config.json" "$root/examples/models" <<'EOF'
import json, sys
path, models = sys.argv[1], sys.argv[2]
cfg = json.load(open(path))
p = cfg["process"]
assert p["args"] == ["/usr/local/bin/infermesh-sidecar"], p["args"]
assert "INFERMESH_LISTEN=0.0.0.0:8000" in p["env"], p["env"]
assert (p["user"]["uid"], p["user"]["gid"]) == (65532, 65532), p["user"]
p["terminal"] = False
cfg["root"]["readonly"] = True
cfg["mounts"].append({"destination": "/models", "type": "bind", "source": models,
                      "options": ["rbind", "ro"]})
json.dump(cfg, open(path, "w"), indent=1)
print("ok    bundle: entrypoint, env and user 65532:65532 from the image config")
EOF

# 3. Run it and serve a model.
$runtime run --bundle "$work/bundle" "$id" >"$work/sidecar.log" 2>&1 &
runner=$!
pid=""
for _ in $(seq 1 100); do
  pid="$($runtime state "$id" 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["pid"] if s["status"]=="running" else "")' 2>/dev/null || true)"
  [ -n "$pid" ] && break
  kill -0 "$runner" 2>/dev/null || break
  sleep 0.1
done
[ -n "$pid" ] || { echo "FAIL: container did not start" >&2; cat "$work/sidecar.log" >&2; exit 1; }
uid="$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
[ "$uid" = 65532 ] || { echo "FAIL: runs as uid $uid" >&2; exit 1; }
echo "ok    running as uid $uid (pid $pid)"

nsenter --net="/proc/$pid/ns/net" python3 - "$root/examples/models/digits-mlp/2/reference.json" <<'EOF'
import json, sys, time, urllib.request
ref = json.load(open(sys.argv[1]))
base = "http://127.0.0.1:8000"
deadline = time.time() + 60
while True:
    try:
        with urllib.request.urlopen(base + "/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("FAIL: not ready within 60 s")
    time.sleep(0.2)
case = ref["cases"][0]
body = {"inputs": [dict(name=k, **v) for k, v in case["inputs"].items()]}
req = urllib.request.Request(base + "/v2/models/digits-mlp/versions/2/infer",
                             data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    out = {o["name"]: o for o in json.load(r)["outputs"]}
atol, rtol = ref["tolerance"]["atol"], ref["tolerance"]["rtol"]
for name, want in case["outputs"].items():
    got = out[name]["data"]
    assert len(got) == len(want["data"]), name
    for g, w in zip(got, want["data"]):
        assert abs(g - w) <= atol + rtol * abs(w), (name, g, w)
print("ok    digits-mlp v2 infer from the image: label %s, matches reference.json" % out["label"]["data"])
EOF

# 4. SIGTERM drains and exits 0.
$runtime kill "$id" TERM
code=0
wait "$runner" || code=$?
[ "$code" = 0 ] || { echo "FAIL: exit $code after SIGTERM" >&2; cat "$work/sidecar.log" >&2; exit 1; }
echo "ok    clean exit on SIGTERM"
