"""Writes one OIP v2 JSON infer request per model: batch 1, the first row of
the model's reference input (examples/models/<model>/<version>/reference.json).

usage: make_bodies.py MODELS_DIR VERSION OUT_DIR MODEL...
"""
import json
import math
import os
import sys


def main() -> None:
    models_dir, version, out_dir, *models = sys.argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    for model in models:
        with open(os.path.join(models_dir, model, version, "reference.json")) as f:
            ref = json.load(f)
        inputs = []
        for name, t in ref["inputs"].items():
            shape = list(t["shape"])
            row = math.prod(shape[1:])
            data = t["data"][:row]
            if len(data) != row:
                raise SystemExit(f"{model}: reference input {name} is shorter than one row")
            inputs.append({"name": name, "datatype": t["datatype"],
                           "shape": [1] + shape[1:], "data": data})
        body = json.dumps({"inputs": inputs}, separators=(",", ":"))
        with open(os.path.join(out_dir, f"{model}.json"), "w") as f:
            f.write(body)


if __name__ == "__main__":
    main()
