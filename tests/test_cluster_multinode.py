"""A real multi-node Ray cluster on loopback, started with the image's entry point.

Head and a second node come up through `docker/entrypoint.sh head|worker` (`ray start`), each
with its own resources. The XRD stage and the validation queue (its worker also started through
the entry point, `validate`) run across both; the second
node's raylet is killed with SIGKILL mid-stage; the stage must still complete with every item
exactly once.
"""

from __future__ import annotations

import json
import os
import re
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


# ports Ray takes by default on every node (dashboard agent 52365 is inside Linux's ephemeral range)
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, *range(10002, 20000)}


def _free_port() -> int:
    """A free port that no Ray component of the head or worker claims by default."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    for var in ("RAY_ADDRESS", "XRDMATCH_RUN_DIR"):
        env.pop(var, None)
    env.update(RAY_BLOCK="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", **extra)
    return env


def _cmdlines():
    """(pid, command line) of every process on the machine."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            yield int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue


def _raylet_pids(marker: str) -> list[int]:
    """PIDs of raylet processes whose command line carries this node's custom resource."""
    return [pid for pid, cmd in _cmdlines() if "raylet" in cmd.split(" ")[0] and marker in cmd]


def _cluster_pids(port: int, temp: Path) -> list[int]:
    """This test cluster's processes: they name its GCS address or its temp dir."""
    own = re.compile(rf"127\.0\.0\.1:{port}\b|{re.escape(str(temp))}")
    return [pid for pid, cmd in _cmdlines() if pid != os.getpid() and own.search(cmd)]


def _stop_cluster(port: int, temp: Path) -> None:
    """Kill this cluster and nothing else: `ray stop --force` kills every Ray on the machine,
    such as a campaign or a benchmark someone runs beside the tests."""
    for pid in _cluster_pids(port, temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while _cluster_pids(port, temp) and time.time() < deadline:
        time.sleep(0.2)
    assert not _cluster_pids(port, temp), "test cluster processes outlived SIGKILL"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The head node, started once for the module (each test kills and restarts the second node)."""
    # Ray >= 2.5x authenticates nodes and drivers with a token; one for this test cluster.
    token = tmp_path_factory.mktemp("ray_auth") / "ray_auth_token"
    token.write_text(os.urandom(16).hex())
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    port = _free_port()
    temp = Path(f"/tmp/xrdm-ray-{port}")  # short: unix socket paths are limited to 107 bytes
    try:
        head = subprocess.run(
            ["bash", str(ENTRY), "head", f"--temp-dir={temp}", "--num-cpus=1", '--resources={"xrdm_head": 1}'],
            env=_env(RAY_NODE_IP="127.0.0.1", RAY_PORT=str(port), RAY_CLIENT_PORT=str(_free_port())),
            capture_output=True, text=True, timeout=180,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(port, temp)
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


@pytest.fixture
def cluster(head):
    """Head + a live second node (started through the entry point; a test kills its own)."""
    if not _raylet_pids("xrdm_node2"):  # still up if the last test failed before killing it
        worker = subprocess.run(
            ["bash", str(ENTRY), "worker", "--num-cpus=1", '--resources={"xrdm_node2": 1}'],
            env=_env(RAY_NODE_IP="127.0.0.1", RAY_HEAD_ADDRESS=head),
            capture_output=True, text=True, timeout=180,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
    _wait_nodes(head, 2)
    yield head


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
    man = json.loads((out / "manifest.json").read_text())  # written by every finished stage
    assert man["done"] is True and man["totals"]["entries"] == n, man["totals"]
    assert len(table.ids) == man["totals"]["patterns"]
    assert len(table.ids) + man["totals"]["errors"] == n  # every entry once: a pattern or a listed error


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_validation_queue_survives_losing_a_node(cluster, tmp_path, database_path):
    """Two MD jobs on two 1-CPU nodes; node 2 dies mid-job; the head's worker takes its job over
    (the driver ends the lost worker's lease, or the lease runs out) and resumes it: every job
    done once, one label each."""
    import yaml

    from xrdmatch.config import load_config
    from xrdmatch.platform import queue
    from xrdmatch.platform.data import iter_records
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import list_labels

    ids = ("mp-1009009", "mp-10182")  # LiF, LiZnP: small cells
    recs = {r["id"]: r for r in iter_records(database_path) if r["id"] in ids}
    validation = {"temperatures": [600.0, 1500.0], "thermostat": "langevin", "equilibration_steps": 2,
                  "production_steps": 60, "traj_interval": 2, "min_atoms": 8, "min_length": 0.0, "msd_fit_start_fs": 0.0,
                  "min_li_msd": 0.0, "min_r2": 0.0, "verdict_z": 0.0, "max_framework_msd": 1000.0, "lease_s": 8.0,
                  "heartbeat_s": 0.5, "poll_s": 0.5, "workers": 2, "cpus_per_job": 1.0}
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "validation": validation})
    url = store_url(cfg)
    jobs = [queue.submit(url, sid, recs[sid], cfg.validation) for sid in ids]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "work.log"
    with open(log, "w") as fh:
        # through the image's entry point, as a compose/Kubernetes validate container: it is given
        # RAY_HEAD_ADDRESS (as the workers are), never RAY_ADDRESS
        proc = subprocess.Popen(["bash", str(ENTRY), "validate", "--until-empty"],
                                env=_env(RAY_HEAD_ADDRESS=cluster, XRDMATCH_CONFIG=str(cfg_file)),
                                stdout=fh, stderr=subprocess.STDOUT)
    node2 = set(_raylet_pids("xrdm_node2"))
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        for jid in jobs:
            job = queue.get_job(url, jid)
            if job.state == "running" and job.progress.get("step", 0) >= 4:
                pid = int(job.worker_id.split(":")[1])
                try:
                    if _parent_pid(pid) in node2:
                        victim = job
                except (OSError, ValueError):
                    pass
        time.sleep(0.2)
    assert victim is not None, "no job ran on the second node: " + log.read_text()[-3000:]
    _kill_node2()
    proc.wait(timeout=400)
    assert proc.returncode == 0, log.read_text()[-3000:]
    for jid in jobs:
        job = queue.get_job(url, jid)
        assert job.state == "done", (job.structure_id, job.state, job.error)
    taken_over = queue.get_job(url, victim.id)
    assert taken_over.attempts == 2 and taken_over.worker_id != victim.worker_id
    labels = list_labels(url)
    assert sorted(lab.structure_id for lab in labels) == sorted(ids)
