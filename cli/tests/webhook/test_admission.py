"""The injector's webhook as the API server uses it, checked independently.

Starts `infermesh inject serve` (INFERMESH_BIN) on 127.0.0.1 with a
certificate made here by the openssl CLI, sends AdmissionReviews for the
Deployment in examples/k8s/digits-mlp.yaml, the Pod its ReplicaSet would
create, and that Pod after Istio's injector, in the native-sidecar and the
plain-container form. Each JSON Patch is applied with the `jsonpatch`
package (not the injector's code); the result must equal what
`infermesh inject -f` writes for the same input, and the Pods must pass
shared/schemas/validate.py for Kubernetes 1.29, 1.33 and 1.37.

    scripts/tools.sh manifests inject
    INFERMESH_BIN=target/debug/infermesh .tools/venv/bin/pytest cli/tests/webhook
"""

import base64
import copy
import http.client
import json
import os
import pathlib
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import jsonpatch
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
VALIDATE = pathlib.Path(os.environ.get("VALIDATE_PY", ROOT.parent / "shared" / "schemas" / "validate.py"))
K8S_VERSIONS = ["1.29", "1.33", "1.37"]
SIDECAR = "infermesh-sidecar"
# The injected Pods and workloads of the parametrized test, validated
# together by the test after it.
RESULTS = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-inject-"))


def binary():
    b = os.environ.get("INFERMESH_BIN")
    if not b:
        pytest.fail("set INFERMESH_BIN to the infermesh binary")
    return b


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt")],
        check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def webhook(certs):
    proc = subprocess.Popen(
        [binary(), "inject", "serve", "--tls-cert", str(certs / "tls.crt"),
         "--tls-key", str(certs / "tls.key"), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True)
    addr = None
    deadline = time.time() + 30
    while addr is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if "listening on https://" in line:
            addr = line.strip().rsplit("https://", 1)[1]
    if addr is None:
        proc.kill()
        pytest.fail("webhook did not report its address")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    ctx = ssl.create_default_context(cafile=str(certs / "tls.crt"))
    host, port = addr.rsplit(":", 1)
    yield lambda: http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def review(conn_factory, obj, path="/inject", uid="3d2f0c1e-0000-4000-8000-000000000001"):
    body = json.dumps({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": obj["kind"]},
            "operation": "CREATE",
            "namespace": obj["metadata"].get("namespace", "models"),
            "object": obj,
        },
    })
    conn = conn_factory()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    assert r.status == 200, data
    out = json.loads(data)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == uid
    return out["response"]


