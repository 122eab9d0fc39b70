"""Writes the request bodies of the sidecar benchmark, per model and batch
size B: rows of the model's reference input
(MODELS_DIR/<model>/<version>/reference.json, cycled when it has fewer
than B rows), or of a raw float32 matrix given with --x-bin.

  OUT_DIR/<model>.json         OIP v2 JSON body, batch 1
  OUT_DIR/<model>-bB.json      OIP v2 JSON body, batch B
  OUT_DIR/<model>.pa.json      the first row as perf_analyzer --input-data
                               (row shape: perf_analyzer's -b B repeats it B
                               times; it sends JSON or binary tensors)

usage: make_bodies.py MODELS_DIR VERSION OUT_DIR MODEL... [--batch B]...
                      [--x-bin MODEL=PATH:FEATURES]...
"""
import argparse
import json
import math
import os
import struct


def reference_inputs(models_dir: str, version: str, model: str) -> list[dict]:
    """[{name, datatype, row_shape, rows: [[...], ...]}] from reference.json."""
    with open(os.path.join(models_dir, model, version, "reference.json")) as f:
        ref = json.load(f)
    out = []
    for name, t in ref["inputs"].items():
        shape = list(t["shape"])
        row = math.prod(shape[1:])
        data = t["data"]
        rows = [data[i:i + row] for i in range(0, len(data) - row + 1, row)]
        if not rows:
            raise SystemExit(f"{model}: reference input {name} is shorter than one row")
        out.append({"name": name, "datatype": t["datatype"], "row_shape": shape[1:],
                    "rows": rows})
    return out


def x_bin_inputs(spec: str) -> tuple[str, list[dict]]:
    """MODEL=PATH:FEATURES: one FP32 input `input`, rows of a float32 file."""
    model, rest = spec.split("=", 1)
    path, features = rest.rsplit(":", 1)
    n = int(features)
    with open(path, "rb") as f:
        raw = f.read(4 * n * 64)
    vals = list(struct.unpack(f"<{len(raw) // 4}f", raw[:len(raw) // 4 * 4]))
    rows = [vals[i:i + n] for i in range(0, len(vals) - n + 1, n)]
    if not rows:
        raise SystemExit(f"{model}: {path} is shorter than one row of {n} floats")
    return model, [{"name": "input", "datatype": "FP32", "row_shape": [n], "rows": rows}]


def write(out_dir: str, model: str, inputs: list[dict], batch: int, compat: bool) -> None:
    body = []
    for t in inputs:
        data = [v for i in range(batch) for v in t["rows"][i % len(t["rows"])]]
        shape = [batch] + t["row_shape"]
        body.append({"name": t["name"], "datatype": t["datatype"], "shape": shape, "data": data})
    text = json.dumps({"inputs": body}, separators=(",", ":"))
    names = [f"{model}-b{batch}.json"] + ([f"{model}.json"] if compat else [])
    for name in names:
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)


def write_pa(out_dir: str, model: str, inputs: list[dict]) -> None:
    pa = {t["name"]: {"content": t["rows"][0], "shape": t["row_shape"]} for t in inputs}
    with open(os.path.join(out_dir, f"{model}.pa.json"), "w") as f:
        json.dump({"data": [pa]}, f, separators=(",", ":"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models_dir")
    p.add_argument("version")
    p.add_argument("out_dir")
    p.add_argument("models", nargs="*")
    p.add_argument("--batch", type=int, action="append", default=[])
    p.add_argument("--x-bin", action="append", default=[])
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    batches = sorted(set(args.batch) | {1})
    sources = {m: reference_inputs(args.models_dir, args.version, m) for m in args.models}
    sources.update(x_bin_inputs(s) for s in args.x_bin)
    for model, inputs in sources.items():
        write_pa(args.out_dir, model, inputs)
        for b in batches:
            write(args.out_dir, model, inputs, b, compat=b == 1)


if __name__ == "__main__":
    main()
