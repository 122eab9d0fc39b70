#!/usr/bin/env python3
"""Builds the example model repository served by infermesh-sidecar.

Run from the repository root, after `scripts/tools.sh models`:

    .tools/venv/bin/python examples/models/make_models.py

Writes, for each model, `<model>/config.json` and, for versions "1" and "2",
`<model>/<version>/model.onnx` and `<model>/<version>/reference.json` next to
this script. Every seed is fixed and training runs on one BLAS thread, so a
second run on the same machine writes byte-identical files.

Each written model is checked: the ONNX checker (full check), onnxruntime
agreement with scikit-learn where there is a scikit-learn model, the
reference outputs re-read from disk and recomputed, and the two versions
giving different answers on the reference inputs.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

OUT_DIR = Path(__file__).resolve().parent
OPSET = 13  # default ONNX domain
ML_OPSET = 1  # ai.onnx.ml: float attributes, the form tract-onnx parses
IR_VERSION = 8
TARGET_OPSET = {"": OPSET, "ai.onnx.ml": ML_OPSET}
BATCH_DIM = "batch"
DIGIT_LABELS = [str(d) for d in range(10)]
CIFAR10_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
CONFIG_COMMON = {
    "platform": "onnx",
    "max_batch_size": 32,
    "dynamic_batching": {"max_delay_us": 200, "preferred_batch_size": 8},
    "version_policy": {"latest": 2},
}
# Suggested comparison tolerance for another runtime (tract) against the
# FP32 reference outputs; integer outputs must match exactly.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64",
            np.dtype(object): "BYTES"}


# ---------------------------------------------------------------- data


def upsample_28(x64: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resize of 8x8 images (rows of 64) to 28x28 (784)."""
    idx = (np.arange(28) * 8) // 28  # each source pixel covers 3 or 4 pixels
    imgs = x64.reshape(-1, 8, 8)[:, idx][:, :, idx]
    return imgs.reshape(-1, 784)


def digits_split():
    """load_digits scaled to [0, 1] as float32, 75/25 stratified split."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=y)
    return x[tr], y[tr], x[te], y[te], te


# ---------------------------------------------------------------- onnx helpers


def finish_model(model: onnx.ModelProto, name: str, version: str, doc: str) -> onnx.ModelProto:
    """Fixes the fields that vary between runs and names the batch dimension."""
    model.ir_version = IR_VERSION
    model.model_version = int(version)
    model.graph.name = name.replace("-", "_") + "_v" + version
    model.doc_string = doc
    # skl2onnx lists opsets in set order (varies with the string hash seed)
    # and may repeat one: keep one entry per domain, sorted.
    opsets = {}
    for op in model.opset_import:
        opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    del model.opset_import[:]
    for domain in sorted(opsets):
        model.opset_import.append(helper.make_opsetid(domain, opsets[domain]))
    del model.metadata_props[:]
    for key, value in (("infermesh.model", name), ("infermesh.version", version)):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    onnx.checker.check_model(model, full_check=True)
    return model


def export_sklearn(clf, n_features: int, name: str, version: str, doc: str) -> onnx.ModelProto:
    model = convert_sklearn(
        clf,
        name=name,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
        options={id(clf): {"zipmap": False}},
    )
    return finish_model(model, name, version, doc)


def tiny_cnn(seed: int, version: str, doc: str) -> onnx.ModelProto:
    """Conv(3->8)+Relu+MaxPool, Conv(8->16)+Relu+GAP, Flatten, Gemm(16->10), Softmax."""
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def small(shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    inits = [
        numpy_helper.from_array(he((8, 3, 3, 3), 27), "conv1.weight"),
        numpy_helper.from_array(small((8,)), "conv1.bias"),
        numpy_helper.from_array(he((16, 8, 3, 3), 72), "conv2.weight"),
        numpy_helper.from_array(small((16,)), "conv2.bias"),
        # Gemm with transB=1: B is [out, in], like a torch Linear.
        numpy_helper.from_array(he((10, 16), 16) * np.float32(4.0), "fc.weight"),
        numpy_helper.from_array(small((10,)), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"],
                         name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1",
                         kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         alpha=1.0, beta=1.0, transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH_DIM, 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH_DIM, 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="infermesh-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    return finish_model(model, "tiny-cnn", version, doc)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x})))


# ---------------------------------------------------------------- json


def tensor_json(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        data = [float(v) for v in a.ravel()]  # exact float32 value, shortest repr
    elif a.dtype == np.int64:
        data = [int(v) for v in a.ravel()]
    elif a.dtype == object:
        data = [str(v) for v in a.ravel()]
    else:
        raise TypeError(f"unsupported dtype {a.dtype}")
    if a.dtype == np.float32 and not np.isfinite(a).all():
        # JSON has no NaN: inputs with missing values list them as "NaN",
        # which OIP v2 JSON cannot carry either; see tree_reference_json.
        data = [v if np.isfinite(v) else "NaN" for v in data]
    return {"datatype": DATATYPE[a.dtype], "shape": list(a.shape), "data": data}


def dumps(obj, indent: int = 0) -> str:
    """JSON with nested objects indented and lists of scalars on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [inner + dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, separators=(", ", ": "), allow_nan=False)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def write_model(path: Path, model: onnx.ModelProto) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


