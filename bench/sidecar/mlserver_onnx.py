"""An MLServer custom runtime that serves an ONNX file with onnxruntime.
MLServer 1.7 ships no ONNX runtime; this is the documented way to add one
(`implementation` in model-settings.json). `parameters.uri` is the .onnx
path; `parameters.extra.threads` the onnxruntime intra-op threads."""
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = (params.extra or {}) if params else {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("threads", 1))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(params.uri, opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        names = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        results = self._session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, np.asarray(r)) for n, r in zip(names, results)],
        )
