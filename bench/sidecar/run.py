"""Sidecar benchmark driver (see bench/sidecar.sh): every server variant and
the in-process floors, interleaved over rounds.

Each server is measured per model, per cell (batch size x concurrency) and
per load: wrk-json (wrk posting a fixed OIP v2 JSON body), pa-json and
pa-binary (Triton's perf_analyzer sending JSON or binary tensors; a second,
independent client). Servers run pinned to core 0, the load to core 1. Per
measurement it records req/s, p50, p99 and errors, the server's CPU time per
request, and how busy each core was with *other* work (noise from other jobs
on the machine). Raw results: OUT/results.jsonl; summary: OUT/summary.json
and the tables on stdout.
"""
import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER_CORE = "0"
LOAD_CORE = "1"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process and its threads, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of pid and its live descendants (MLServer may fork)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += proc_cpu_s(p)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def core_busy_s() -> dict[str, float]:
    """Busy seconds per core since boot (everything but idle and iowait)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *v = line.split()
                v = [int(x) for x in v]
                out[name[3:]] = (sum(v[:8]) - v[3] - v[4]) / TICK
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def check_answer(port: int, model: str, body: bytes) -> None:
    """One request by hand: 200 and the outputs the model declares."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        resp = json.loads(r.read())
    names = sorted(o["name"] for o in resp["outputs"])
    if not names or any(len(o["data"]) == 0 for o in resp["outputs"]):
        raise RuntimeError(f"{model}: empty outputs: {resp}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(port: int, model: str, body_path: str, conc: int, seconds: float) -> dict:
    env = dict(os.environ, BODY=body_path, TARGET_PATH=f"/v2/models/{model}/infer")
    # wrk takes whole seconds.
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", os.path.join(HERE, "post.lua"), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["req_s"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = (r["err_status"] + r["err_connect"] + r["err_read"] + r["err_write"]
                           + r["err_timeout"])
            return r
    raise RuntimeError(f"wrk printed no result:\n{out}")


def perf_analyzer(pa: str, port: int, model: str, data_path: str, batch: int, conc: int,
                  fmt: str, seconds: float, csv_path: str) -> dict:
    """One perf_analyzer measurement: `batch` rows per request (the model's
    config has max_batch_size > 0, so `-b` sets the first dimension), JSON
    or binary tensors both ways, `conc` requests in flight (async, one
    thread). It measures three windows of seconds/3 each (the stability
    threshold is wide open, so it stops after the three) and reports their
    average."""
    window_ms = max(int(seconds * 1000 / 3), 200)
    cmd = ["taskset", "-c", LOAD_CORE, pa, "-m", model, "-u", f"127.0.0.1:{port}", "-i", "http",
           "-b", str(batch), "--input-data", data_path,
           "--input-tensor-format", fmt, "--output-tensor-format", fmt,
           "--async", "--max-threads", "1", "--concurrency-range", f"{conc}:{conc}",
           "-p", str(window_ms), "-s", "1000", "-r", "3", "-f", csv_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(csv_path):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {tail}")
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    os.remove(csv_path)
    # Inferences count batch rows; a request carries `batch` of them.
    return {"req_s": float(row["Inferences/Second"]) / batch,
            "p50_us": float(row["p50 latency"]), "p99_us": float(row["p99 latency"]),
            "mean_us": float("nan"), "errors": 0}


def run_load(load: str, args, port: int, model: str, bodies: dict, batch: int, conc: int,
             seconds: float, out: str) -> dict:
    if load == "wrk-json":
        return wrk(port, model, bodies[(model, batch)], conc, seconds)
    return perf_analyzer(args.perf_analyzer, port, model, bodies[(model, "pa")], batch, conc,
                         load.split("-", 1)[1], seconds, os.path.join(out, "pa.csv"))


def server_variants(args, repo: str, mlserver_repo: str) -> dict[str, dict]:
    v = {}
    for inst in (1, 2):
        v[f"sidecar-i{inst}"] = {
            "cmd": [args.sidecar_bin, "--model-repository", repo, "--listen",
                    f"127.0.0.1:{args.port}", "--instances", str(inst)],
            "env": {"RUST_LOG": "info"},
            "triton": True,
        }
    v["fastapi"] = {
        "cmd": [args.python, os.path.join(HERE, "fastapi_server.py"), "--model-repository", repo,
                "--port", str(args.port), "--threads", "1"],
        "env": {},
        "triton": True,
    }
    if args.mlserver:
        v["mlserver"] = {
            "cmd": [args.mlserver, "start", mlserver_repo],
            "env": {"PYTHONPATH": HERE},
        }
    return v


def make_mlserver_repo(out: str, model_dirs: dict[str, str], port: int) -> str:
    repo = os.path.join(out, "mlserver-repo")
    os.makedirs(repo, exist_ok=True)
    with open(os.path.join(repo, "settings.json"), "w") as f:
        # parallel_workers 0: inference in the server process, like the
        # sidecar (the default, 1, adds a worker process and a queue hop).
        json.dump({"host": "127.0.0.1", "http_port": port, "grpc_port": port + 1,
                   "metrics_port": port + 2, "parallel_workers": 0, "debug": False}, f)
    for m, version_dir in model_dirs.items():
        d = os.path.join(repo, m)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model-settings.json"), "w") as f:
            json.dump({"name": m, "implementation": "mlserver_onnx.OnnxRuntime",
                       "parameters": {"uri": os.path.join(version_dir, "model.onnx"),
                                      "version": os.path.basename(version_dir),
                                      "extra": {"threads": 1}}}, f)
    return repo


def measure_server(name: str, spec: dict, args, bodies: dict, rnd: int, out: str) -> list[dict]:
    logf = open(os.path.join(out, f"{name}-r{rnd}.log"), "w")
    env = dict(os.environ, **spec["env"])
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, *spec["cmd"]], env=env, stdout=logf,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    # perf_analyzer needs Triton's model config endpoint: not MLServer.
    loads = [ld for ld in args.loads if not ld.startswith("pa-") or spec.get("triton", False)]
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{args.port}/v2/health/ready", proc)
        for model in args.models:
            for batch in sorted({b for b, _ in args.cells}):
                with open(bodies[(model, batch)], "rb") as f:
                    check_answer(args.port, model, f.read())
            for batch, conc in args.cells:
                for load in loads:
                    try:
                        rows.append(measure_one(name, proc, args, bodies, rnd, out, model,
                                                batch, conc, load))
                    except (RuntimeError, subprocess.CalledProcessError) as e:
                        log(f"r{rnd} {name} {model} b{batch} c{conc} {load}: failed: {e}")
    finally:
        stop(proc)
        logf.close()
    return rows


