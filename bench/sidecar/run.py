"""Sidecar benchmark driver (see bench/sidecar.sh): every server variant and
the in-process floors, interleaved over rounds, one load generator (wrk).

Servers run pinned to core 0, wrk to core 1. Per measurement it records
wrk's req/s, p50, p99 and errors, the server's CPU time per request, and how
busy each core was with *other* work (noise from other jobs on the machine).
Raw results: OUT/results.jsonl; summary: OUT/summary.json and the table on
stdout.
"""
import argparse
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
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{seconds}s",
           "--timeout", "10s", "-s", os.path.join(HERE, "post.lua"), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"wrk printed no result:\n{out}")


def server_variants(args, repo: str, mlserver_repo: str) -> dict[str, dict]:
    v = {}
    for inst in (1, 2):
        v[f"sidecar-i{inst}"] = {
            "cmd": [args.sidecar_bin, "--model-repository", repo, "--listen",
                    f"127.0.0.1:{args.port}", "--instances", str(inst)],
            "env": {"RUST_LOG": "info"},
        }
    v["fastapi"] = {
        "cmd": [args.python, os.path.join(HERE, "fastapi_server.py"), "--model-repository", repo,
                "--port", str(args.port), "--threads", "1"],
        "env": {},
    }
    if args.mlserver:
        v["mlserver"] = {
            "cmd": [args.mlserver, "start", mlserver_repo],
            "env": {"PYTHONPATH": HERE},
        }
    return v


def make_mlserver_repo(out: str, models: list[str], version: str, port: int) -> str:
    repo = os.path.join(out, "mlserver-repo")
    os.makedirs(repo, exist_ok=True)
    with open(os.path.join(repo, "settings.json"), "w") as f:
        # parallel_workers 0: inference in the server process, like the
        # sidecar (the default, 1, adds a worker process and a queue hop).
        json.dump({"host": "127.0.0.1", "http_port": port, "grpc_port": port + 1,
                   "metrics_port": port + 2, "parallel_workers": 0, "debug": False}, f)
    for m in models:
        d = os.path.join(repo, m)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model-settings.json"), "w") as f:
            json.dump({"name": m, "implementation": "mlserver_onnx.OnnxRuntime",
                       "parameters": {"uri": os.path.join(ROOT, "examples", "models", m, version,
                                                          "model.onnx"),
                                      "version": version, "extra": {"threads": 1}}}, f)
    return repo


def measure_server(name: str, spec: dict, args, bodies: dict, rnd: int, out: str) -> list[dict]:
    logf = open(os.path.join(out, f"{name}-r{rnd}.log"), "w")
    env = dict(os.environ, **spec["env"])
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, *spec["cmd"]], env=env, stdout=logf,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{args.port}/v2/health/ready", proc)
        for model in args.models:
            with open(bodies[model], "rb") as f:
                check_answer(args.port, model, f.read())
            for conc in args.concurrency:
                if args.warmup > 0:
                    wrk(args.port, model, bodies[model], conc, args.warmup)
                cpu0, busy0, t0 = tree_cpu_s(proc.pid), core_busy_s(), time.time()
                r = wrk(args.port, model, bodies[model], conc, args.duration)
                cpu1, busy1, t1 = tree_cpu_s(proc.pid), core_busy_s(), time.time()
                wall = t1 - t0
                server_cpu = cpu1 - cpu0
                c0 = (busy1[SERVER_CORE] - busy0[SERVER_CORE]) / wall
                c1 = (busy1[LOAD_CORE] - busy0[LOAD_CORE]) / wall
                n = max(r["requests"], 1)
                row = {
                    "round": rnd, "variant": name, "model": model, "conc": conc,
                    "req_s": r["requests"] / (r["duration_us"] / 1e6),
                    "p50_us": r["p50_us"], "p99_us": r["p99_us"], "mean_us": r["mean_us"],
                    "errors": r["err_status"] + r["err_connect"] + r["err_read"] + r["err_write"]
                    + r["err_timeout"],
                    "server_cpu_us_per_req": server_cpu * 1e6 / n,
                    "core0_busy": round(c0, 3),
                    # Work on core 0 that was not the server: other jobs.
                    "core0_other": round(max(c0 - server_cpu / wall, 0.0), 3),
                    "core1_busy": round(c1, 3),
                    "loadavg": os.getloadavg()[0],
                }
                rows.append(row)
                log(f"r{rnd} {name:11s} {model:10s} c{conc:<3d} {row['req_s']:8.0f} req/s "
                    f"p50 {row['p50_us']:8.0f} us p99 {row['p99_us']:8.0f} us "
                    f"cpu/req {row['server_cpu_us_per_req']:6.0f} us "
                    f"core0 other {row['core0_other']:.2f} err {row['errors']}")
    finally:
        stop(proc)
        logf.close()
    return rows


