"""Every example model and version against onnxruntime at batch 1, 4 and 32,
JSON and binary tensors, through tritonclient: the sidecar's outputs must
stay within the tolerance in each model's reference.json (labels exact).
Inputs are seeded random float32; tree models also get missing values
(NaN), which travel as the bare JSON literal.

    scripts/tools.sh client
    SIDECAR_BIN=target/debug/infermesh-sidecar .tools/venv/bin/pytest sidecar/tests/client/test_batches.py
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from conftest import MODELS, reference

MODEL_NAMES = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="module")
def server(sidecar_addr):
    client = httpclient.InferenceServerClient(url=sidecar_addr)
    yield client
    client.close()


def onnxruntime_outputs(path, input_name, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {input_name: x})))


def as_array(value, classes):
    """onnxruntime's ZipMap output (a list of {class: p} maps) as the
    [rows, classes] tensor the sidecar serves, columns in label order."""
    if isinstance(value, list):
        def get(row, c):
            return row[c] if c in row else row[int(c)]

        return np.array([[get(row, c) for c in classes] for row in value], dtype=np.float32)
    return value


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 4, 32])
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_outputs_match_onnxruntime(server, model, batch, binary):
    config = json.loads((MODELS / model / "config.json").read_text())
    meta = server.get_model_metadata(model)
    inp = meta["inputs"][0]
    features = inp["shape"][1:]
    is_tree = any(w in model for w in ("forest", "gbt"))
    for version in meta["versions"]:
        tol = reference(model, version)["tolerance"]
        rng = np.random.default_rng(batch * 100 + int(version))
        x = rng.random([batch, *features], dtype=np.float32)
        if is_tree:
            # Scale to the data's range loosely and knock out a few values.
            x = (x * 4 - 2).astype(np.float32)
            x[rng.random(x.shape) < 0.1] = np.nan
        want = onnxruntime_outputs(MODELS / model / version / "model.onnx", inp["name"], x)
        t = httpclient.InferInput(inp["name"], list(x.shape), "FP32")
        t.set_data_from_numpy(x, binary_data=binary)
        outs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
        result = server.infer(model, [t], model_version=version, outputs=outs)
        what = f"{model}@{version} batch {batch} binary={binary}"
        for o in meta["outputs"]:
            got = result.as_numpy(o["name"])
            assert got is not None and got.shape[0] == batch, what
            exp = want[o["name"]]
            if o["datatype"] == "FP32":
                exp = as_array(exp, config.get("labels", {}).get(o["name"]))
                np.testing.assert_allclose(got, exp, atol=tol["atol"], rtol=tol["rtol"], err_msg=what)
            elif o["datatype"] == "BYTES":
                got = [v.decode() if isinstance(v, bytes) else v for v in got.flatten()]
                assert got == [str(v) for v in np.asarray(exp).flatten()], what
            else:
                np.testing.assert_array_equal(got, np.asarray(exp).reshape(got.shape), err_msg=what)