def measure_one(name: str, proc: subprocess.Popen, args, bodies: dict, rnd: int, out: str,
                model: str, batch: int, conc: int, load: str) -> dict:
    if args.warmup > 0 and load == "wrk-json":
        # perf_analyzer warms up on its own (it discards until stable).
        run_load(load, args, args.port, model, bodies, batch, conc, args.warmup, out)
    cpu0, busy0, t0 = tree_cpu_s(proc.pid), core_busy_s(), time.time()
    r = run_load(load, args, args.port, model, bodies, batch, conc, args.duration, out)
    cpu1, busy1, t1 = tree_cpu_s(proc.pid), core_busy_s(), time.time()
    wall = t1 - t0
    server_cpu = cpu1 - cpu0
    c0 = (busy1[SERVER_CORE] - busy0[SERVER_CORE]) / wall
    c1 = (busy1[LOAD_CORE] - busy0[LOAD_CORE]) / wall
    # Requests over the whole run: wrk counts them; perf_analyzer keeps the
    # same load up for the whole run, so its rate times the wall time.
    n = max(r.get("requests", r["req_s"] * wall), 1)
    row = {
        "round": rnd, "variant": name, "model": model, "batch": batch, "conc": conc,
        "load": load, "req_s": r["req_s"], "p50_us": r["p50_us"], "p99_us": r["p99_us"],
        "mean_us": r["mean_us"], "errors": r["errors"],
        "server_cpu_us_per_req": server_cpu * 1e6 / n,
        "core0_busy": round(c0, 3),
        # Work on core 0 that was not the server: other jobs.
        "core0_other": round(max(c0 - server_cpu / wall, 0.0), 3),
        "core1_busy": round(c1, 3),
        "loadavg": os.getloadavg()[0],
    }
    log(f"r{rnd} {name:11s} {model:10s} b{batch:<2d} c{conc:<3d} {load:9s} "
        f"{row['req_s']:8.0f} req/s p50 {row['p50_us']:8.0f} us p99 {row['p99_us']:8.0f} us "
        f"cpu/req {row['server_cpu_us_per_req']:6.0f} us "
        f"core0 other {row['core0_other']:.2f} err {row['errors']}")
    return row