# ---------------------------------------------------------------- checks


def check_close(got: np.ndarray, want: np.ndarray, what: str, atol: float = 1e-6) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        sys.exit(f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}")
    if got.dtype.kind == "f":
        if not np.allclose(got, want, atol=atol, rtol=0):
            sys.exit(f"{what}: max abs diff {np.abs(got - want).max()} > {atol}")
    elif not np.array_equal(got, want):
        sys.exit(f"{what}: values differ")


def check_signature(sess: ort.InferenceSession, config: dict, name: str) -> None:
    """The model's declared inputs/outputs are the ones config.json promises."""
    ort_type = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
    for decl, spec in (
        (sess.get_inputs(), config["inputs"]),
        (sess.get_outputs(), config["outputs"]),
    ):
        got = [(t.name, ort_type[t.type], [-1 if isinstance(d, str) else d for d in t.shape])
               for t in decl]
        want = [(t["name"], t["datatype"], t["shape"]) for t in spec]
        if got != want:
            sys.exit(f"{name}: signature {got} != config {want}")


# ---------------------------------------------------------------- models


def pick_rows(argmax_v1: np.ndarray, argmax_v2: np.ndarray) -> tuple[int, list[int]]:
    """Reference rows (indices into the candidates): a row where the versions
    disagree first when there is one, so one request tells them apart."""
    differ = np.flatnonzero(argmax_v1 != argmax_v2)
    first = int(differ[0]) if differ.size else 0
    rest = [i for i in range(len(argmax_v1)) if i != first][:3]
    return first, [first] + rest


def build_references(name, versions, sessions, x_cand, source, source_rows, truth=None):
    """reference.json for each version on the same batch-1 and batch-4 inputs.

    `source_rows[i]` names where candidate row i came from, for the record."""
    cand_out = {v: run(sessions[v], x_cand) for v in versions}
    am = {v: cand_out[v]["probabilities"].argmax(axis=1) for v in versions}
    one, four = pick_rows(am["1"], am["2"])
    if am["1"][one] == am["2"][one]:
        print(f"warning: {name}: no candidate row where versions 1 and 2 disagree")
    refs = {}
    for v in versions:
        cases = []
        for case_name, rows in (("batch-1", [one]), ("batch-4", four)):
            x = np.ascontiguousarray(x_cand[rows])
            outs = run(sessions[v], x)
            case = {
                "name": case_name,
                "source": f"{source} rows {[int(source_rows[r]) for r in rows]}",
                "inputs": {"input": tensor_json(x)},
                "outputs": {k: tensor_json(outs[k]) for k in outs},
            }
            if truth is not None:
                case["true_labels"] = [int(t) for t in truth[rows]]
            cases.append(case)
        refs[v] = {
            "model": name,
            "version": v,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "tolerance": TOLERANCE,
            "inputs": cases[1]["inputs"],
            "outputs": cases[1]["outputs"],
            "cases": cases,
        }
    return refs


def verify_written(model_dir: Path, name: str, v: str, config: dict) -> ort.InferenceSession:
    path = model_dir / v / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    sess = session(path)
    check_signature(sess, config, f"{name}/{v}")
    ref = json.loads((model_dir / v / "reference.json").read_text())
    for case in ref["cases"]:
        t = case["inputs"]["input"]
        x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        outs = run(sess, x)
        for k, spec in case["outputs"].items():
            dtype = np.float32 if spec["datatype"] == "FP32" else np.int64
            want = np.asarray(spec["data"], dtype=dtype).reshape(spec["shape"])
            check_close(outs[k], want, f"{name}/{v} {case['name']} {k}", atol=0.0)
    return sess


