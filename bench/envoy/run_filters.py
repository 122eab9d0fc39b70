#!/usr/bin/env python3
"""Filter benchmark driver: Envoy native weighted_clusters vs Wasm filters.

Started by bench/filters.sh, which builds and installs everything first.
Standard library only. For each round and each variant (order rotated every
round) it starts a fresh Envoy (--concurrency 1, pinned to core 0), checks
routing, then measures:

  sat    closed loop, wrk -t1 -c16 pinned to core 1: throughput, and Envoy
         CPU per request from /proc/<pid>/stat (utime+stime) / requests
  paced  open loop at RATE req/s (bench-tools paced, core 1): latency from
         the scheduled send time, and Envoy CPU per request

Requests are GET PATH with x-user-id: user-N (N < KEYS) or, for the
model-router variants, the lines of a requests file written per run
(pinned OIP paths, or POST /predict with a 300-byte OIP body that names the
version); every tenth key asks for version 2. Routing is checked with probe
requests before the load and over every window (v2 share near 0.10, the
default cluster never hit); a failed check stops the run.

The upstream (bench-tools upstream, one tokio thread) is pinned to core 1
with the load generator. Raw results go to bench/results/filters-*.json and
a per-run CSV; the summary table goes to stdout.
"""

import csv
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import NamedTuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RESULTS = os.path.join(ROOT, "bench", "results")
ENVOY = os.environ.get("ENVOY", os.path.join(ROOT, ".tools", "bin", "envoy"))
TOOLS = os.environ.get("BENCH_TOOLS", os.path.join(ROOT, "target", "release", "bench-tools"))
WASM_DIR = os.environ.get("BENCH_WASM_DIR", os.path.join(RESULTS, "wasm"))
# The shipped module, and the three single-stage modules it replaced (built
# by bench/filters.sh from OLD_REF, for the side-by-side comparison).
MODULE_WASM = os.environ.get("MODULE_WASM", os.path.join(ROOT, "dist", "infermesh.wasm"))
OLD_DIR = os.path.join(WASM_DIR, "old")
CANARY_WASM = os.environ.get("CANARY_WASM", os.path.join(OLD_DIR, "canary.wasm"))
ROUTER_WASM = os.environ.get("ROUTER_WASM", os.path.join(OLD_DIR, "model-router.wasm"))
FAILOVER_WASM = os.environ.get("FAILOVER_WASM", os.path.join(OLD_DIR, "failover.wasm"))

ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = int(os.environ.get("DURATION", "10"))
WARMUP = int(os.environ.get("WARMUP", "2"))
RATE = float(os.environ.get("RATE", "3000"))
CONNS = int(os.environ.get("CONNS", "16"))
PACED_CONNS = int(os.environ.get("PACED_CONNS", "8"))
KEYS = int(os.environ.get("KEYS", "1000"))
BASE_PORT = int(os.environ.get("BASE_PORT", "28080"))
ENVOY_CORE = os.environ.get("ENVOY_CORE", "0")
LOAD_CORE = os.environ.get("LOAD_CORE", "1")
VARIANTS = os.environ.get(
    "VARIANTS", "native,noop,hash,module-canary,module-router+canary,module-chain,module-unconcerned").split(",")
# A window is "clean" when other processes used at most this share of
# Envoy's core during it; the second table uses clean windows only.
CLEAN_MAX = float(os.environ.get("CLEAN_MAX", "0.10"))
# Envoy, the load generators and the upstream run at this nice level, so
# that builds and tests sharing the machine take less CPU from them.
NICE = os.environ.get("NICE", "-10" if os.geteuid() == 0 else "0")