def measure_inproc(name: str, args, bodies: dict, rnd: int) -> list[dict]:
    rows = []
    for model in args.models:
        onnx_dir = args.model_dirs[model]
        body = bodies[(model, 1)]
        if name == "tract-inproc":
            cmd = [args.engine_bench, onnx_dir, body, str(args.duration)]
        else:
            cmd = [args.python, os.path.join(HERE, "ort_inproc.py"),
                   os.path.join(onnx_dir, "model.onnx"), body, str(args.duration)]
        busy0, t0 = core_busy_s(), time.time()
        out = subprocess.run(["taskset", "-c", SERVER_CORE, *cmd], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        busy1, t1 = core_busy_s(), time.time()
        r = json.loads(out.strip().splitlines()[-1])
        c0 = (busy1[SERVER_CORE] - busy0[SERVER_CORE]) / (t1 - t0)
        row = {"round": rnd, "variant": name, "model": model, "batch": 1, "conc": 1,
               "load": "inproc", "req_s": r["req_s"],
               "p50_us": r["p50_us"], "p99_us": r["p99_us"], "mean_us": r["mean_us"],
               "errors": 0, "server_cpu_us_per_req": r["mean_us"],
               "core0_busy": round(c0, 3), "core0_other": round(max(c0 - 1.0, 0.0), 3),
               "core1_busy": None, "loadavg": os.getloadavg()[0]}
        rows.append(row)
        log(f"r{rnd} {name:11s} {model:10s} c1   {row['req_s']:8.0f} calls/s "
            f"p50 {row['p50_us']:8.1f} us p99 {row['p99_us']:8.1f} us")
    return rows


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(rows: list[dict], args) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["conc"], r["load"], r["variant"]),
                          []).append(r)
    table = []
    for (model, batch, conc, load, variant), rs in sorted(groups.items(), key=lambda kv: (
            args.models.index(kv[0][0]), kv[0][1], kv[0][2], LOADS.index(kv[0][3]),
            ORDER.index(kv[0][4]) if kv[0][4] in ORDER else 99)):
        entry = {"model": model, "batch": batch, "conc": conc, "load": load,
                 "variant": variant, "rounds": len(rs)}
        for k in ("req_s", "p50_us", "p99_us", "server_cpu_us_per_req", "core0_other"):
            xs = [r[k] for r in rs]
            entry[k] = {"median": med(xs), "min": min(xs), "max": max(xs)}
        entry["errors"] = sum(r["errors"] for r in rs)
        table.append(entry)
    return {"table": table, "versus": versus(groups, args), "targets": targets(groups)}


def versus(groups: dict, args) -> list[dict]:
    """Per model, cell and load: each sidecar variant against FastAPI
    (median req/s and p50), and whether it is at least TARGET_X as fast."""
    out = []
    for model in args.models:
        for batch, conc in args.cells:
            for load in args.loads:
                fast = groups.get((model, batch, conc, load, "fastapi"), [])
                for sc in ("sidecar-i1", "sidecar-i2"):
                    s = groups.get((model, batch, conc, load, sc), [])
                    if not s and not fast:
                        continue
                    e = {"model": model, "batch": batch, "conc": conc, "load": load,
                         "sidecar": sc, "sidecar_req_s": med([r["req_s"] for r in s]),
                         "sidecar_p50_us": med([r["p50_us"] for r in s]),
                         "fastapi_req_s": med([r["req_s"] for r in fast]),
                         "fastapi_p50_us": med([r["p50_us"] for r in fast])}
                    e["ratio"] = e["sidecar_req_s"] / e["fastapi_req_s"] if s and fast \
                        else float("nan")
                    e["met"] = e["ratio"] >= TARGET_X
                    if s or sc == "sidecar-i1":
                        out.append(e)
    return out


