"""KServe's Python client (kserve.InferenceRESTClient, OIP v2 over REST) as
a real client of infermesh-sidecar, next to tritonclient. It sends
`model_name` (and a generated `id`) in the request body and reads the
response with orjson.

    scripts/tools.sh kserve
    SIDECAR_BIN=target/debug/infermesh-sidecar .tools/venv-kserve/bin/pytest sidecar/tests/client/test_kserve.py
"""

import asyncio

import httpx
import numpy as np
import pytest
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

from conftest import reference

# The KServe client names no version: the sidecar serves the latest (2).
NAMES = ["digits-mlp", "tiny-cnn", "digits-forest", "wine-forest"]


def infer(addr, model, request):
    async def go():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            return await client.infer(f"http://{addr}", request, model_name=model)
        finally:
            await client.close()

    return asyncio.run(go())


def check(response, case, tol, what):
    got_names = {o.name for o in response.outputs}
    assert got_names == set(case["outputs"]), what
    for out in response.outputs:
        want = case["outputs"][out.name]
        got = out.as_numpy()
        assert list(got.shape) == want["shape"], f"{what}: {out.name} shape"
        exp = np.array(want["data"]).reshape(want["shape"])
        if want["datatype"] == "FP32":
            np.testing.assert_allclose(got, exp, atol=tol["atol"], rtol=tol["rtol"], err_msg=what)
        else:
            np.testing.assert_array_equal(got, exp.astype(got.dtype), err_msg=what)


def request_for(model, case, binary):
    inputs = []
    for name, t in case["inputs"].items():
        arr = np.array(t["data"], dtype=np.float32).reshape(t["shape"])
        inp = InferInput(name=name, shape=t["shape"], datatype=t["datatype"])
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    outputs = [RequestedOutput(n, parameters={"binary_data": binary}) for n in case["outputs"]]
    return InferRequest(model_name=model, infer_inputs=inputs, request_id="k-1", request_outputs=outputs)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", NAMES)
def test_infer_matches_reference(sidecar_addr, model, binary):
    ref = reference(model, "2")
    for case in ref["cases"]:
        has_nan = any("NaN" in t["data"] for t in case["inputs"].values())
        if has_nan and not binary:
            # orjson writes NaN as null, which is not a number: the KServe
            # client sends missing values as binary tensors only.
            continue
        req = request_for(model, case, binary)
        body, _ = req.to_rest()
        assert isinstance(body, bytes) or body["model_name"] == model
        resp = infer(sidecar_addr, model, req)
        assert resp.id == "k-1"
        assert resp.model_name == model
        check(resp, case, ref["tolerance"], f"{model} {case['name']} binary={binary}")


def test_errors_surface_as_http_errors(sidecar_addr):
    inp = InferInput(name="input", shape=[1, 783], datatype="FP32")
    inp.set_data_from_numpy(np.zeros((1, 783), dtype=np.float32), binary_data=False)
    req = InferRequest(model_name="digits-mlp", infer_inputs=[inp])
    with pytest.raises(httpx.HTTPStatusError) as err:
        infer(sidecar_addr, "digits-mlp", req)
    assert err.value.response.status_code == 400
    assert "783" in err.value.response.json()["error"]
