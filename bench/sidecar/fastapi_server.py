"""A minimal OIP v2 (KServe v2 REST) server in FastAPI + onnxruntime: what a
team typically writes around an ONNX file. JSON tensors only.

  GET  /v2/health/live, /v2/health/ready, /v2/models/{m}, /v2/models/{m}/ready
  POST /v2/models/{m}/infer   (and /v2/models/{m}/versions/{v}/infer)

The newest version directory of every model under the repository is
loaded. Run with one uvicorn worker (one process, like the sidecar):

  python fastapi_server.py --model-repository DIR --port 8000
"""
import argparse
import os
from typing import Any, Optional

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
ORT_TO_OIP = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16",
    "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL",
}


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Optional[dict[str, Any]] = None
    data: list[Any]


class RequestOutput(BaseModel):
    name: str
    parameters: Optional[dict[str, Any]] = None


class InferenceRequest(BaseModel):
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[RequestInput]
    outputs: Optional[list[RequestOutput]] = None


def load_models(repo: str, threads: int) -> dict[str, tuple[str, ort.InferenceSession]]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    models = {}
    for name in sorted(os.listdir(repo)):
        path = os.path.join(repo, name)
        versions = [v for v in os.listdir(path) if v.isdigit()] if os.path.isdir(path) else []
        if not versions:
            continue
        version = max(versions, key=int)
        onnx = os.path.join(path, version, "model.onnx")
        models[name] = (version, ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"]))
    return models


def make_app(models: dict[str, tuple[str, ort.InferenceSession]]) -> FastAPI:
    app = FastAPI()

    def get(model: str, version: Optional[str] = None) -> tuple[str, ort.InferenceSession]:
        if model not in models or (version is not None and version != models[model][0]):
            raise HTTPException(status_code=404, detail=f"model {model} not found")
        return models[model]

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2/models/{model}")
    async def metadata(model: str):
        version, sess = get(model)
        return {
            "name": model, "versions": [version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": i.name, "datatype": ORT_TO_OIP.get(i.type, i.type),
                        "shape": [d if isinstance(d, int) else -1 for d in i.shape]}
                       for i in sess.get_inputs()],
            "outputs": [{"name": o.name, "datatype": ORT_TO_OIP.get(o.type, o.type),
                         "shape": [d if isinstance(d, int) else -1 for d in o.shape]}
                        for o in sess.get_outputs()],
        }

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        version, _ = get(model)
        return {"name": model, "version": version, "ready": True}

    def run(model: str, version: Optional[str], req: InferenceRequest) -> dict:
        version, sess = get(model, version)
        feeds = {}
        for inp in req.inputs:
            dtype = DTYPES.get(inp.datatype)
            if dtype is None:
                raise HTTPException(status_code=400, detail=f"unsupported datatype {inp.datatype}")
            try:
                feeds[inp.name] = np.asarray(inp.data, dtype=dtype).reshape(inp.shape)
            except ValueError as e:
                raise HTTPException(status_code=400, detail=f"input {inp.name}: {e}")
        names = [o.name for o in req.outputs] if req.outputs else [o.name for o in sess.get_outputs()]
        try:
            results = sess.run(names, feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise HTTPException(status_code=400, detail=str(e))
        outputs = []
        for name, arr in zip(names, results):
            outputs.append({
                "name": name,
                "datatype": ORT_TO_OIP.get(f"tensor({_ort_name(arr.dtype)})", "BYTES"),
                "shape": list(arr.shape),
                "data": arr.flatten().tolist(),
            })
        resp = {"model_name": model, "model_version": version, "outputs": outputs}
        if req.id is not None:
            resp["id"] = req.id
        return resp

    # async: the model is small, so it runs on the event loop (no thread
    # pool hop), which is the faster choice for this baseline.
    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, req: InferenceRequest):
        return run(model, None, req)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, req: InferenceRequest):
        return run(model, version, req)

    return app


def _ort_name(dtype: np.dtype) -> str:
    return {"float32": "float", "float64": "double", "float16": "float16"}.get(dtype.name, dtype.name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-repository", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = p.parse_args()
    app = make_app(load_models(args.model_repository, args.threads))
    uvicorn.run(app, host=args.host, port=args.port, workers=1, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