def targets(groups: dict) -> list[dict]:
    """The batch-1 JSON (wrk) targets at concurrency 8 on the MLP, per
    sidecar variant, against MLServer and the in-process floor."""
    model = "digits-mlp"
    out = []
    tract = groups.get((model, 1, 1, "inproc", "tract-inproc"), [])
    for sc in ("sidecar-i1", "sidecar-i2"):
        s = groups.get((model, 1, 8, "wrk-json", sc), [])
        if not s:
            continue
        s_rps = med([r["req_s"] for r in s])
        b = groups.get((model, 1, 8, "wrk-json", "mlserver"), [])
        if b:
            ratio = s_rps / med([r["req_s"] for r in b])
            out.append({"sidecar": sc, "target": "req/s >= 3x mlserver",
                        "value": round(ratio, 2), "met": ratio >= 3.0})
        if tract:
            limit = 1.2 * med([r["p50_us"] for r in tract]) + 100
            for conc in (1, 8):
                sp = groups.get((model, 1, conc, "wrk-json", sc), [])
                if sp:
                    p50 = med([r["p50_us"] for r in sp])
                    out.append({"sidecar": sc,
                                "target": f"p50 at c{conc} <= 1.2 x tract p50 + 100 us "
                                          f"({limit:.0f} us)",
                                "value": round(p50, 1), "met": p50 <= limit})
    return out


ORDER = ["tract-inproc", "ort-inproc", "sidecar-i1", "sidecar-i2", "fastapi", "mlserver"]
LOADS = ["inproc", "wrk-json", "pa-json", "pa-binary"]
TARGET_X = 2.0


def fmt_range(d: dict, digits: int = 0) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"


def print_table(summary: dict) -> None:
    print(f"sidecar vs FastAPI: median req/s and p50 (us) over rounds; target >= {TARGET_X:g}x")
    hdr = f"{'model':10s} {'cell':>7s} {'load':9s} {'sidecar':10s} {'req/s':>8s} {'p50':>7s} " \
          f"{'fastapi':>8s} {'p50':>7s} {'ratio':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for e in summary["versus"]:
        mark = "" if e["ratio"] != e["ratio"] else ("met" if e["met"] else "MISSED")
        print(f"{e['model']:10s} {'b%dc%d' % (e['batch'], e['conc']):>7s} {e['load']:9s} "
              f"{e['sidecar']:10s} {e['sidecar_req_s']:>8.0f} {e['sidecar_p50_us']:>7.0f} "
              f"{e['fastapi_req_s']:>8.0f} {e['fastapi_p50_us']:>7.0f} {e['ratio']:>6.2f} {mark}")
    print()
    print("every variant: median over rounds (min-max); in-process rows: one caller, batch 1")
    hdr = f"{'model':10s} {'cell':>7s} {'load':9s} {'variant':12s} {'req/s':>22s} " \
          f"{'p50 us':>22s} {'p99 us':>24s} {'cpu us/req':>11s} {'core0 other':>11s} {'err':>4s}"
    print(hdr)
    print("-" * len(hdr))
    for e in summary["table"]:
        print(f"{e['model']:10s} {'b%dc%d' % (e['batch'], e['conc']):>7s} {e['load']:9s} "
              f"{e['variant']:12s} {fmt_range(e['req_s']):>22s} "
              f"{fmt_range(e['p50_us']):>22s} {fmt_range(e['p99_us']):>24s} "
              f"{e['server_cpu_us_per_req']['median']:>11.0f} "
              f"{e['core0_other']['median']:>11.2f} {e['errors']:>4d}")
    if summary["targets"]:
        print()
        print("targets (digits-mlp, batch 1, wrk-json):")
        for t in summary["targets"]:
            print(f"  {t['sidecar']:10s} {t['target']:45s} {t['value']:>9} "
                  f"{'met' if t['met'] else 'MISSED'}")


