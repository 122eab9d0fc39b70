"""tritonclient (HTTP) as a real client of infermesh-sidecar.

Starts the binary named by SIDECAR_BIN on 127.0.0.1 with an ephemeral port
against examples/models and checks health, metadata, and inference with
JSON and binary tensors against reference.json.

    scripts/tools.sh client
    SIDECAR_BIN=target/sidecar/debug/infermesh-sidecar .tools/venv/bin/pytest sidecar/tests/client
"""

import json
import os
import pathlib
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODELS = ROOT / "examples" / "models"
NAMES = ["digits-mlp", "tiny-cnn", "digits-forest"]


@pytest.fixture(scope="module")
def server():
    binary = os.environ.get("SIDECAR_BIN")
    if not binary:
        pytest.fail("set SIDECAR_BIN to the infermesh-sidecar binary")
    proc = subprocess.Popen(
        [binary, "--model-repository", str(MODELS), "--listen", "127.0.0.1:0", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    addr = None
    deadline = time.time() + 30
    while addr is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("message") == "listening":
            addr = rec["addr"]
    if addr is None:
        proc.kill()
        pytest.fail("sidecar did not report its address")
    # Keep draining stderr so the child never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    client = httpclient.InferenceServerClient(url=addr)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if client.is_server_ready():
                break
        except Exception:
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("sidecar never became ready")
    yield client
    client.close()
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def reference(model, version):
    return json.loads((MODELS / model / version / "reference.json").read_text())


def check(result, case, tol, what):
    for name, want in case["outputs"].items():
        got = result.as_numpy(name)
        assert got is not None, f"{what}: no output {name}"
        assert list(got.shape) == want["shape"], f"{what}: {name} shape"
        exp = np.array(want["data"]).reshape(want["shape"])
        if want["datatype"] == "INT64":
            np.testing.assert_array_equal(got, exp, err_msg=what)
        else:
            np.testing.assert_allclose(got, exp, atol=tol["atol"], rtol=tol["rtol"], err_msg=what)


def test_health_and_metadata(server):
    assert server.is_server_live()
    assert server.is_server_ready()
    meta = server.get_server_metadata()
    assert meta["name"] == "infermesh-sidecar"
    assert "binary_tensor_data" in meta["extensions"]
    for name in NAMES:
        assert server.is_model_ready(name)
        assert server.is_model_ready(name, "1")
        m = server.get_model_metadata(name)
        assert m["versions"] == ["1", "2"]
        assert m["inputs"][0]["name"] == "input"
        assert m["inputs"][0]["datatype"] == "FP32"
    assert not server.is_model_ready("no-such-model")
    # Every version on disk is served (the example configs keep the latest
    # two, and every example model has exactly versions 1 and 2).
    on_disk = {
        (m.name, v.name)
        for m in MODELS.iterdir()
        if (m / "config.json").is_file()
        for v in m.iterdir()
        if (v / "model.onnx").is_file()
    }
    index = server.get_model_repository_index()
    ready = {(e["name"], e["version"]) for e in index if e["state"] == "READY"}
    assert ready == on_disk, sorted(on_disk ^ ready)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("model", NAMES)
def test_infer_matches_reference(server, model, version, binary):
    ref = reference(model, version)
    for case in ref["cases"]:
        inputs = []
        for name, t in case["inputs"].items():
            arr = np.array(t["data"], dtype=np.float32).reshape(t["shape"])
            inp = httpclient.InferInput(name, t["shape"], t["datatype"])
            inp.set_data_from_numpy(arr, binary_data=binary)
            inputs.append(inp)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in case["outputs"]]
        result = server.infer(model, inputs, model_version=version, outputs=outputs, request_id="t-1")
        resp = result.get_response()
        assert resp["model_version"] == version
        assert resp["id"] == "t-1"
        check(result, case, ref["tolerance"], f"{model}@{version} {case['name']} binary={binary}")


def test_unversioned_goes_to_latest_and_versions_differ(server):
    ref1, ref2 = reference("digits-mlp", "1"), reference("digits-mlp", "2")
    case = ref2["cases"][-1]
    t = case["inputs"]["input"]
    inp = httpclient.InferInput("input", t["shape"], "FP32")
    inp.set_data_from_numpy(np.array(t["data"], dtype=np.float32).reshape(t["shape"]))
    result = server.infer("digits-mlp", [inp])
    assert result.get_response()["model_version"] == "2"
    check(result, case, ref2["tolerance"], "unversioned")
    assert ref1["cases"][-1]["outputs"]["probabilities"]["data"] != case["outputs"]["probabilities"]["data"]


def test_errors_surface_as_exceptions(server):
    inp = httpclient.InferInput("input", [1, 783], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 783), dtype=np.float32))
    with pytest.raises(Exception) as err:
        server.infer("digits-mlp", [inp])
    assert "783" in str(err.value)
