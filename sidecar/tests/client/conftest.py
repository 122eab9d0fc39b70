"""The sidecar as a child process for the client tests (tritonclient,
KServe): started from SIDECAR_BIN on 127.0.0.1 with an ephemeral port
against examples/models; the fixture yields its host:port once ready.
Standard library only, so every client's venv can use it."""

import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODELS = ROOT / "examples" / "models"


def reference(model, version):
    return json.loads((MODELS / model / version / "reference.json").read_text())


@pytest.fixture(scope="module")
def sidecar_addr():
    binary = os.environ.get("SIDECAR_BIN")
    if not binary:
        pytest.fail("set SIDECAR_BIN to the infermesh-sidecar binary")
    proc = subprocess.Popen(
        [binary, "--model-repository", str(MODELS), "--listen", "127.0.0.1:0", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    addr = None
    deadline = time.time() + 30
    while addr is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("message") == "listening":
            addr = rec["addr"]
    if addr is None:
        proc.kill()
        pytest.fail("sidecar did not report its address")
    # Keep draining stderr so the child never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("sidecar never became ready")
    yield addr
    proc.terminate()
    assert proc.wait(timeout=30) == 0