PATH = "/v2/models/digits-mlp/infer"
KEY_HEADER = "x-user-id"
LISTEN, ADMIN = BASE_PORT, BASE_PORT + 10
UPSTREAMS = {"v1": BASE_PORT + 1, "v2": BASE_PORT + 2, "default": BASE_PORT + 3}
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Per-window routing check: the v2 share must lie in this range (expected
# 0.10) and at most this share of answers may be non-2xx.
V2_SHARE_RANGE = (0.05, 0.15)
MAX_NON_2XX_SHARE = 0.005

CANARY_CFG = {
    "splits": [{"model": "digits-mlp",
                "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}]}],
    "sticky_key": [{"header": KEY_HEADER}],
}
# model-router, path source: defaults (strips client x-infermesh-*, sets
# x-infermesh-served-by on pinned requests, no path rewrite).
ROUTER_CFG = {"models": [{"name": "digits-mlp", "versions": ["1", "2"]}]}
# model-router, body source: the model comes from default_model, only the
# version from the body, so the version pointer is the one field read.
ROUTER_BODY_CFG = {**ROUTER_CFG, "default_model": "digits-mlp",
                   "body": {"version_pointer": "/parameters/model_version"}}
BODY_PATH = "/predict"
# failover: three clouds on the three bench clusters, all healthy; probes
# every 5 minutes (one round at start), so the load windows measure the
# per-request path: pick, header, route cache, body copy, served-by.
FAILOVER_CFG = {
    "clouds": [{"name": "aws", "cluster": "v1", "priority": 0},
               {"name": "gcp", "cluster": "v2", "priority": 1},
               {"name": "azure", "cluster": "default", "priority": 2}],
    "health": {"probe": {"interval_ms": 300000, "timeout_ms": 1000}},
}


def body_for(k, version):
    """A 300-byte OIP v2 infer request naming `version` in
    /parameters/model_version (one 8x8 digit as 64 values)."""
    pixels = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0,
              0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0,
              0, 0, 6, 13, 10, 0, 0, 0]
    return json.dumps({"id": f"bench-{k % 10**8:08d}", "parameters": {"model_version": version},
                       "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}],
                       "outputs": [{"name": "label"}]}, separators=(",", ":"))


def version_for(k):
    """Client-chosen version of key k: every tenth key asks for 2 (v2 share 0.10)."""
    return "2" if k % 10 == 0 else "1"


# Request sets. "get": GET PATH with the key header (wrk-keys.lua's and the
# paced client's built-in mode). The others are written to a requests file,
# line k sent with x-user-id: user-k, read by both load generators.
REQUEST_SETS = {
    "get": None,
    "pinned": lambda k: ("GET", f"/v2/models/digits-mlp/versions/{version_for(k)}/infer", None),
    "post": lambda k: ("POST", BODY_PATH, body_for(k, version_for(k))),
    "post-pinned": lambda k: ("POST", f"/v2/models/digits-mlp/versions/{version_for(k)}/infer",
                              body_for(k, version_for(k))),
}


class Filter(NamedTuple):
    wasm: str            # file name in WASM_DIR, or an absolute path
    config: str          # pluginConfig string
    root_id: str
    stop_iteration: bool = False  # allow_on_headers_stop_iteration (body buffering)


class Variant(NamedTuple):
    filters: list        # Wasm filters in chain order (after CORS, before the router)
    routes: str          # "weighted": weighted_clusters 90/10; "header": x-infermesh-version
    requests: str        # key of REQUEST_SETS
    baseline: str        # variant its "added" and "ratio" are paired with
    description: str


def wasm1(wasm, cfg, root_id="bench"):
    return [Filter(wasm, cfg, root_id)]


CANARY = lambda cfg: Filter(CANARY_WASM, json.dumps(cfg), "canary")  # noqa: E731
FAILOVER = lambda cfg: Filter(FAILOVER_WASM, json.dumps(cfg), "failover")  # noqa: E731
MODULE = lambda sections: Filter(MODULE_WASM, json.dumps(sections), "infermesh")  # noqa: E731


def has_stage(var, old_wasm, section):
    """Whether a variant runs a stage: its old single-stage module, or the
    module with that section."""
    return any(f.wasm == old_wasm or (f.wasm == MODULE_WASM and section in json.loads(f.config))
               for f in var.filters)


ALL_VARIANTS = {
    "native": Variant([], "weighted", "get", "native", "Envoy weighted_clusters 90/10, no Wasm"),
    "noop": Variant(wasm1("noop.wasm", ""), "weighted", "get", "native", "no-op V8 filter + weighted_clusters"),
    "hash": Variant(wasm1("hash-route.wasm", ""), "header", "get", "native", "minimal header-hash filter"),
    "canary": Variant([CANARY(CANARY_CFG)], "header", "get", "native", "canary (dist/canary.wasm), defaults"),
    # Attribution experiments: the minimal filter plus one canary cost each.
    "hash+path": Variant(wasm1("hash-route.wasm", "path"), "header", "get", "native", "hash + read :path"),
    "hash+strip": Variant(wasm1("hash-route.wasm", "strip"), "header", "get", "native",
                          "hash + whole header map, strip x-infermesh-*"),
    "hash+metric": Variant(wasm1("hash-route.wasm", "metric"), "header", "get", "native", "hash + increment_metric"),
    "hash+servedby": Variant(wasm1("hash-route.wasm", "served-by"), "header", "get", "native",
                             "hash + format/set response header"),
    "hash+remove1": Variant(wasm1("hash-route.wasm", "remove=x-infermesh-model"), "header", "get", "native",
                            "hash + remove one absent request header blindly"),
    "hash+remove3": Variant(wasm1("hash-route.wasm", "remove=x-infermesh-model remove=x-infermesh-cloud "
                                                     "remove=x-infermesh-debug"), "header", "get", "native",
                            "hash + remove three absent request headers blindly"),
    "hash+clock": Variant(wasm1("hash-route.wasm", "clock"), "header", "get", "native", "hash + one clock read"),
    "hash+all": Variant(wasm1("hash-route.wasm", "path strip metric served-by"), "header", "get", "native",
                        "hash + all four"),
    # Canary config switches (same module).
    "canary-noserved": Variant([CANARY({**CANARY_CFG, "served_by_header": False})], "header", "get", "native",
                               "canary, served_by_header=false"),
    "canary-trust": Variant([CANARY({**CANARY_CFG, "trust_downstream_headers": True})], "header", "get", "native",
                            "canary, trust_downstream_headers=true (no strip)"),
    # model-router (dist/model-router.wasm).
    "native-post": Variant([], "weighted", "post", "native",
                           "weighted_clusters 90/10, POST /predict with the 300-byte body, no Wasm"),
    "router": Variant([Filter(ROUTER_WASM, json.dumps(ROUTER_CFG), "model-router")], "header", "pinned", "native",
                      "model-router, path source: GET /v2/models/digits-mlp/versions/{1,2}/infer"),
    "router-body": Variant([Filter(ROUTER_WASM, json.dumps(ROUTER_BODY_CFG), "model-router", True)], "header",
                           "post", "native-post",
                           "model-router, body source: POST /predict, version from /parameters/model_version"),
    # Attribution: the router-body filter and config, the same body, but the
    # path names the version, so the body is neither buffered nor read.
    "router-post": Variant([Filter(ROUTER_WASM, json.dumps(ROUTER_BODY_CFG), "model-router", True)], "header",
                           "post-pinned", "native-post",
                           "router-body's filter and config, POST the same body to a pinned OIP path (body unread)"),
    "router+canary": Variant([Filter(ROUTER_WASM, json.dumps(ROUTER_CFG), "model-router"),
                              CANARY({**CANARY_CFG, "trust_downstream_headers": True})], "header", "get", "native",
                             "model-router then canary (trust_downstream_headers), unpinned GET"),
    # failover (dist/failover.wasm): routes match x-infermesh-cloud.
    "failover": Variant([FAILOVER(FAILOVER_CFG)], "cloud", "get", "native",
                        "failover alone, 3 healthy clouds; aws's route is weighted_clusters 90/10"),
    "failover-post": Variant([FAILOVER(FAILOVER_CFG)], "cloud", "post", "native-post",
                             "failover, POST /predict with the 300-byte body (copied for replay)"),
    "router+canary+failover": Variant([Filter(ROUTER_WASM, json.dumps(ROUTER_CFG), "model-router"),
                                       CANARY({**CANARY_CFG, "trust_downstream_headers": True}),
                                       FAILOVER({**FAILOVER_CFG, "trust_downstream_headers": True})],
                                      "cloud+version", "get", "native",
                                      "the three filters, unpinned GET; routes match cloud and version"),
    # The one module (dist/infermesh.wasm): the same stages and configs as
    # the variants above, one filter, one pass.
    "module-canary": Variant([MODULE({"canary": CANARY_CFG})], "header", "get", "native",
                             "infermesh.wasm, canary section only"),
    # The same split with a guard (all three rules; the upstream is healthy,
    # so it never trips): the guard's per-request bookkeeping.
    "module-canary-guard": Variant([MODULE({"canary": {**CANARY_CFG, "splits": [
        {**CANARY_CFG["splits"][0], "guard": {"window_s": 10, "max_error_rate": 5,
                                              "max_error_rate_over_baseline": 2,
                                              "max_p99_ms_over_baseline": 100}}]}})],
        "header", "get", "native", "infermesh.wasm, canary section with a guard"),
    "module-router+canary": Variant([MODULE({"router": ROUTER_CFG, "canary": CANARY_CFG})], "header", "get",
                                    "native", "infermesh.wasm, router + canary sections, unpinned GET"),
    "module-chain": Variant([MODULE({"router": ROUTER_CFG, "canary": CANARY_CFG, "failover": FAILOVER_CFG})],
                            "cloud+version", "get", "native",
                            "infermesh.wasm, router + canary + failover, unpinned GET"),
    # The chain with the canary guard: the guard and failover both want
    # the clock and the response's :status.
    "module-chain-guard": Variant([MODULE({"router": ROUTER_CFG, "canary": {**CANARY_CFG, "splits": [
        {**CANARY_CFG["splits"][0], "guard": {"window_s": 10, "max_error_rate": 5,
                                              "max_error_rate_over_baseline": 2,
                                              "max_p99_ms_over_baseline": 100}}]},
        "failover": FAILOVER_CFG})],
        "cloud+version", "get", "native", "infermesh.wasm, router + canary with a guard + failover"),
    "module-failover": Variant([MODULE({"failover": FAILOVER_CFG})], "cloud", "get", "native",
                               "infermesh.wasm, failover section only"),
    "module-chain-post": Variant([MODULE({"router": ROUTER_CFG, "canary": CANARY_CFG, "failover": FAILOVER_CFG})],
                                 "cloud+version", "post-pinned", "native-post",
                                 "infermesh.wasm, all three, POST 300-byte body to a pinned path (copied for replay)"),
    # A request no stage concerns: the split is for another model, so the
    # module decides nothing and Envoy's own weighted_clusters route it.
    "module-unconcerned": Variant([MODULE({"canary": {**CANARY_CFG, "splits": [
        {"model": "other-model", "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}]}]}})],
        "weighted", "get", "native", "infermesh.wasm, canary for another model (request unconcerned)"),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cluster(name, port):
    return (f"  - {{name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: "
            f"{{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: "
            f"{{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}}}\n")


def envoy_config(variant):
    var = ALL_VARIANTS[variant]
    if var.routes == "weighted":
        route_yaml = """              - match: {prefix: "/"}
                route:
                  weighted_clusters:
                    clusters: [{name: v1, weight: 90}, {name: v2, weight: 10}]
"""
    elif var.routes == "cloud":
        route_yaml = """              - match: {prefix: "/", headers: [{name: x-infermesh-cloud, string_match: {exact: aws}}]}
                route:
                  weighted_clusters:
                    clusters: [{name: v1, weight: 90}, {name: v2, weight: 10}]
              - match: {prefix: "/"}
                route: {cluster: default}
"""
    elif var.routes == "cloud+version":
        route_yaml = """              - match: {prefix: "/", headers: [{name: x-infermesh-cloud, string_match: {exact: aws}}, {name: x-infermesh-version, string_match: {exact: "1"}}]}
                route: {cluster: v1}
              - match: {prefix: "/", headers: [{name: x-infermesh-cloud, string_match: {exact: aws}}, {name: x-infermesh-version, string_match: {exact: "2"}}]}
                route: {cluster: v2}
              - match: {prefix: "/"}
                route: {cluster: default}
"""
    else:
        route_yaml = """              - match: {prefix: "/", headers: [{name: x-infermesh-version, string_match: {exact: "1"}}]}
                route: {cluster: v1}
              - match: {prefix: "/", headers: [{name: x-infermesh-version, string_match: {exact: "2"}}]}
                route: {cluster: v2}
              - match: {prefix: "/"}
                route: {cluster: default}
"""
    wasm_yaml = ""
    for i, f in enumerate(var.filters):
        path = f.wasm if os.path.isabs(f.wasm) else os.path.join(WASM_DIR, f.wasm)
        suffix = f"-{i}" if i else ""
        stop = "\n                allow_on_headers_stop_iteration: true" if f.stop_iteration else ""
        wasm_yaml += f"""          - name: bench-wasm{suffix}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench{suffix}
                root_id: {f.root_id}{stop}
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {path}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json.dumps(f.config)}
"""
    return f"""admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {LISTEN}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ing
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{route_yaml}          http_filters:
          - name: envoy.filters.http.cors
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}
{wasm_yaml}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{cluster("v1", UPSTREAMS["v1"])}{cluster("v2", UPSTREAMS["v2"])}{cluster("default", UPSTREAMS["default"])}"""


def http_get(url, headers=None, timeout=10.0, data=None):
    """One request (POST when `data` is given); error statuses are returned,
    not raised."""
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_for(pred, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what} (last error: {last})")


def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime, stime are fields 14, 15.
    return int(fields[11]) + int(fields[12])


def core_ticks():
    """Per-core (busy, total, steal) ticks from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                idle = v[3] + v[4]
                out[m.group(1)] = (sum(v[:8]) - idle, sum(v[:8]), v[7])
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def hits():
    _, _, body = http_get(f"http://127.0.0.1:{UPSTREAMS['v1']}/__hits")
    counts = json.loads(body)
    return {name: counts[str(port)] for name, port in UPSTREAMS.items()}


def rq_completed():
    _, _, body = http_get(f"http://127.0.0.1:{ADMIN}/stats?filter=^http.ing.downstream_rq_completed$")
    m = re.search(rb"downstream_rq_completed: (\d+)", body)
    if not m:
        raise RuntimeError(f"no downstream_rq_completed in admin stats: {body[:200]!r}")
    return int(m.group(1))


def filter_stats():
    """The filters' own counters (infermesh_*) from Envoy's admin stats."""
    _, _, body = http_get(f"http://127.0.0.1:{ADMIN}/stats?filter=infermesh")
    out = {}
    for line in body.decode(errors="replace").splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


class Window:
    """Envoy CPU, requests, upstream hits and core usage over one load run."""

    def __init__(self, pid):
        self.pid = pid

    def __enter__(self):
        self.rq0, self.hits0 = rq_completed(), hits()
        self.cores0, self.cpu0, self.t0 = core_ticks(), proc_cpu_ticks(self.pid), time.monotonic()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        self.wall = time.monotonic() - self.t0
        cpu = proc_cpu_ticks(self.pid) - self.cpu0
        cores = core_ticks()
        self.rq = rq_completed() - self.rq0
        h1 = hits()
        self.hits = {k: h1[k] - self.hits0[k] for k in h1}
        self.envoy_cpu_s = cpu / CLK_TCK
        self.cpu_us_per_rq = self.envoy_cpu_s * 1e6 / self.rq if self.rq else float("nan")
        d = {c: tuple(a - b for a, b in zip(cores[c], self.cores0[c])) for c in cores}
        busy_e, total_e, steal_e = d[ENVOY_CORE]
        busy_l, total_l, _ = d[LOAD_CORE]
        self.envoy_util = cpu / total_e if total_e else float("nan")
        # Core-0 time not spent by Envoy: other processes (another build or
        # test) competing with Envoy. The main noise indicator.
        self.other_on_envoy_core = max(0.0, (busy_e - cpu) / total_e) if total_e else float("nan")
        self.steal_on_envoy_core = steal_e / total_e if total_e else float("nan")
        self.load_core_busy = busy_l / total_l if total_l else float("nan")
        return False

    def record(self):
        total = sum(self.hits.values())
        return {
            "requests": self.rq, "wall_s": round(self.wall, 3),
            "envoy_cpu_s": self.envoy_cpu_s, "cpu_us_per_rq": self.cpu_us_per_rq,
            "envoy_util": self.envoy_util, "other_on_envoy_core": self.other_on_envoy_core,
            "steal_on_envoy_core": self.steal_on_envoy_core, "load_core_busy": self.load_core_busy,
            "upstream_hits": self.hits,
            "v2_share": self.hits["v2"] / total if total else float("nan"),
        }


def pinned(core, cmd):
    return ["nice", "-n", NICE, "taskset", "-c", core] + cmd


def write_requests(workdir):
    """Writes one requests file per request set that needs one; returns
    {set name: file or None}."""
    files = {}
    for name, make in REQUEST_SETS.items():
        if make is None:
            files[name] = None
            continue
        files[name] = os.path.join(workdir, f"requests-{name}.tsv")
        with open(files[name], "w") as f:
            for k in range(KEYS):
                method, path, body = make(k)
                f.write("\t".join([method, path] + ([body] if body is not None else [])) + "\n")
    return files


REQUEST_FILES = {}


def run_wrk(duration, variant):
    env = {**os.environ, "KEYS": str(KEYS), "BENCH_PATH": PATH, "KEY_HEADER": KEY_HEADER,
           "REQUESTS": REQUEST_FILES.get(ALL_VARIANTS[variant].requests) or ""}
    cmd = pinned(LOAD_CORE, ["wrk", "-t1", f"-c{CONNS}", f"-d{duration}s", "--latency",
                             "-s", os.path.join(ROOT, "bench", "envoy", "wrk-keys.lua"),
                             f"http://127.0.0.1:{LISTEN}{PATH}"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)s", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (m and rps):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    return {"wrk_requests": int(m.group(1)), "wrk_rps": float(rps.group(1)),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sock.group(1) if sock else "", "wrk_latency": lat}


def run_paced(duration, variant):
    requests = REQUEST_FILES.get(ALL_VARIANTS[variant].requests)
    what = ["--requests", requests] if requests else ["--path", PATH, "--keys", str(KEYS)]
    cmd = pinned(LOAD_CORE, [TOOLS, "paced", "--addr", f"127.0.0.1:{LISTEN}",
                             "--rate", str(RATE), "--duration", str(duration), "--warmup", str(WARMUP),
                             "--connections", str(PACED_CONNS), "--key-header", KEY_HEADER] + what)
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def start_envoy(variant, workdir):
    cfg = os.path.join(workdir, f"envoy-{variant}.yaml")
    with open(cfg, "w") as f:
        f.write(envoy_config(variant))
    logf = open(os.path.join(workdir, f"envoy-{variant}.log"), "w")
    p = subprocess.Popen(pinned(ENVOY_CORE, [ENVOY, "-c", cfg, "--concurrency", "1",
                                             "--disable-hot-restart", "-l", "warning"]),
                         stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: p.poll() is None and http_get(f"http://127.0.0.1:{ADMIN}/ready")[0] == 200,
                 f"envoy ({variant}) ready")
    except Exception:
        stop(p)
        with open(logf.name) as f:
            log(f.read()[-3000:])
        raise
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def probe(method, path, body=None, key="user-1"):
    """One request through Envoy; returns (status, served-by header, body,
    the upstream cluster it reached or None)."""
    h0 = hits()
    headers = {KEY_HEADER: key}
    if body is not None:
        headers["content-type"] = "application/json"
    status, resp_headers, resp = http_get(f"http://127.0.0.1:{LISTEN}{path}", headers,
                                          data=body.encode() if body is not None else None)
    h1 = hits()
    reached = [c for c in h1 if h1[c] != h0[c]]
    if len(reached) > 1:
        raise RuntimeError(f"one request reached several clusters: {reached}")
    served_by = {k.lower(): v for k, v in resp_headers.items()}.get("x-infermesh-served-by")
    return status, served_by, resp, reached[0] if reached else None


def check_routing(variant):
    """Probe requests before the load: each must answer 200 from the
    cluster it names (header-routed variants), and a router variant must
    answer an unknown version with its own 404."""
    var = ALL_VARIANTS[variant]
    routers = has_stage(var, ROUTER_WASM, "router")
    problems = []
    probes = []  # (method, path, body, expected cluster or None)
    if var.requests == "post":
        probes += [("POST", BODY_PATH, body_for(1, v), f"v{v}") for v in ("1", "2")]
    elif var.requests == "post-pinned":
        probes += [("POST", f"/v2/models/digits-mlp/versions/{v}/infer", body_for(1, v), f"v{v}")
                   for v in ("1", "2")]
    elif var.requests == "pinned" or routers:
        probes += [("GET", f"/v2/models/digits-mlp/versions/{v}/infer", None, f"v{v}") for v in ("1", "2")]
    if var.requests == "get":
        probes.append(("GET", PATH, None, None))
    seen = {}
    for method, path, body, want in probes:
        status, served_by, resp, reached = probe(method, path, body)
        seen[f"{method} {path} {(body or '')[40:70]}"] = [status, served_by, reached]
        if status != 200 or b"digits-mlp" not in resp:
            problems.append(f"{method} {path}: {status} {resp[:200]!r}")
        elif var.routes in ("weighted", "cloud"):
            # native-post routes the body requests at random: any version.
            if reached not in ("v1", "v2"):
                problems.append(f"{method} {path}: reached {reached}")
            if var.routes == "cloud" and (served_by or "").rsplit("@", 1)[-1] != "aws":
                problems.append(f"{method} {path}: served-by {served_by}, want ...@aws")
        elif (var.routes == "header" and want is not None and reached != want) or reached == "default":
            problems.append(f"{method} {path}: reached {reached}, want {want or 'v1 or v2'}")
        elif served_by is not None and "/" in served_by and \
                f"v{served_by.split('@', 1)[0].rsplit('/', 1)[-1]}" != reached:
            problems.append(f"{method} {path}: served-by {served_by} but reached {reached}")
        elif routers and served_by is None:
            # Every probe here names a version (or the canary picks one).
            problems.append(f"{method} {path}: no x-infermesh-served-by")
    if routers:
        # The router itself answers an unknown version; the upstream sees nothing.
        method, path, body = {
            "post": ("POST", BODY_PATH, body_for(1, "9")),
            "post-pinned": ("POST", "/v2/models/digits-mlp/versions/9/infer", body_for(1, "9")),
        }.get(var.requests, ("GET", "/v2/models/digits-mlp/versions/9/infer", None))
        status, _, resp, reached = probe(method, path, body)
        seen[f"{method} {path} version 9"] = [status, None, reached]
        if status != 404 or reached is not None or b"no version" not in resp:
            problems.append(f"unknown version: {status} {resp[:200]!r}, reached {reached}")
    if problems:
        raise RuntimeError(f"{variant}: routing check failed: " + "; ".join(problems))
    return seen


def check_window(variant, w, requests, non_2xx):
    """Routing over one load window: v2 share near 0.10, the default
    cluster never hit, next to no errors. Returns a list of problems."""
    problems = []
    lo, hi = V2_SHARE_RANGE
    if not lo <= w["v2_share"] <= hi:
        problems.append(f"v2 share {w['v2_share']:.3f} outside {lo}–{hi}")
    if w["upstream_hits"]["default"]:
        problems.append(f"default cluster hit {w['upstream_hits']['default']} times")
    if requests and non_2xx / requests > MAX_NON_2XX_SHARE:
        problems.append(f"{non_2xx} of {requests} answers not 2xx")
    return problems


# The router source every request of a variant must be counted under, and
# whether its requests name a version (pinned) or leave it to the canary.
ROUTER_EXPECT = {"router": ("path", True), "router-body": ("body", True), "router-post": ("path", True),
                 "router+canary": ("path", False), "module-router+canary": ("path", False),
                 "module-chain": ("path", False), "module-chain-guard": ("path", False),
                 "module-chain-post": ("path", True)}


def router_stats_problems(variant, stats):
    """From the router's own counters: every request of the run was routed
    from the expected source, none fell back from the body."""
    if variant not in ROUTER_EXPECT:
        return []
    source, pinned = ROUTER_EXPECT[variant]
    problems = [f"body fallback {k}: {n}" for k, n in stats.items() if "body_fallback" in k and n]
    routed = {k: n for k, n in stats.items() if "router_requests_total" in k and n}
    for k, n in routed.items():
        if f"source=.={source};" not in k:
            problems.append(f"{n} requests routed otherwise: {k}")
        elif pinned and "version=.=unpinned;" in k:
            problems.append(f"{n} requests not pinned: {k}")
    if sum(routed.values()) == 0:
        problems.append("the router counted no requests")
    return problems


def one_run(variant, rnd, workdir):
    load0 = loadavg()
    p = start_envoy(variant, workdir)
    try:
        if has_stage(ALL_VARIANTS[variant], FAILOVER_WASM, "failover"):
            time.sleep(0.5)  # the start-up probe round, out of the hit counts
        probes = check_routing(variant)
        run_wrk(WARMUP, variant)  # V8 tiering, connection setup, caches
        with Window(p.pid) as w:
            sat = run_wrk(DURATION, variant)
        sat.update(w.record())
        with Window(p.pid) as w:
            paced = run_paced(DURATION, variant)
        paced.update(w.record())
        stats = filter_stats()
    finally:
        stop(p)
    problems_stats = router_stats_problems(variant, stats)
    problems = problems_stats + ([f"sat: {x}" for x in check_window(variant, sat, sat["wrk_requests"], sat["non_2xx"])] +
                [f"paced: {x}" for x in check_window(variant, paced, paced["completed"],
                                                     paced["non_2xx"] + paced["errors"])])
    return {"variant": variant, "round": rnd, "loadavg_before": load0,
            "probes": probes, "filter_stats": stats, "routing_problems": problems, "sat": sat, "paced": paced}


def med_range(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(xs), min(xs), max(xs)


def fmt(m, lo, hi, spec):
    return f"{m:{spec}} ({lo:{spec}}–{hi:{spec}})"


def summarise(runs, variants):
    by = {(r["variant"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    rows = []
    for v in variants:
        vr = [by[(v, n)] for n in rounds if (v, n) in by]
        base = ALL_VARIANTS[v].baseline
        row = {"variant": v, "description": ALL_VARIANTS[v].description, "baseline": base}
        metrics = {
            "sat_rps": [r["sat"]["wrk_rps"] for r in vr],
            "sat_cpu_us": [r["sat"]["cpu_us_per_rq"] for r in vr],
            "paced_cpu_us": [r["paced"]["cpu_us_per_rq"] for r in vr],
            "paced_p50_us": [r["paced"]["latency_us"]["p50"] for r in vr],
            "paced_p99_us": [r["paced"]["latency_us"]["p99"] for r in vr],
            "sat_envoy_util": [r["sat"]["envoy_util"] for r in vr],
            "sat_other": [r["sat"]["other_on_envoy_core"] for r in vr],
            "paced_other": [r["paced"]["other_on_envoy_core"] for r in vr],
            "paced_send_lag_p99_us": [r["paced"]["send_lag_us"]["p99"] for r in vr],
            "v2_share": [r["sat"]["v2_share"] for r in vr],
        }
        for k, xs in metrics.items():
            row[k] = med_range(xs)
        # Paired with the baseline (native, or native-post for body
        # variants) in the same round: cancels slow drift in noise.
        if base in variants and base != v:
            def paired(f, op):
                return [op(f(by[(v, n)]), f(by[(base, n)])) for n in rounds
                        if (v, n) in by and (base, n) in by]
            sub = lambda a, b: a - b  # noqa: E731
            row["rps_ratio"] = med_range(paired(lambda r: r["sat"]["wrk_rps"], lambda a, b: a / b))
            row["added_sat_cpu_us"] = med_range(paired(lambda r: r["sat"]["cpu_us_per_rq"], sub))
            row["added_paced_cpu_us"] = med_range(paired(lambda r: r["paced"]["cpu_us_per_rq"], sub))
            row["added_p50_us"] = med_range(paired(lambda r: r["paced"]["latency_us"]["p50"], sub))
            row["added_p99_us"] = med_range(paired(lambda r: r["paced"]["latency_us"]["p99"], sub))
        rows.append(row)
    return rows


def print_table(rows):
    print("\nmedian (min–max) over rounds; 'added' and 'ratio' are paired with the baseline ('vs') in the same round")
    hdr = ["variant", "vs", "sat req/s", "ratio", "CPU µs/req (sat)", "+CPU µs (sat)",
           "CPU µs/req (paced)", "+CPU µs (paced)", "p50 µs", "+p50 µs", "p99 µs", "+p99 µs", "v2 share"]
    lines = [hdr]
    for r in rows:
        g = lambda k, s: fmt(*r[k], s) if k in r else "-"  # noqa: E731
        lines.append([r["variant"], r["baseline"] if "rps_ratio" in r else "—", g("sat_rps", ".0f"), g("rps_ratio", ".3f"), g("sat_cpu_us", ".1f"),
                      g("added_sat_cpu_us", "+.1f"), g("paced_cpu_us", ".1f"), g("added_paced_cpu_us", "+.1f"),
                      g("paced_p50_us", ".0f"), g("added_p50_us", "+.0f"), g("paced_p99_us", ".0f"),
                      g("added_p99_us", "+.0f"), f"{r['v2_share'][0]:.3f}"])
    print("| " + " | ".join(lines[0]) + " |")
    print("|" + "---|" * len(lines[0]))
    for ln in lines[1:]:
        print("| " + " | ".join(ln) + " |")
    print(f"\nnoise: Envoy's share of core {ENVOY_CORE} at saturation; share other processes took during the "
          "saturation and paced windows; paced client's p99 lateness against its schedule")
    for r in rows:
        print(f"  {r['variant']:<16} envoy {fmt(*r['sat_envoy_util'], '.2f')}  other sat {fmt(*r['sat_other'], '.2f')}"
              f"  other paced {fmt(*r['paced_other'], '.2f')}  send lag p99 µs {fmt(*r['paced_send_lag_p99_us'], '.0f')}")


def clean_summary(runs, variants, clean_max):
    """Medians over the windows in which other processes used at most
    `clean_max` of Envoy's core; 'added' and 'ratio' compare medians."""
    def vals(v, window, f):
        return [f(r[window]) for r in runs
                if r["variant"] == v and r[window]["other_on_envoy_core"] <= clean_max]
    metrics = {
        "sat_rps": ("sat", lambda w: w["wrk_rps"]),
        "sat_cpu_us": ("sat", lambda w: w["cpu_us_per_rq"]),
        "paced_cpu_us": ("paced", lambda w: w["cpu_us_per_rq"]),
        "paced_p50_us": ("paced", lambda w: w["latency_us"]["p50"]),
        "paced_p99_us": ("paced", lambda w: w["latency_us"]["p99"]),
    }
    rows = []
    for v in variants:
        row = {"variant": v}
        for k, (window, f) in metrics.items():
            xs = vals(v, window, f)
            row[k] = med_range(xs) + (len(xs),)
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        base = by.get(ALL_VARIANTS[r["variant"]].baseline)
        if base is None or base is r:
            continue
        r["rps_ratio"] = r["sat_rps"][0] / base["sat_rps"][0] if base["sat_rps"][3] else float("nan")
        for k in ("sat_cpu_us", "paced_cpu_us", "paced_p50_us", "paced_p99_us"):
            r["added_" + k] = r[k][0] - base[k][0]
    return rows


def print_clean(rows, clean_max):
    print(f"\nclean windows only (other processes used <= {clean_max:.0%} of core {ENVOY_CORE}); "
          "median (min–max, n); added/ratio = difference/ratio of medians vs the variant's baseline")
    hdr = ["variant", "sat req/s", "ratio", "CPU µs/req (sat)", "+CPU", "CPU µs/req (paced)", "+CPU",
           "p50 µs", "+p50", "p99 µs", "+p99"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        def g(k, spec):
            m, lo, hi, n = r[k]
            return f"{m:{spec}} ({lo:{spec}}–{hi:{spec}}, n={n})" if n else "n=0"

        def a(k, spec):
            return f"{r.get(k, float('nan')):{spec}}"
        print("| " + " | ".join([
            r["variant"], g("sat_rps", ".0f"), a("rps_ratio", ".3f"), g("sat_cpu_us", ".1f"),
            a("added_sat_cpu_us", "+.1f"), g("paced_cpu_us", ".1f"), a("added_paced_cpu_us", "+.1f"),
            g("paced_p50_us", ".0f"), a("added_paced_p50_us", "+.0f"), g("paced_p99_us", ".0f"),
            a("added_paced_p99_us", "+.0f")]) + " |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--summarise":
        with open(sys.argv[2]) as f:
            data = json.load(f)
        variants = data["meta"]["variants"]
        print_table(summarise(data["runs"], variants))
        print_clean(clean_summary(data["runs"], variants, CLEAN_MAX), CLEAN_MAX)
        return
    unknown = [v for v in VARIANTS if v not in ALL_VARIANTS]
    if unknown:
        sys.exit(f"unknown VARIANTS {unknown}; known: {', '.join(ALL_VARIANTS)}")
    os.makedirs(RESULTS, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = os.path.join(RESULTS, f"filters-{stamp}")
    os.makedirs(workdir)
    up_log = open(os.path.join(workdir, "upstream.log"), "w")
    upstream = subprocess.Popen(pinned(LOAD_CORE, [TOOLS, "upstream"] +
                                       [a for port in UPSTREAMS.values() for a in ("--listen", f"127.0.0.1:{port}")]),
                                stdout=up_log, stderr=subprocess.STDOUT)
    REQUEST_FILES.update(write_requests(workdir))
    runs = []
    meta = {
        "started": stamp, "rounds": ROUNDS, "duration_s": DURATION, "warmup_s": WARMUP, "rate": RATE,
        "connections": CONNS, "paced_connections": PACED_CONNS, "keys": KEYS, "variants": VARIANTS,
        "envoy_core": ENVOY_CORE, "load_core": LOAD_CORE, "nice": NICE,
        "envoy_version": subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip(),
        "kernel": os.uname().release,
        "canary_sha256": subprocess.run(["sha256sum", CANARY_WASM], capture_output=True, text=True).stdout.split(" ")[0],
        "router_sha256": subprocess.run(["sha256sum", ROUTER_WASM], capture_output=True, text=True).stdout.split(" ")[0],
        "configs": {v: {"filters": [f._asdict() for f in ALL_VARIANTS[v].filters],
                        "routes": ALL_VARIANTS[v].routes, "requests": ALL_VARIANTS[v].requests}
                    for v in VARIANTS},
    }
    try:
        wait_for(lambda: upstream.poll() is None and hits() is not None, "upstream")
        for rnd in range(ROUNDS):
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
            for v in order:
                r = one_run(v, rnd, workdir)
                runs.append(r)
                s, pc = r["sat"], r["paced"]
                log(f"round {rnd} {v:<14} load {r['loadavg_before']:.2f}  sat {s['wrk_rps']:.0f} req/s "
                    f"{s['cpu_us_per_rq']:.1f} µs/req (util {s['envoy_util']:.2f}, other {s['other_on_envoy_core']:.3f})  "
                    f"paced {pc['rate_achieved']:.0f} req/s p50 {pc['latency_us']['p50']} p99 {pc['latency_us']['p99']} µs "
                    f"{pc['cpu_us_per_rq']:.1f} µs/req  v2 {s['v2_share']:.3f} default {s['upstream_hits']['default']}"
                    f"{'  NON-2XX ' + str(s['non_2xx']) if s['non_2xx'] or pc['non_2xx'] or pc['errors'] else ''}"
                    f"{'  OVERLOADED: ' + str(pc['unsent']) + ' unsent' if pc.get('unsent') else ''}")
                if r["routing_problems"]:
                    raise RuntimeError(f"round {rnd} {v}: routing check failed: {'; '.join(r['routing_problems'])}")
    finally:
        upstream.send_signal(signal.SIGINT)
        try:
            upstream.wait(5)
        except subprocess.TimeoutExpired:
            upstream.kill()
        rows = summarise(runs, VARIANTS) if runs else []
        out = os.path.join(RESULTS, f"filters-{stamp}.json")
        with open(out, "w") as f:
            json.dump({"meta": meta, "runs": runs, "summary": rows}, f, indent=1)
        with open(os.path.join(RESULTS, f"filters-{stamp}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "round", "loadavg", "sat_rps", "sat_cpu_us", "sat_envoy_util",
                        "sat_other_core", "paced_rate", "paced_cpu_us", "p50_us", "p99_us", "p999_us",
                        "send_lag_p99_us", "paced_other_core", "v2_share", "errors", "unsent"])
            for r in runs:
                s, p = r["sat"], r["paced"]
                w.writerow([r["variant"], r["round"], r["loadavg_before"], s["wrk_rps"], s["cpu_us_per_rq"],
                            s["envoy_util"], s["other_on_envoy_core"], p["rate_achieved"], p["cpu_us_per_rq"],
                            p["latency_us"]["p50"], p["latency_us"]["p99"], p["latency_us"]["p999"],
                            p["send_lag_us"]["p99"], p["other_on_envoy_core"], s["v2_share"],
                            s["non_2xx"] + p["non_2xx"] + p["errors"], p.get("unsent", 0)])
        log(f"raw results: {out}")
    print(f"envoy: {meta['envoy_version']}\nrounds={ROUNDS} duration={DURATION}s rate={RATE:.0f}/s "
          f"wrk -t1 -c{CONNS}; envoy core {ENVOY_CORE}, load+upstream core {LOAD_CORE}, nice {NICE}")
    print_table(rows)
    if runs:
        print_clean(clean_summary(runs, VARIANTS, CLEAN_MAX), CLEAN_MAX)


if __name__ == "__main__":
    main()