def measure_inproc(name: str, args, bodies: dict, rnd: int) -> list[dict]:
    rows = []
    for model in args.models:
        onnx_dir = os.path.join(ROOT, "examples", "models", model, args.version)
        if name == "tract-inproc":
            cmd = [args.engine_bench, onnx_dir, bodies[model], str(args.duration)]
        else:
            cmd = [args.python, os.path.join(HERE, "ort_inproc.py"),
                   os.path.join(onnx_dir, "model.onnx"), bodies[model], str(args.duration)]
        busy0, t0 = core_busy_s(), time.time()
        out = subprocess.run(["taskset", "-c", SERVER_CORE, *cmd], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        busy1, t1 = core_busy_s(), time.time()
        r = json.loads(out.strip().splitlines()[-1])
        c0 = (busy1[SERVER_CORE] - busy0[SERVER_CORE]) / (t1 - t0)
        row = {"round": rnd, "variant": name, "model": model, "conc": 1, "req_s": r["req_s"],
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
        groups.setdefault((r["model"], r["conc"], r["variant"]), []).append(r)
    table = []
    for (model, conc, variant), rs in sorted(groups.items(), key=lambda kv: (
            args.models.index(kv[0][0]), kv[0][1], ORDER.index(kv[0][2]) if kv[0][2] in ORDER
            else 99)):
        entry = {"model": model, "conc": conc, "variant": variant, "rounds": len(rs)}
        for k in ("req_s", "p50_us", "p99_us", "server_cpu_us_per_req", "core0_other"):
            xs = [r[k] for r in rs]
            entry[k] = {"median": med(xs), "min": min(xs), "max": max(xs)}
        entry["errors"] = sum(r["errors"] for r in rs)
        table.append(entry)
    return {"table": table, "targets": targets(groups, args)}


def targets(groups: dict, args) -> list[dict]:
    """The sidecar targets at concurrency 8 on the MLP, per sidecar variant."""
    model = "digits-mlp"
    out = []
    tract = groups.get((model, 1, "tract-inproc"), [])
    for sc in ("sidecar-i1", "sidecar-i2"):
        s = groups.get((model, 8, sc), [])
        if not s:
            continue
        s_rps = med([r["req_s"] for r in s])
        for base, want in (("fastapi", 5.0), ("mlserver", 3.0)):
            b = groups.get((model, 8, base), [])
            if b:
                ratio = s_rps / med([r["req_s"] for r in b])
                out.append({"sidecar": sc, "target": f"req/s >= {want:g}x {base}",
                            "value": round(ratio, 2), "met": ratio >= want})
        if tract:
            limit = 1.2 * med([r["p50_us"] for r in tract]) + 100
            for conc in (1, 8):
                sp = groups.get((model, conc, sc), [])
                if sp:
                    p50 = med([r["p50_us"] for r in sp])
                    out.append({"sidecar": sc,
                                "target": f"p50 at c{conc} <= 1.2 x tract p50 + 100 us "
                                          f"({limit:.0f} us)",
                                "value": round(p50, 1), "met": p50 <= limit})
    return out


ORDER = ["tract-inproc", "ort-inproc", "sidecar-i1", "sidecar-i2", "fastapi", "mlserver"]


def fmt_range(d: dict, digits: int = 0) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"


def print_table(summary: dict) -> None:
    print("median over rounds (min-max); in-process rows: one caller, batch 1")
    hdr = f"{'model':10s} {'conc':>4s} {'variant':12s} {'req/s':>22s} {'p50 us':>22s} " \
          f"{'p99 us':>24s} {'cpu us/req':>11s} {'core0 other':>11s} {'err':>4s}"
    print(hdr)
    print("-" * len(hdr))
    for e in summary["table"]:
        print(f"{e['model']:10s} {e['conc']:>4d} {e['variant']:12s} {fmt_range(e['req_s']):>22s} "
              f"{fmt_range(e['p50_us']):>22s} {fmt_range(e['p99_us']):>24s} "
              f"{e['server_cpu_us_per_req']['median']:>11.0f} "
              f"{e['core0_other']['median']:>11.2f} {e['errors']:>4d}")
    print()
    print("targets (digits-mlp):")
    for t in summary["targets"]:
        print(f"  {t['sidecar']:10s} {t['target']:45s} {t['value']:>9} "
              f"{'met' if t['met'] else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sidecar-bin", required=True)
    p.add_argument("--engine-bench", required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--mlserver", default="")
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--version", default="2", help="model version served and measured")
    p.add_argument("--models", default="digits-mlp,tiny-cnn")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--variants", default=",".join(ORDER))
    args = p.parse_args()
    args.models = args.models.split(",")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    wanted = args.variants.split(",")
    os.makedirs(args.out, exist_ok=True)

    # The servers see a repository with only the measured models, newest
    # version = args.version, and the example config.json unchanged.
    repo = os.path.join(args.out, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    for m in args.models:
        src = os.path.join(ROOT, "examples", "models", m)
        os.makedirs(os.path.join(repo, m, args.version))
        shutil.copy(os.path.join(src, "config.json"), os.path.join(repo, m))
        shutil.copy(os.path.join(src, args.version, "model.onnx"),
                    os.path.join(repo, m, args.version))
    bodies_dir = os.path.join(args.out, "bodies")
    subprocess.run([sys.executable, os.path.join(HERE, "make_bodies.py"),
                    os.path.join(ROOT, "examples", "models"), args.version, bodies_dir, *args.models],
                   check=True)
    bodies = {m: os.path.join(bodies_dir, f"{m}.json") for m in args.models}
    mlserver_repo = make_mlserver_repo(args.out, args.models, args.version, args.port)
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
                           "server_core": SERVER_CORE, "load_core": LOAD_CORE}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(summary)


if __name__ == "__main__":
    main()
