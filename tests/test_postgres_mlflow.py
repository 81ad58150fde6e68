"""Cluster mode on one machine: an MLflow server (started by the image's entry point) with a
PostgreSQL backend, used through the tracking client and the model registry.

`.ci/run` (scripts/test.sh) starts Debian's PostgreSQL on 127.0.0.1 and exports
XRDMATCH_TEST_PG_MLFLOW_URL; without it these tests skip with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from tests.conftest import REPO

PG_MLFLOW = os.environ.get("XRDMATCH_TEST_PG_MLFLOW_URL")
pytestmark = pytest.mark.skipif(not PG_MLFLOW, reason="no PostgreSQL test server (XRDMATCH_TEST_PG_MLFLOW_URL unset)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = _free_port()
    art = tmp_path_factory.mktemp("mlflow-artifacts")
    env = dict(os.environ)
    env.update(
        MLFLOW_BACKEND_STORE_URI=PG_MLFLOW,
        MLFLOW_ARTIFACTS_DESTINATION=str(art),
        MLFLOW_PORT=str(port),
        PATH=f"{REPO / '.venv' / 'bin'}:{env['PATH']}",
    )
    env.pop("MLFLOW_HOST", None)  # the default must be loopback
    log = open(art / "server.log", "w")
    proc = subprocess.Popen(
        ["bash", str(REPO / "docker" / "entrypoint.sh"), "mlflow", "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(art / 'server.log').read_text()[-2000:]}")
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not come up in 120 s")
    yield url, proc
    os.killpg(proc.pid, 9)
    proc.wait()


def test_server_binds_loopback_only(mlflow_server):
    if not _has("ss"):
        pytest.skip("ss (iproute2) not installed")
    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    port = mlflow_server[0].rsplit(":", 1)[1]
    lines = [ln for ln in out.splitlines() if f":{port} " in ln]
    assert lines, f"nothing listens on port {port}"
    for ln in lines:
        assert "127.0.0.1:" in ln, ln


def _has(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def test_tracking_and_registry_on_postgres(mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    url, _ = mlflow_server
    mlflow.set_tracking_uri(url)
    exp = f"pg-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(exp)
    art = tmp_path / "evaluation.json"
    art.write_text('{"macro_f1": 0.5}')
    with mlflow.start_run() as run:
        mlflow.log_param("network", "fast")
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(str(art))
    client = MlflowClient(url)
    got = client.get_run(run.info.run_id)
    assert got.data.params["network"] == "fast"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1.0 / 3]
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["evaluation.json"]
    name = f"pg-model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/evaluation.json", run_id=run.info.run_id,
                                     tags={"labelled_count": "112"})
    client.set_registered_model_alias(name, "champion", mv.version)
    assert client.get_model_version_by_alias(name, "champion").version == mv.version
    found = client.search_model_versions(f"name='{name}' and tags.labelled_count='112'")
    assert [v.version for v in found] == [mv.version]


def test_xrdmatch_registers_promotes_and_serves_through_the_server(mlflow_server, tmp_path, labelled):
    """The platform's own path on the cluster's store: register_ensemble twice (the promotion
    rule decides), list_versions reads the tags back, the champion loads as a pyfunc and
    predicts what the ensemble does."""
    import mlflow
    import numpy as np

    from tests.conftest import _tiny_ensemble
    from xrdmatch.config import load_config
    from xrdmatch.platform.pyfunc_model import patterns_frame
    from xrdmatch.platform.registry import list_versions, register_ensemble
    from xrdmatch.platform.tracking import configure, lineage_tags
    from xrdmatch.training.ensemble import Ensemble

    url, _ = mlflow_server
    tag = uuid.uuid4().hex[:8]
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"),
                             "tracking": {"tracking_uri": url, "experiment": f"pg-{tag}",
                                          "registry_name": f"pg-xrdmatch-{tag}"}})
    ens = _tiny_ensemble(labelled, 0, tmp_path / "ens")
    lineage = lineage_tags(labelled, labelled.X[:7])
    first = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.5, "grouped_cv_pr_auc": 0.3}, lineage)
    worse = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.4, "grouped_cv_pr_auc": 0.2}, lineage)
    assert first.promoted and not worse.promoted
    vs = {v.version: v for v in list_versions(cfg)}
    assert "champion" in vs[str(first.version)].aliases and vs[str(worse.version)].aliases == ["challenger"]
    assert vs[str(worse.version)].metrics["grouped_cv_macro_f1"] == 0.4
    configure(cfg)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registry_name}@champion")
    X = labelled.X[:5]
    got = model.predict(patterns_frame(X))
    np.testing.assert_allclose(got["p_superionic"], Ensemble.load(ens).predict_proba(X)["p_mean"], rtol=1e-6)