def parse_cell(text: str) -> tuple[int, int]:
    """`b32c8` -> (32, 8)."""
    try:
        b, c = text.strip().lstrip("b").split("c")
        cell = (int(b), int(c))
    except ValueError:
        cell = (0, 0)
    if min(cell) < 1:
        raise SystemExit(f"bad cell {text!r}: want bBATCHcCONCURRENCY, e.g. b32c8")
    return cell


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sidecar-bin", required=True)
    p.add_argument("--engine-bench", default="", help="needed for tract-inproc")
    p.add_argument("--python", required=True)
    p.add_argument("--mlserver", default="")
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--version", default="2", help="model version served and measured")
    p.add_argument("--models", default="forest,digits-mlp,tiny-cnn",
                   help="example models, and `forest` (from --forest-dir)")
    p.add_argument("--forest-dir", default="",
                   help="bench/trees/make_forest.py's output: repo/forest/1 and x.bin")
    p.add_argument("--cells", default="b1c1,b1c8,b1c32,b32c8",
                   help="bBATCHcCONCURRENCY: rows per request x requests in flight")
    p.add_argument("--loads", default="wrk-json,pa-json,pa-binary")
    p.add_argument("--perf-analyzer", default="", help="perf_analyzer binary (pa-* loads)")
    p.add_argument("--variants", default=",".join(ORDER))
    args = p.parse_args()
    args.models = args.models.split(",")
    args.cells = [parse_cell(c) for c in args.cells.split(",")]
    args.loads = [ld for ld in args.loads.split(",") if ld]
    for ld in args.loads:
        if ld not in LOADS[1:]:
            raise SystemExit(f"unknown load {ld!r}: one of {', '.join(LOADS[1:])}")
    if not args.perf_analyzer and any(ld.startswith("pa-") for ld in args.loads):
        log("perf_analyzer: not given, pa-* loads left out")
        args.loads = [ld for ld in args.loads if not ld.startswith("pa-")]
    wanted = args.variants.split(",")
    os.makedirs(args.out, exist_ok=True)

    # Where each model's ONNX file and config.json (one level up) live.
    args.model_dirs = {}
    for m in args.models:
        if m == "forest":
            if not args.forest_dir:
                raise SystemExit("model forest needs --forest-dir")
            args.model_dirs[m] = os.path.join(args.forest_dir, "repo", "forest", "1")
        else:
            args.model_dirs[m] = os.path.join(ROOT, "examples", "models", m, args.version)

    # The servers see a repository with only the measured models, one
    # version each, and the model's config.json unchanged.
    repo = os.path.join(args.out, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    for m, version_dir in args.model_dirs.items():
        version = os.path.basename(version_dir)
        os.makedirs(os.path.join(repo, m, version))
        shutil.copy(os.path.join(os.path.dirname(version_dir), "config.json"),
                    os.path.join(repo, m))
        shutil.copy(os.path.join(version_dir, "model.onnx"), os.path.join(repo, m, version))
    bodies_dir = os.path.join(args.out, "bodies")
    examples = [m for m in args.models if m != "forest"]
    extra = [f"--x-bin=forest={os.path.join(args.forest_dir, 'x.bin')}:16"] \
        if "forest" in args.models else []
    batches = sorted({b for b, _ in args.cells} | {1})
    subprocess.run([sys.executable, os.path.join(HERE, "make_bodies.py"),
                    os.path.join(ROOT, "examples", "models"), args.version, bodies_dir, *examples,
                    *[f"--batch={b}" for b in batches], *extra], check=True)
    bodies: dict[tuple, str] = {(m, "pa"): os.path.join(bodies_dir, f"{m}.pa.json")
                                for m in args.models}
    bodies.update({(m, b): os.path.join(bodies_dir, f"{m}-b{b}.json")
                   for m in args.models for b in batches})
    mlserver_repo = make_mlserver_repo(args.out, args.model_dirs, args.port)
    servers = server_variants(args, repo, mlserver_repo)
    variants = [v for v in ORDER if v in wanted and (v in servers or v.endswith("-inproc"))]
    if "mlserver" in wanted and "mlserver" not in servers:
        log("mlserver: not installed, not measured")

    rows: list[dict] = []
    raw = open(os.path.join(args.out, "results.jsonl"), "a")
    for rnd in range(args.rounds):
        # Rotate the order every round so that slow drifts in background
        # load spread over all variants.
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        log(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}; load {os.getloadavg()[0]:.2f}")
        for v in order:
            try:
                got = (measure_inproc(v, args, bodies, rnd) if v.endswith("-inproc")
                       else measure_server(v, servers[v], args, bodies, rnd, args.out))
            except (RuntimeError, subprocess.CalledProcessError) as e:
                log(f"{v}: failed in round {rnd + 1}: {e}")
                got = []
            for r in got:
                raw.write(json.dumps(r) + "\n")
            raw.flush()
            rows.extend(got)
    summary = summarize(rows, args)
    summary["settings"] = {"duration_s": args.duration, "warmup_s": args.warmup,
                           "rounds": args.rounds, "version": args.version,
                           "cells": args.cells, "loads": args.loads,
                           "server_core": SERVER_CORE, "load_core": LOAD_CORE}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(summary)


if __name__ == "__main__":
    main()