def offline(obj, tmp_path):
    f = tmp_path / "in.json"
    f.write_text(json.dumps(obj))
    r = subprocess.run([binary(), "inject", "-f", str(f), "-o", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def deployment():
    docs = list(yaml.safe_load_all((ROOT / "examples" / "k8s" / "digits-mlp.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Deployment")


def pod_of(workload):
    """The Pod a controller makes from a workload's template."""
    tpl = copy.deepcopy(workload["spec"]["template"])
    meta = tpl.get("metadata", {})
    meta["generateName"] = workload["metadata"]["name"] + "-7d9c5b6f4-"
    meta["namespace"] = workload["metadata"]["namespace"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}


def with_mode(obj, mode):
    obj = copy.deepcopy(obj)
    meta = obj["spec"]["template"]["metadata"] if obj["kind"] != "Pod" else obj["metadata"]
    meta.setdefault("annotations", {})["infermesh.io/sidecar-mode"] = mode
    return obj


def istio_injected(pod):
    """The Pod after Istio's own injector ran first (its init container and
    proxy, trimmed to the fields that matter here)."""
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("annotations", {})["sidecar.istio.io/status"] = \
        '{"initContainers":["istio-init"],"containers":["istio-proxy"]}'
    pod["spec"]["initContainers"] = [{
        "name": "istio-init", "image": "docker.io/istio/proxyv2:1.30.0",
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                 "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                            "runAsUser": 0, "runAsNonRoot": False}}]
    pod["spec"]["containers"].append({
        "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.0",
        "args": ["proxy", "sidecar"],
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True}})
    return pod


def containers_of(pod):
    spec = pod["spec"]
    return [c["name"] for c in spec.get("initContainers", [])], [c["name"] for c in spec["containers"]]


CASES = [
    ("deployment", lambda: deployment()),
    ("pod", lambda: pod_of(deployment())),
    ("pod-after-istio", lambda: istio_injected(pod_of(deployment()))),
]


@pytest.mark.parametrize("mode", ["native", "container"])
@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_patch_gives_a_valid_pod_equal_to_offline(webhook, tmp_path, name, make, mode):
    obj = make()
    if obj["kind"] == "Pod":
        obj["metadata"].setdefault("annotations", {})["infermesh.io/sidecar-mode"] = mode
    else:
        obj = with_mode(obj, mode)
    resp = review(webhook, obj)
    assert resp["allowed"] is True
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    patched = jsonpatch.apply_patch(obj, ops)

    # One code path: the offline mode writes the same object.
    assert offline(obj, tmp_path) == patched

    pod = patched if patched["kind"] == "Pod" else pod_of(patched)
    inits, apps = containers_of(pod)
    before_inits, before_apps = containers_of(obj if obj["kind"] == "Pod" else pod_of(obj))
    if mode == "native":
        assert inits == before_inits + [SIDECAR] and apps == before_apps
        sc = pod["spec"]["initContainers"][-1]
        assert sc["restartPolicy"] == "Always"
    else:
        assert apps == before_apps + [SIDECAR] and inits == before_inits
        sc = pod["spec"]["containers"][-1]
        assert "restartPolicy" not in sc
    assert sc["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert sc["args"][-2:] == ["--instances", "2"]
    assert sc["resources"]["requests"]["memory"] == "256Mi"
    status = json.loads(pod["metadata"]["annotations"]["infermesh.io/status"])
    assert status["mode"] == mode
    if name == "pod-after-istio":
        assert "istio-proxy" in apps and "istio-init" in inits

    # A second pass (reinvocation) changes nothing.
    again = review(webhook, pod, uid="second")
    assert again["allowed"] is True and "patch" not in again

    # Schema-checked once for all cases below (validate.py is slow to start).
    (RESULTS / ("%s-%s-pod.yaml" % (name, mode))).write_text(yaml.safe_dump(pod))
    if patched["kind"] != "Pod":
        (RESULTS / ("%s-%s.yaml" % (name, mode))).write_text(yaml.safe_dump(patched))


def validate(path, version):
    # Core kinds only: the Istio CRDs and their CEL rules are not needed.
    return subprocess.run([sys.executable, str(VALIDATE), "--no-default-crds", "--no-cel",
                           "--k8s-version", version, str(path)], capture_output=True, text=True)


def test_injected_pods_validate_on_three_kubernetes_versions():
    files = sorted(p.name for p in RESULTS.iterdir())
    assert len(files) == 2 * len(CASES) + 2, files  # every case ran first
    for v in K8S_VERSIONS:
        r = validate(RESULTS, v)
        assert r.returncode == 0, "k8s %s:\n%s%s" % (v, r.stdout, r.stderr)
        assert "validate: %d passed, 0 failed, 0 skipped" % len(files) in r.stdout, r.stdout


def test_schema_check_catches_a_broken_pod(tmp_path):
    """The validator used above does reject a bad Pod (a test that cannot
    fail proves nothing)."""
    pod = pod_of(deployment())
    pod["spec"]["initContainers"] = [{"name": SIDECAR, "image": "x", "restartPolicy": "Always",
                                      "startupProbe": {"httpGet": {"path": "/", "port": "x" * 70}},
                                      "bogusField": 1}]
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    r = validate(tmp_path, "1.33")
    assert r.returncode == 1, r.stdout
    assert "bogusField" in r.stdout, r.stdout


def test_opt_outs_and_excluded_namespaces_get_no_patch(webhook):
    pod = pod_of(deployment())
    out = copy.deepcopy(pod)
    out["metadata"]["labels"]["infermesh.io/inject"] = "false"
    plain = copy.deepcopy(pod)
    del plain["metadata"]["labels"]["infermesh.io/inject"]
    system = copy.deepcopy(pod)
    system["metadata"]["namespace"] = "kube-system"
    for obj, path in [(out, "/inject/namespace"), (plain, "/inject"), (system, "/inject/namespace")]:
        resp = review(webhook, obj, path=path)
        assert resp["allowed"] is True and "patch" not in resp, resp
    resp = review(webhook, plain, path="/inject/namespace")
    assert "patch" in resp
