#!/usr/bin/env python3
"""Instructions per request: the filter variants of run_filters.py, counted
by valgrind (callgrind) inside a real Envoy instead of timed.

Started by bench/filters-instructions.sh. Wall-clock CPU per request on a
shared 2-core machine moves by tens of percent between rounds; an
instruction count does not depend on what else runs, so two variants can
be compared to a few percent in one short run, on a busy machine too.

For each variant: Envoy (--concurrency 1) runs under callgrind with the
variant's config (the same configs, routes and filters as
run_filters.py); WARMUP_REQUESTS requests warm it (V8 compiles and tiers
the module up), the counters are zeroed, then REQUESTS requests are sent
at RATE req/s (one keep-alive connection, GET PATH with x-user-id:
user-k, or the variant's request set), and the counters are dumped. The
rate is fixed so that timer work (failover's 10 ms tick, the stats flush)
weighs on each request as it would at that rate outside valgrind; then
the same Envoy idles IDLE_S seconds to count its timers alone, and the
"net" column takes that rate times the window's length out (at a real
proxy's thousands of requests per second a tick costs each request next
to nothing; at valgrind's 50 per second it would not).

What is counted: every instruction Envoy executes in the window, in all
its threads: the connection, the HTTP codec, the filters (V8's JIT code
and the host calls it makes), the router and the upstream request. The
"added" column is a variant's count per request minus native's: what the
Wasm filter costs in instructions. It does not weigh instructions by
their cost (a cache miss counts as one), so it tracks CPU time closely
for the same code and less for different code; BENCHMARKS.md has both.
"""

import glob
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import run_filters as rf  # noqa: E402

REQUESTS = int(os.environ.get("REQUESTS", "1000"))
WARMUP_REQUESTS = int(os.environ.get("WARMUP_REQUESTS", "2000"))
RATE = float(os.environ.get("COUNT_RATE", "50"))
IDLE_S = float(os.environ.get("IDLE_S", "5"))
# VARIANT@NAME runs VARIANT with bench/results/wasm/ab/NAME.wasm as the module.
VARIANTS = os.environ.get(
    "VARIANTS", "native,noop,hash,module-canary,module-router+canary,module-chain,module-unconcerned").split(",")


def request_for(variant, k):
    """(method, path, body) of request k of the variant's request set."""
    make = rf.REQUEST_SETS[rf.ALL_VARIANTS[variant].requests]
    if make is None:
        return "GET", rf.PATH, None
    return make(k)


