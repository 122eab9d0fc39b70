"""onnxruntime in-process: session.run on batch 1 in a loop, one thread
(intra- and inter-op threads 1). The floor for a Python server.

usage: ort_inproc.py MODEL.onnx BODY.json SECONDS [BATCH]
BATCH (default 1) repeats the body's rows to that many, as engine_bench's
--batch does.
Prints one JSON line: calls, req_s, p50_us, p99_us, mean_us."""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main() -> None:
    model, body_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    with open(body_path) as f:
        body = json.load(f)
    feeds = {i["name"]: np.asarray(i["data"], dtype=DTYPES[i["datatype"]]).reshape(i["shape"])
             for i in body["inputs"]}
    if batch != 1:
        feeds = {k: np.resize(v, (batch,) + v.shape[1:]) for k, v in feeds.items()}
    warm = time.perf_counter() + 0.5
    while time.perf_counter() < warm:
        sess.run(None, feeds)
    samples = []
    end = time.perf_counter() + seconds
    clock = time.perf_counter
    while True:
        t0 = clock()
        if t0 >= end:
            break
        sess.run(None, feeds)
        samples.append(clock() - t0)
    samples.sort()
    n = len(samples)
    mean = sum(samples) / n
    pct = lambda p: samples[round((n - 1) * p)] * 1e6
    print(json.dumps({"calls": n, "req_s": round(1 / mean, 1), "p50_us": round(pct(0.5), 1),
                      "p99_us": round(pct(0.99), 1), "mean_us": round(mean * 1e6, 1)}))


if __name__ == "__main__":
    main()
