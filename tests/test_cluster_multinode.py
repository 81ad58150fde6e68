"""A real multi-node Ray cluster on loopback, started with the image's entry point.

Head and a second node come up through `docker/entrypoint.sh head|worker` (`ray start`), each
with its own resources. The XRD stage and the validation queue run across both; the second
node's raylet is killed with SIGKILL mid-stage; the stage must still complete with every item
exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

ENTRY = REPO / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_BLOCK="0", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _raylet_pids(marker: str) -> list[int]:
    """PIDs of raylet processes whose command line carries this node's custom resource."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "raylet" in cmd.split(" ")[0] and marker in cmd:
            pids.append(int(d.name))
    return pids


@pytest.fixture
def cluster(tmp_path):
    port = _free_port()
    temp = Path(f"/tmp/xrdm-ray-{port}")  # short: unix socket paths are limited to 107 bytes
    head = subprocess.run(
        ["bash", str(ENTRY), "head", f"--temp-dir={temp}", "--num-cpus=1", '--resources={"xrdm_head": 1}'],
        env=_env(RAY_NODE_IP="127.0.0.1", RAY_PORT=str(port), RAY_CLIENT_PORT=str(_free_port())),
        capture_output=True, text=True, timeout=180,
    )
    assert head.returncode == 0, head.stdout + head.stderr
    address = f"127.0.0.1:{port}"
    worker = subprocess.run(
        ["bash", str(ENTRY), "worker", "--num-cpus=1", '--resources={"xrdm_node2": 1}'],
        env=_env(RAY_NODE_IP="127.0.0.1", RAY_HEAD_ADDRESS=address),
        capture_output=True, text=True, timeout=180,
    )
    try:
        assert worker.returncode == 0, worker.stdout + worker.stderr
        _wait_nodes(address, 2)
        yield address
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True, timeout=120)


def _wait_nodes(address: str, n: int, timeout: float = 60) -> None:
    code = (
        "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=_env())
        if out.stdout.strip() == str(n):
            return
        time.sleep(1)
    raise AssertionError(f"cluster at {address} did not reach {n} nodes")


def _kill_node2() -> int:
    pids = _raylet_pids("xrdm_node2")
    assert pids, "second node's raylet not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_xrd_stage_survives_losing_a_node(cluster, tmp_path, database_path):
    from xrdmatch.platform.patterns import load_patterns

    out = tmp_path / "patterns"
    n = 1500
    proc = subprocess.Popen(
        [str(VENV_BIN / "xrdmatch"), "xrd", "--db", str(database_path), "--out", str(out),
         "--workers", "2", "--batch-size", "50", "--limit", str(n)],
        env=_env(RAY_ADDRESS=cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and len(list(out.glob("**/*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "stage finished before the node could be killed: " + proc.stdout.read()[-3000:]
    _kill_node2()
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log[-3000:]
    table = load_patterns(out)
    assert len(table.ids) == len(set(table.ids)), "an id was written twice"
    errors = json.loads((out / "manifest.json").read_text()).get("failures", 0) if (out / "manifest.json").exists() else 0
    assert len(table.ids) + int(errors) == n