def send(conn, variant, k):
    method, path, body = request_for(variant, k)
    headers = {rf.KEY_HEADER: f"user-{k % rf.KEYS}"}
    if body is not None:
        headers["content-type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def drive(variant, n, rate):
    """n requests on one connection, paced at `rate` when given; returns
    (non-2xx count, seconds behind schedule at the end)."""
    conn = http.client.HTTPConnection("127.0.0.1", rf.LISTEN, timeout=60)
    bad, t0, lag = 0, time.monotonic(), 0.0
    for k in range(n):
        if rate:
            due = t0 + k / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                lag = now - due
        if send(conn, variant, k) // 100 != 2:
            bad += 1
    conn.close()
    return bad, lag


def callgrind(pid, flag):
    subprocess.run(["callgrind_control", flag, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def total_ir(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no totals in {path}")


def count(variant, workdir):
    cfg = os.path.join(workdir, f"envoy-{variant}.yaml")
    with open(cfg, "w") as f:
        f.write(rf.envoy_config(variant))
    out = os.path.join(workdir, f"callgrind-{variant}.out")
    logf = open(os.path.join(workdir, f"envoy-{variant}.log"), "w")
    cmd = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", f"--callgrind-out-file={out}",
           "--dump-instr=no", "--compress-strings=no", "--compress-pos=no",
           rf.ENVOY, "-c", cfg, "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        rf.wait_for(lambda: p.poll() is None and rf.http_get(f"http://127.0.0.1:{rf.ADMIN}/ready")[0] == 200,
                    f"envoy ({variant}) ready under valgrind", timeout=600)
        bad_warm, _ = drive(variant, WARMUP_REQUESTS, 0)
        for old in glob.glob(out + "*"):
            os.remove(old)
        callgrind(p.pid, "-z")
        t0 = time.monotonic()
        bad, lag = drive(variant, REQUESTS, RATE)
        busy_s = time.monotonic() - t0
        ir = dump(p.pid, out, variant)
        # The same Envoy idle: its timers (the module's tick, the stats
        # flush) per second, to take out of the window.
        callgrind(p.pid, "-z")
        t0 = time.monotonic()
        time.sleep(IDLE_S)
        idle_ir = dump(p.pid, out, variant)
        idle_s = time.monotonic() - t0
    finally:
        rf.stop(p)
    idle_per_s = idle_ir / idle_s
    return {"variant": variant, "requests": REQUESTS, "ir": ir, "ir_per_request": ir / REQUESTS,
            "busy_s": busy_s, "idle_ir_per_s": idle_per_s,
            "ir_per_request_net": (ir - idle_per_s * busy_s) / REQUESTS,
            "non_2xx": bad + bad_warm, "lag_s": lag}


def dump(pid, out, variant):
    """Dumps the counters since the last zero; returns the instructions."""
    before = set(glob.glob(out + "*"))
    callgrind(pid, "-d")
    new = set(glob.glob(out + "*")) - before
    if not new:
        raise RuntimeError(f"{variant}: callgrind wrote no dump")
    return sum(total_ir(d) for d in new)


def register_ab(variant):
    """`VARIANT@NAME`: the variant with bench/results/wasm/ab/NAME.wasm in
    place of the shipped module (an A/B of two builds in one run)."""
    base, _, name = variant.partition("@")
    if not name or base not in rf.ALL_VARIANTS:
        return
    wasm = os.path.join(rf.WASM_DIR, "ab", f"{name}.wasm")
    if not os.path.isfile(wasm):
        sys.exit(f"{variant}: {wasm} not found")
    var = rf.ALL_VARIANTS[base]
    filters = [f._replace(wasm=wasm) if f.wasm == rf.MODULE_WASM else f for f in var.filters]
    rf.ALL_VARIANTS[variant] = var._replace(filters=filters, description=f"{var.description} ({name}.wasm)")


def main():
    for v in VARIANTS:
        register_ab(v)
    unknown = [v for v in VARIANTS if v not in rf.ALL_VARIANTS]
    if unknown:
        sys.exit(f"unknown VARIANTS {unknown}; known: {', '.join(rf.ALL_VARIANTS)}")
    os.makedirs(rf.RESULTS, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="count-", dir=rf.RESULTS)
    up_log = open(os.path.join(workdir, "upstream.log"), "w")
    upstream = subprocess.Popen([rf.TOOLS, "upstream"] +
                                [a for port in rf.UPSTREAMS.values() for a in ("--listen", f"127.0.0.1:{port}")],
                                stdout=up_log, stderr=subprocess.STDOUT)
    results = []
    try:
        rf.wait_for(lambda: upstream.poll() is None and rf.hits() is not None, "upstream")
        for v in VARIANTS:
            r = count(v, workdir)
            results.append(r)
            note = f"  NON-2XX {r['non_2xx']}" if r["non_2xx"] else ""
            if r["lag_s"] > 1:
                note += f"  (behind the {RATE:.0f}/s schedule by {r['lag_s']:.1f} s)"
            rf.log(f"{v:<24} {r['ir_per_request'] / 1000:9.1f} k instructions/request, "
                   f"{r['ir_per_request_net'] / 1000:.1f} k net of {r['idle_ir_per_s'] / 1000:.1f} k/s idle{note}")
    finally:
        upstream.terminate()
        upstream.wait(5)
    by = {r["variant"]: r for r in results}
    base = lambda v: by.get(rf.ALL_VARIANTS[v].baseline)  # noqa: E731
    hash_added = None
    if "hash" in by and base("hash"):
        hash_added = by["hash"]["ir_per_request_net"] - base("hash")["ir_per_request_net"]
    envoy = subprocess.run([rf.ENVOY, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"envoy: {envoy}\n{REQUESTS} requests per variant at {RATE:.0f}/s after {WARMUP_REQUESTS} warm-up; "
          f"callgrind instruction counts (k = 1000 instructions)")
    print("| variant | k instr/req | idle k instr/s (timers) | k instr/req net of timers | added k instr/req | × hash filter |")
    print("|---|---|---|---|---|---|")
    for r in results:
        b = base(r["variant"])
        added = r["ir_per_request_net"] - b["ir_per_request_net"] if b else None
        ratio = f"{added / hash_added:.2f}" if added is not None and hash_added else ""
        added_s = f"{added / 1000:+.1f}" if added is not None and r["variant"] != b["variant"] else ""
        print(f"| {r['variant']} | {r['ir_per_request'] / 1000:.1f} | {r['idle_ir_per_s'] / 1000:.1f} | "
              f"{r['ir_per_request_net'] / 1000:.1f} | {added_s} | {ratio} |")
    out = os.path.join(rf.RESULTS, f"count-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump({"envoy": envoy, "requests": REQUESTS, "warmup": WARMUP_REQUESTS, "rate": RATE,
                   "results": results}, f, indent=1)
    rf.log(f"raw results: {out}")


if __name__ == "__main__":
    main()
