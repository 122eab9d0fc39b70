#!/usr/bin/env python3
"""The tree benchmark's model and baseline, made deterministically (the
model is ~3 MB, so it is generated here instead of committed).

  make_forest.py OUT_DIR

Writes OUT_DIR/repo/forest/{config.json,1/model.onnx}: a scikit-learn
RandomForestClassifier(n_estimators=100, max_depth=8) on
make_classification(16 features, 3 classes, seed 0), exported by skl2onnx
(ZipMap off; TreeEnsembleClassifier, BRANCH_LEQ) -- and its BRANCH_GTE
twin in OUT_DIR/repo/forest/2/model.onnx; OUT_DIR/x.bin (1024 rows of
float32 features), OUT_DIR/body-b1.json and body-b32.json (OIP v2 JSON
bodies). Then times onnxruntime (CPUExecutionProvider, 1 thread) on
batches of 1 and 32 and prints one JSON line per batch size:
{"runtime": "onnxruntime", "batch": B, "us_per_sample": ...}.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "models"))
from make_models import to_gte  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    x, y = make_classification(n_samples=4000, n_features=16, n_informative=10,
                               n_classes=3, random_state=0)
    x = x.astype(np.float32)
    with threadpool_limits(limits=1):
        clf = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0,
                                     n_jobs=1).fit(x[:3000], y[:3000])
    model = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 16]))],
                            target_opset={"": 13, "ai.onnx.ml": 1},
                            options={id(clf): {"zipmap": False}})
    repo = out / "repo" / "forest"
    for v, m in (("1", model), ("2", to_gte(model))):
        (repo / v).mkdir(parents=True, exist_ok=True)
        (repo / v / "model.onnx").write_bytes(m.SerializeToString(deterministic=True))
    (repo / "config.json").write_text(json.dumps({
        "max_batch_size": 32,
        "version_policy": {"latest": 1},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }))
    rows = np.ascontiguousarray(x[3000:4000])
    (out / "x.bin").write_bytes(rows.tobytes())
    for b in (1, 32):
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [b, 16],
                            "data": [float(v) for v in rows[:b].ravel()]}]}
        (out / f"body-b{b}.json").write_text(json.dumps(body))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(repo / "1" / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    for b in (1, 32):
        batches = [rows[i:i + b] for i in range(0, len(rows) - b + 1, b)][:256]
        for xb in batches[:20]:
            sess.run(None, {"input": xb})
        best = []
        for _ in range(5):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                for xb in batches:
                    sess.run(None, {"input": xb})
                    n += b
            best.append((time.perf_counter() - t0) / n * 1e6)
        print(json.dumps({"runtime": "onnxruntime", "batch": b,
                          "us_per_sample": round(float(np.median(best)), 3)}))


if __name__ == "__main__":
    main()