def make_sklearn_model(name, n_features, features, make_clf, versions_cfg, doc, description):
    x_tr, y_tr, x_te, y_te, te_idx = features
    model_dir = OUT_DIR / name
    config = {
        **CONFIG_COMMON,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, n_features]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
        "labels": {"probabilities": DIGIT_LABELS},
        "description": description,
    }
    write_text(model_dir / "config.json", dumps(config))
    sessions, rows = {}, []
    for v, params in versions_cfg.items():
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = make_clf(**params).fit(x_tr, y_tr)
        model = export_sklearn(clf, n_features, name, v, doc.format(version=v, **params))
        path = model_dir / v / "model.onnx"
        write_model(path, model)
        sess = session(path)
        outs = run(sess, x_te)
        # onnxruntime agrees with scikit-learn on the whole test set.
        skl_proba = clf.predict_proba(x_te).astype(np.float32)
        check_close(outs["probabilities"], skl_proba, f"{name}/{v} vs sklearn", atol=1e-4)
        skl_label = clf.predict(x_te)
        agree = float(np.mean(outs["label"] == skl_label))
        if agree < 0.995:
            sys.exit(f"{name}/{v}: label agreement with sklearn only {agree:.4f}")
        acc = float(np.mean(outs["label"] == y_te))
        sessions[v] = sess
        rows.append((name, v, path.stat().st_size, f"{acc:.4f}", f"{agree:.4f}"))
    refs = build_references(name, list(versions_cfg), sessions, x_te,
                            "load_digits", te_idx, truth=y_te)
    for v, ref in refs.items():
        write_text(model_dir / v / "reference.json", dumps(ref))
    return model_dir, config, rows


def cnn_inputs(n: int, seed: int) -> np.ndarray:
    """Random images in [0, 1] that differ per row in colour and layout (plain
    noise would average out to the same features for every row): per-channel
    offset and gain over a random 4x4 block pattern, plus a little noise."""
    rng = np.random.default_rng(seed)
    offset = rng.random((n, 3, 1, 1)) * 0.5
    gain = rng.random((n, 3, 1, 1))
    blocks = np.kron(rng.random((n, 3, 4, 4)), np.ones((1, 1, 8, 8)))
    noise = rng.random((n, 3, 32, 32)) * 0.1
    return np.clip(offset + gain * blocks * 0.5 + noise, 0.0, 1.0).astype(np.float32)


def make_cnn():
    name = "tiny-cnn"
    model_dir = OUT_DIR / name
    config = {
        **CONFIG_COMMON,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        "labels": {"probabilities": CIFAR10_LABELS},
        "description": "Small CNN on 3x32x32 images (CIFAR-10 shaped) with untrained, "
                       "fixed-seed random weights; for plumbing and numerics, not accuracy. "
                       "Conv-Relu-MaxPool, Conv-Relu-GlobalAveragePool, Gemm, Softmax.",
    }
    write_text(model_dir / "config.json", dumps(config))
    seeds = {"1": 101, "2": 202}
    sessions, rows = {}, []
    for v, seed in seeds.items():
        model = tiny_cnn(seed, v, f"tiny-cnn v{v}: untrained CNN, weights from "
                                  f"numpy default_rng({seed}).")
        path = model_dir / v / "model.onnx"
        write_model(path, model)
        sessions[v] = session(path)
        rows.append((name, v, path.stat().st_size, "-", "-"))
    x_cand = cnn_inputs(16, seed=2024)
    refs = build_references(name, list(seeds), sessions, x_cand,
                            "cnn_inputs(16, seed=2024) in make_models.py",
                            np.arange(len(x_cand)))
    for v, ref in refs.items():
        write_text(model_dir / v / "reference.json", dumps(ref))
    return model_dir, config, rows


# ---------------------------------------------------------------- tree ensembles

TREE_ROWS = 32  # batch-32 reference case; its first row is the batch-1 case
TREE_NAN_ROWS = (3, 7, 11, 19)  # rows of the batch-32 case with missing values


