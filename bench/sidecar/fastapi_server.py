"""A minimal OIP v2 (KServe v2 REST) server in FastAPI + onnxruntime: what a
team typically writes around an ONNX file, tuned: the request body is
validated by pydantic-core straight from bytes, and tensors may come and go
as JSON or in Triton's binary tensor extension (an
`Inference-Header-Content-Length` header; raw little-endian data after the
JSON header), which tritonclient and perf_analyzer speak.

  GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}, /v2/models/{m}/ready
  GET  /v2/models/{m}/config  (the Triton model configuration perf_analyzer reads)
  POST /v2/models/{m}/infer   (and /v2/models/{m}/versions/{v}/infer)

The newest version directory of every model under the repository is
loaded. Run with one uvicorn worker (one process, like the sidecar):

  python fastapi_server.py --model-repository DIR --port 8000
"""
import argparse
import json
import os
from typing import Any, Optional

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ValidationError

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
    # Absent when the tensor is binary (parameters.binary_data_size).
    data: Optional[list[Any]] = None


class RequestOutput(BaseModel):
    name: str
    parameters: Optional[dict[str, Any]] = None


class InferenceRequest(BaseModel):
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[RequestInput]
    outputs: Optional[list[RequestOutput]] = None


def load_models(repo: str, threads: int) -> dict[str, tuple[str, ort.InferenceSession, int]]:
    """name -> (newest version, session, max_batch_size from config.json)."""
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
        try:
            with open(os.path.join(path, "config.json")) as f:
                max_batch = int(json.load(f).get("max_batch_size", 0))
        except FileNotFoundError:
            max_batch = 0
        models[name] = (version, ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"]),
                        max_batch)
    return models


def make_app(models: dict[str, tuple[str, ort.InferenceSession, int]]) -> FastAPI:
    app = FastAPI()

    def get(model: str, version: Optional[str] = None) -> tuple[str, ort.InferenceSession]:
        if model not in models or (version is not None and version != models[model][0]):
            raise HTTPException(status_code=404, detail=f"model {model} not found")
        return models[model][:2]

    @app.get("/v2")
    async def server_metadata():
        return {"name": "fastapi-onnxruntime", "version": ort.__version__,
                "extensions": ["binary_tensor_data"]}

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

    @app.get("/v2/models/{model}/config")
    async def model_config(model: str):
        # What perf_analyzer reads; dims leave out the batch dimension
        # when the model batches (its -b sets it).
        _, sess = get(model)
        max_batch = models[model][2]

        def dims(shape):
            return [d if isinstance(d, int) else -1 for d in shape][1 if max_batch > 0 else 0:]
        return {
            "name": model, "platform": "onnxruntime_onnx", "max_batch_size": max_batch,
            "input": [{"name": i.name, "data_type": "TYPE_" + ORT_TO_OIP.get(i.type, i.type),
                       "dims": dims(i.shape)} for i in sess.get_inputs()],
            "output": [{"name": o.name, "data_type": "TYPE_" + ORT_TO_OIP.get(o.type, o.type),
                        "dims": dims(o.shape)} for o in sess.get_outputs()],
        }

    def parse(body: bytes, header_len: Optional[str]) -> tuple[InferenceRequest, dict]:
        """The request and its input arrays, from JSON or binary tensors."""
        if header_len is None:
            head, blob = body, b""
        else:
            try:
                n = int(header_len)
            except ValueError:
                n = -1
            if not 0 <= n <= len(body):
                raise HTTPException(status_code=400,
                                    detail=f"Inference-Header-Content-Length {header_len!r} "
                                           f"does not fit the {len(body)}-byte body")
            head, blob = body[:n], body[n:]
        try:
            req = InferenceRequest.model_validate_json(head)
        except ValidationError as e:
            raise HTTPException(status_code=422, detail=e.errors(include_url=False))
        feeds, offset = {}, 0
        for inp in req.inputs:
            dtype = DTYPES.get(inp.datatype)
            if dtype is None:
                raise HTTPException(status_code=400, detail=f"unsupported datatype {inp.datatype}")
            size = (inp.parameters or {}).get("binary_data_size")
            try:
                if size is not None:
                    if not isinstance(size, int) or size < 0 or offset + size > len(blob):
                        raise ValueError(f"binary_data_size {size!r} overruns the body")
                    arr = np.frombuffer(blob, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                        offset=offset)
                    offset += size
                elif inp.data is not None:
                    arr = np.asarray(inp.data, dtype=dtype)
                else:
                    raise ValueError("no data and no binary_data_size")
                feeds[inp.name] = arr.reshape(inp.shape)
            except ValueError as e:
                raise HTTPException(status_code=400, detail=f"input {inp.name}: {e}")
        if offset != len(blob):
            raise HTTPException(status_code=400,
                                detail=f"{len(blob) - offset} bytes of binary data left over")
        return req, feeds

    async def run(model: str, version: Optional[str], request: Request):
        version, sess = get(model, version)
        req, feeds = parse(await request.body(),
                           request.headers.get("inference-header-content-length"))
        names = [o.name for o in req.outputs] if req.outputs else [o.name for o in sess.get_outputs()]
        binary_all = bool((req.parameters or {}).get("binary_data_output", False))
        binary = {o.name: bool((o.parameters or {}).get("binary_data", binary_all))
                  for o in req.outputs or []}
        try:
            results = sess.run(names, feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise HTTPException(status_code=400, detail=str(e))
        outputs, blobs = [], []
        for name, arr in zip(names, results):
            out = {"name": name,
                   "datatype": ORT_TO_OIP.get(f"tensor({_ort_name(arr.dtype)})", "BYTES"),
                   "shape": list(arr.shape)}
            if binary.get(name, binary_all):
                raw = np.ascontiguousarray(arr).tobytes()
                out["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                out["data"] = arr.flatten().tolist()
            outputs.append(out)
        resp = {"model_name": model, "model_version": version, "outputs": outputs}
        if req.id is not None:
            resp["id"] = req.id
        if not blobs:
            return resp
        head = json.dumps(resp, separators=(",", ":")).encode()
        return Response(content=b"".join([head, *blobs]), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    # async: the model is small, so it runs on the event loop (no thread
    # pool hop), which is the faster choice for this baseline.
    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        return await run(model, None, request)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, request: Request):
        return await run(model, version, request)

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
