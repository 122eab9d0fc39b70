#!/usr/bin/env python3
"""Random tree ensembles and their onnxruntime outputs, for onnx-ml-ops'
agreement test (tests/agreement.rs).

Run from the repository root, after `scripts/tools.sh models`:

    .tools/venv/bin/python sidecar/onnx-ml/tests/make_fixtures.py

Writes tests/fixtures/random_ensembles.json: for each case the ONNX model
(base64), the input rows (NaN and infinities as strings) and what onnxruntime 1 thread
returns. Models are built with the onnx helper: random depths, features,
thresholds drawn from a small set (so BRANCH_EQ/NEQ and ties happen), every
node mode, random missing-value tracking, classifiers with int or string
labels, 2 to 5 classes, every post transform and base_values length,
single-class-weighted binary classifiers, and regressors with every
aggregate function. The seed is fixed; a second run writes the same file.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent / "fixtures" / "random_ensembles.json"
N_CASES = 240
ROWS = 24
MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]
TRANSFORMS = ["NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT"]
GRID = [-1.5, -0.5, 0.0, 0.5, 1.0, 2.25]


def num(v: float):
    """JSON has no NaN or infinities: those are written as strings."""
    v = float(v)
    return v if math.isfinite(v) else str(v)


def f32(x: float) -> float:
    return float(np.float32(x))


def random_ensemble(rng, n_features, n_out, classifier):
    n_trees = int(rng.integers(1, 6))
    uniform = rng.random() < 0.5
    uniform_mode = MODES[int(rng.integers(len(MODES)))]
    track_missing = rng.random() < 0.6
    single_class = classifier and n_out == 2 and rng.random() < 0.5
    positive_only = rng.random() < 0.5
    nodes, leaves = [], []
    for tree in range(n_trees):
        max_depth = int(rng.integers(0, 5))
        tree_nodes, tree_leaves = [], []

        def build(depth):
            nid = len(tree_nodes)
            tree_nodes.append(None)
            if depth >= max_depth or (depth > 0 and rng.random() < 0.2):
                tree_nodes[nid] = {"mode": "LEAF", "f": 0, "t": 0.0, "yes": 0, "no": 0, "miss": 0}
                if single_class:
                    targets = [1]
                else:
                    k = int(rng.integers(0 if rng.random() < 0.1 else 1, n_out + 1))
                    targets = sorted(rng.choice(n_out, size=k, replace=False).tolist())
                for t in targets:
                    w = rng.random() if positive_only else rng.normal()
                    tree_leaves.append((nid, int(t), f32(w)))
                return nid
            mode = uniform_mode if uniform else MODES[int(rng.integers(len(MODES)))]
            t = GRID[int(rng.integers(len(GRID)))] if rng.random() < 0.7 else f32(rng.normal())
            node = {"mode": mode, "f": int(rng.integers(n_features)), "t": f32(t),
                    "miss": int(track_missing and rng.random() < 0.5)}
            tree_nodes[nid] = node
            node["yes"] = build(depth + 1)
            node["no"] = build(depth + 1)
            return nid

        build(0)
        # Node ids need not follow the layout: permute them (onnxruntime
        # wants the root to be node 0).
        perm = np.concatenate([[0], 1 + rng.permutation(len(tree_nodes) - 1)])
        for nid, node in enumerate(tree_nodes):
            node = dict(node)
            node["id"] = int(perm[nid])
            if node["mode"] != "LEAF":
                node["yes"] = int(perm[node["yes"]])
                node["no"] = int(perm[node["no"]])
            nodes.append((tree, node))
        leaves.extend((tree, int(perm[nid]), t, w) for nid, t, w in tree_leaves)
    return nodes, leaves, track_missing


def make_case(rng, i):
    classifier = rng.random() < 0.6
    n_features = int(rng.integers(1, 6))
    n_out = int(rng.integers(2, 6)) if classifier else int(rng.integers(1, 4))
    if classifier and rng.random() < 0.4:
        n_out = 2
    double_input = rng.random() < 0.2
    nodes, leaves, track_missing = random_ensemble(rng, n_features, n_out, classifier)
    order = np.arange(len(nodes))  # onnxruntime wants each tree's nodes together
    nodes = [nodes[j] for j in order]
    lorder = rng.permutation(len(leaves))
    leaves = [leaves[j] for j in lorder]
    transform = TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]
    nb = int(rng.choice([0, n_out]))
    base = [f32(rng.normal()) for _ in range(nb)]
    prefix = "class" if classifier else "target"
    attrs = {
        "nodes_treeids": [t for t, _ in nodes],
        "nodes_nodeids": [n["id"] for _, n in nodes],
        "nodes_featureids": [n["f"] for _, n in nodes],
        "nodes_modes": [n["mode"] for _, n in nodes],
        "nodes_values": [n["t"] for _, n in nodes],
        "nodes_truenodeids": [n["yes"] for _, n in nodes],
        "nodes_falsenodeids": [n["no"] for _, n in nodes],
        f"{prefix}_treeids": [t for t, _, _, _ in leaves],
        f"{prefix}_nodeids": [n for _, n, _, _ in leaves],
        f"{prefix}_ids": [c for _, _, c, _ in leaves],
        f"{prefix}_weights": [w for _, _, _, w in leaves],
        "post_transform": transform,
    }
    if track_missing:
        attrs["nodes_missing_value_tracks_true"] = [n["miss"] for _, n in nodes]
    if base:
        attrs["base_values"] = base
    string_labels = classifier and rng.random() < 0.4
    elem = TensorProto.DOUBLE if double_input else TensorProto.FLOAT
    x_info = helper.make_tensor_value_info("X", elem, ["N", n_features])
    if classifier:
        if string_labels:
            attrs["classlabels_strings"] = [f"c{k}" for k in range(n_out)]
            label_type = TensorProto.STRING
        else:
            attrs["classlabels_int64s"] = sorted(rng.choice(50, size=n_out, replace=False).tolist()) \
                if rng.random() < 0.3 else list(range(n_out))
            label_type = TensorProto.INT64
        node = helper.make_node("TreeEnsembleClassifier", ["X"], ["Y", "Z"], domain="ai.onnx.ml", **attrs)
        outputs = [helper.make_tensor_value_info("Y", label_type, ["N"]),
                   helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", n_out])]
    else:
        attrs["n_targets"] = n_out
        attrs["aggregate_function"] = ["SUM", "AVERAGE", "MIN", "MAX"][int(rng.integers(4))]
        node = helper.make_node("TreeEnsembleRegressor", ["X"], ["Z"], domain="ai.onnx.ml", **attrs)
        outputs = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", n_out])]
    graph = helper.make_graph([node], f"random_{i}", [x_info], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                     helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    x = np.array([[GRID[int(rng.integers(len(GRID)))] if rng.random() < 0.5 else rng.normal()
                   for _ in range(n_features)] for _ in range(ROWS)])
    x[rng.random(x.shape) < 0.1] = np.nan
    x = x.astype(np.float64 if double_input else np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"X": x})
    case = {
        "name": f"random_{i}",
        "kind": "classifier" if classifier else "regressor",
        "post_transform": transform,
        "model": base64.b64encode(model.SerializeToString()).decode(),
        "input": {"dtype": "f64" if double_input else "f32", "shape": list(x.shape),
                  "data": [num(v) for v in x.ravel()]},
        "scores": {"shape": list(outs[-1].shape),
                   "data": [num(v) for v in outs[-1].ravel()]},
    }
    if classifier:
        case["labels"] = [str(v) if string_labels else int(v) for v in outs[0].ravel()]
    return case


def main():
    rng = np.random.default_rng(20240601)
    cases, failed = [], 0
    for i in range(N_CASES):
        try:
            cases.append(make_case(rng, i))
        except Exception as e:  # noqa: BLE001 - onnxruntime refuses some shapes
            failed += 1
            print(f"case {i}: skipped: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {"generator": "sidecar/onnx-ml/tests/make_fixtures.py",
           "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider, 1 thread",
           "cases": cases}
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{len(cases)} cases written to {OUT} ({OUT.stat().st_size} bytes), {failed} skipped")


if __name__ == "__main__":
    main()