def to_gte(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same trees with BRANCH_GTE nodes: `x <= t` becomes `x >= t'`
    with t' the next float32 above t and the children swapped (exact on
    float32 inputs), and missing-value tracking flipped so NaN still takes
    the same branch."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        modes = list(attrs["nodes_modes"].strings)
        values = attrs["nodes_values"].floats
        true_ids, false_ids = attrs["nodes_truenodeids"].ints, attrs["nodes_falsenodeids"].ints
        if "nodes_missing_value_tracks_true" in attrs:
            missing = attrs["nodes_missing_value_tracks_true"].ints
        else:
            node.attribute.append(helper.make_attribute(
                "nodes_missing_value_tracks_true", [0] * len(modes)))
            missing = node.attribute[-1].ints
        for i, mode in enumerate(modes):
            if mode != b"BRANCH_LEQ":
                continue
            modes[i] = b"BRANCH_GTE"
            values[i] = float(np.nextafter(np.float32(values[i]), np.float32(np.inf)))
            true_ids[i], false_ids[i] = false_ids[i], true_ids[i]
            missing[i] = 1 - missing[i]
        del attrs["nodes_modes"].strings[:]
        attrs["nodes_modes"].strings.extend(modes)
    return out


def ort_outputs(sess, x):
    """onnxruntime outputs as arrays; ZipMap's list of maps becomes the
    [N, classes] probability tensor with columns in class label order."""
    names = [o.name for o in sess.get_outputs()]
    outs = {}
    for o, v in zip(sess.get_outputs(), sess.run(names, {"input": x})):
        if o.type.startswith("seq(map("):
            keys = list(v[0].keys())
            v = np.array([[row[k] for k in keys] for row in v], dtype=np.float32)
        elif isinstance(v, list):
            v = np.array(v)
        if v.dtype.kind in "US":
            v = v.astype(object)
        outs[o.name] = v
    return outs


