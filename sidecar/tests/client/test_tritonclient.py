"""tritonclient (HTTP) as a real client of infermesh-sidecar.

Against the sidecar started by conftest.py (SIDECAR_BIN, examples/models):
health, metadata, and inference with JSON and binary tensors against
reference.json.

    scripts/tools.sh client
    SIDECAR_BIN=target/debug/infermesh-sidecar .tools/venv/bin/pytest sidecar/tests/client/test_tritonclient.py
"""

import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import MODELS, reference

NAMES = ["digits-mlp", "tiny-cnn", "digits-forest"]


@pytest.fixture(scope="module")
def server(sidecar_addr):
    client = httpclient.InferenceServerClient(url=sidecar_addr)
    yield client
    client.close()


def check(result, case, tol, what):
    for name, want in case["outputs"].items():
        got = result.as_numpy(name)
        assert got is not None, f"{what}: no output {name}"
        assert list(got.shape) == want["shape"], f"{what}: {name} shape"
        exp = np.array(want["data"]).reshape(want["shape"])
        if want["datatype"] == "BYTES":
            assert [x.decode() if isinstance(x, bytes) else x for x in got.flatten()] == list(exp.flatten()), what
        elif want["datatype"] == "INT64":
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


def test_missing_values_travel_as_json_nan(server):
    """tritonclient writes NaN into JSON bodies as the bare literal, as
    Triton reads it; a tree model's missing features go through that way."""
    ref = reference("wine-forest", "1")
    cases = [c for c in ref["cases"] if "NaN" in c["inputs"]["input"]["data"]]
    assert cases, "the reference has a case with missing values"
    for case in cases:
        t = case["inputs"]["input"]
        arr = np.array(t["data"], dtype=np.float32).reshape(t["shape"])
        assert np.isnan(arr).any()
        inp = httpclient.InferInput("input", t["shape"], "FP32")
        inp.set_data_from_numpy(arr, binary_data=False)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in case["outputs"]]
        result = server.infer("wine-forest", [inp], model_version="1", outputs=outputs)
        check(result, case, ref["tolerance"], f"wine-forest {case['name']} JSON NaN")