def tree_cases(x_rows: np.ndarray, source: str):
    """batch-1 and batch-32 inputs; four batch-32 rows get missing values."""
    rng = np.random.default_rng(77)
    x32 = np.array(x_rows[:TREE_ROWS], dtype=np.float32)
    for r in TREE_NAN_ROWS:
        cols = rng.choice(x32.shape[1], size=max(1, x32.shape[1] // 3), replace=False)
        x32[r, cols] = np.nan
    return [("batch-1", x32[:1], f"{source} row 0"),
            ("batch-32", x32, f"{source} rows 0-31, NaN in rows {list(TREE_NAN_ROWS)}")]


TREE_MODELS = [
    # name, dataset, estimator factory, zipmap, string labels, description
    ("wine-forest", "wine", lambda: RandomForestClassifier(
        n_estimators=10, max_depth=5, random_state=3, n_jobs=1), False, True,
     "RandomForestClassifier(10 trees, depth 5) on load_wine; string class labels"),
    ("wine-forest-zipmap", "wine", lambda: RandomForestClassifier(
        n_estimators=10, max_depth=5, random_state=3, n_jobs=1), True, True,
     "wine-forest exported with ZipMap"),
    ("wine-gbt", "wine", lambda: GradientBoostingClassifier(
        n_estimators=10, max_depth=3, random_state=3), False, False,
     "GradientBoostingClassifier(10 rounds x 3 classes, depth 3) on load_wine; SOFTMAX"),
    ("wine-gbt-zipmap", "wine", lambda: GradientBoostingClassifier(
        n_estimators=10, max_depth=3, random_state=3), True, False,
     "wine-gbt exported with ZipMap"),
    ("cancer-gbt", "cancer", lambda: GradientBoostingClassifier(
        n_estimators=20, max_depth=3, random_state=3), False, False,
     "GradientBoostingClassifier(20 rounds, depth 3) on load_breast_cancer; binary, LOGISTIC"),
    ("cancer-gbt-zipmap", "cancer", lambda: GradientBoostingClassifier(
        n_estimators=20, max_depth=3, random_state=3), True, False,
     "cancer-gbt exported with ZipMap"),
    ("diabetes-forest", "diabetes", lambda: RandomForestRegressor(
        n_estimators=10, max_depth=5, random_state=3, n_jobs=1), False, False,
     "RandomForestRegressor(10 trees, depth 5) on load_diabetes"),
    ("diabetes-gbt", "diabetes", lambda: GradientBoostingRegressor(
        n_estimators=20, max_depth=3, random_state=3), False, False,
     "GradientBoostingRegressor(20 rounds, depth 3) on load_diabetes"),
]


def tree_dataset(name: str):
    loader = {"wine": load_wine, "cancer": load_breast_cancer, "diabetes": load_diabetes}[name]
    d = loader()
    x = d.data.astype(np.float32)
    y = d.target
    strat = y if name != "diabetes" else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=strat)
    return x_tr, y_tr, x_te, y_te, list(getattr(d, "target_names", []))


def make_tree_model(name, dataset, make_est, zipmap, string_labels, description):
    x_tr, y_tr, x_te, y_te, class_names = tree_dataset(dataset)
    classifier = dataset != "diabetes"
    if string_labels:
        y_tr = np.array(class_names, dtype=object)[y_tr]
        y_te = np.array(class_names, dtype=object)[y_te]
    with threadpool_limits(limits=1):
        est = make_est().fit(x_tr, y_tr)
    n_features = x_tr.shape[1]
    options = {id(est): {"zipmap": zipmap}} if classifier else None
    base = convert_sklearn(est, name=name, target_opset=TARGET_OPSET, options=options,
                           initial_types=[("input", FloatTensorType([None, n_features]))])
    model_dir = OUT_DIR / name
    labels = [str(c) for c in est.classes_] if classifier else None
    n_classes = len(labels) if classifier else 0
    rows = []
    sessions = {}
    for v, rewrite, mode in (("1", lambda m: m, "BRANCH_LEQ"), ("2", to_gte, "BRANCH_GTE")):
        model = finish_model(rewrite(base), name, v,
                             f"{name} v{v}: {description}; nodes use {mode}.")
        path = model_dir / v / "model.onnx"
        write_model(path, model)
        sess = session(path)
        sessions[v] = sess
        outs = ort_outputs(sess, x_te)
        if classifier:
            prob_name = [k for k in outs if "prob" in k][0]
            label_name = [k for k in outs if "label" in k][0]
            check_close(outs[prob_name], est.predict_proba(x_te).astype(np.float32),
                        f"{name}/{v} vs sklearn", atol=1e-4)
            agree = float(np.mean(outs[label_name] == est.predict(x_te)))
            metric = f"{float(np.mean(outs[label_name] == y_te)):.4f}"
        else:
            pred = est.predict(x_te).astype(np.float32)
            got = outs["variable"].ravel()
            agree = float(np.mean(np.abs(got - pred) <= 1e-3 * np.maximum(1, np.abs(pred))))
            metric = f"r2 {1 - np.sum((got - y_te) ** 2) / np.sum((y_te - y_te.mean()) ** 2):.3f}"
        if agree < 0.995:
            sys.exit(f"{name}/{v}: agreement with sklearn only {agree:.4f}")
        rows.append((name, v, path.stat().st_size, metric, f"{agree:.4f}"))
    # v1 (LEQ) and v2 (GTE) must agree exactly, missing values included.
    cases = tree_cases(x_te, f"{dataset} hold-out")
    for case_name, x, _ in cases:
        a, b = ort_outputs(sessions["1"], x), ort_outputs(sessions["2"], x)
        for k in a:
            if not np.array_equal(a[k], b[k]):
                sys.exit(f"{name} {case_name} {k}: BRANCH_GTE rewrite changes the output")
    out_specs = []
    for o in sessions["1"].get_outputs():
        if o.type.startswith("seq(map(") or "prob" in o.name:
            out_specs.append({"name": o.name, "datatype": "FP32", "shape": [-1, n_classes]})
        elif classifier:
            out_specs.append({"name": o.name, "datatype": "BYTES" if string_labels else "INT64",
                              "shape": [-1]})
        else:
            out_specs.append({"name": o.name, "datatype": "FP32", "shape": [-1, 1]})
    config = {
        **CONFIG_COMMON,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, n_features]}],
        "outputs": out_specs,
        "description": description + "." + (
            " ZipMap's per-row map is served as the FP32 [-1, classes] probability tensor; "
            "labels gives its column order." if zipmap else "") +
            " Version 1 uses BRANCH_LEQ nodes, version 2 the equivalent BRANCH_GTE rewrite.",
    }
    if classifier:
        prob = [s["name"] for s in out_specs if s["datatype"] == "FP32"][0]
        config["labels"] = {prob: labels}
    write_text(model_dir / "config.json", dumps(config))
    for v, sess in sessions.items():
        ref_cases = []
        for case_name, x, source in cases:
            outs = ort_outputs(sess, x)
            ref_cases.append({"name": case_name, "source": source,
                              "inputs": {"input": tensor_json(x)},
                              "outputs": {k: tensor_json(outs[k]) for k in outs}})
        ref = {"model": name, "version": v,
               "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
               "tolerance": TOLERANCE,
               "inputs": ref_cases[1]["inputs"], "outputs": ref_cases[1]["outputs"],
               "cases": ref_cases}
        write_text(model_dir / v / "reference.json", dumps(ref))
        # Re-read from disk and recompute.
        back = json.loads((model_dir / v / "reference.json").read_text())
        for case in back["cases"]:
            t = case["inputs"]["input"]
            x = np.array([np.nan if d == "NaN" else d for d in t["data"]],
                         dtype=np.float32).reshape(t["shape"])
            outs = ort_outputs(session(model_dir / v / "model.onnx"), x)
            for k, spec in case["outputs"].items():
                want = np.array(spec["data"], dtype={"FP32": np.float32, "INT64": np.int64,
                                                     "BYTES": object}[spec["datatype"]])
                if not np.array_equal(outs[k].ravel(), want):
                    sys.exit(f"{name}/{v} {case['name']} {k}: reference not reproduced")
    return rows


def main() -> None:
    x_tr, y_tr, x_te, y_te, te_idx = digits_split()
    digits64 = (x_tr, y_tr, x_te, y_te, te_idx)
    digits784 = (upsample_28(x_tr), y_tr, upsample_28(x_te), y_te, te_idx)

    built = [
        make_sklearn_model(
            "digits-mlp", 784, digits784,
            lambda seed, max_iter: MLPClassifier(
                hidden_layer_sizes=(256, 128), random_state=seed, max_iter=max_iter),
            {"1": {"seed": 1, "max_iter": 8}, "2": {"seed": 2, "max_iter": 200}},
            "digits-mlp v{version}: MLPClassifier(256, 128) on load_digits upsampled "
            "to 28x28, random_state={seed}, max_iter={max_iter}.",
            "Handwritten digit classifier: scikit-learn MLP (784-256-128-10, ReLU) on "
            "load_digits 8x8 images resized (nearest) to 28x28 and scaled to [0, 1]. "
            "Version 1 is briefly trained, version 2 fully.",
        ),
        make_cnn(),
        make_sklearn_model(
            "digits-forest", 64, digits64,
            lambda seed: RandomForestClassifier(
                n_estimators=20, max_depth=6, random_state=seed, n_jobs=1),
            {"1": {"seed": 1}, "2": {"seed": 2}},
            "digits-forest v{version}: RandomForestClassifier(n_estimators=20, "
            "max_depth=6, random_state={seed}) on load_digits 8x8.",
            "Handwritten digit classifier: scikit-learn random forest (20 trees, depth "
            "6, ONNX-ML TreeEnsembleClassifier) on load_digits 8x8 images scaled to "
            "[0, 1]. Versions differ in random seed.",
        ),
    ]

    table = []
    for model_dir, config, rows in built:
        name = model_dir.name
        outs = {}
        for _, v, *_ in rows:
            sess = verify_written(model_dir, name, v, config)
            ref = json.loads((model_dir / v / "reference.json").read_text())
            t = ref["inputs"]["input"]
            x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            outs[v] = run(sess, x)["probabilities"]
        if np.array_equal(outs["1"], outs["2"]):
            sys.exit(f"{name}: versions 1 and 2 give identical outputs")
        differ = int(np.sum(outs["1"].argmax(1) != outs["2"].argmax(1)))
        for row in rows:
            table.append((*row, str(differ)))

    for spec in TREE_MODELS:
        table.extend((*row, "0 (v2 = GTE rewrite)") for row in make_tree_model(*spec))

    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, skl2onnx "
          f"{skl2onnx.__version__}, scikit-learn {sklearn.__version__}, numpy "
          f"{np.__version__}; opset {OPSET}, ai.onnx.ml {ML_OPSET}, IR {IR_VERSION}")
    head = ("model", "version", "bytes", "test acc", "ort=skl", "batch-4 argmax diff v1/v2")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    for r in [head, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"total size of {OUT_DIR.name}/: {total} bytes")


if __name__ == "__main__":
    main()
