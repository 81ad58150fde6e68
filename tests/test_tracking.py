"""MLflow tracking: store selection, lineage tags, training/evaluation logging, nested runs (real MLflow, SQLite)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xrdmatch.config import load_config
from xrdmatch.platform.tracking import (
    configure,
    lineage_tags,
    log_evaluation,
    log_training,
    mlflow_run,
    registry_metrics,
    tracking_uri,
)


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(None, {"run_dir": str(tmp_path / "run"), "tracking": {"experiment": "t"}})


def test_tracking_uri_precedence(cfg, tmp_path, monkeypatch):
    default = tracking_uri(cfg)
    assert default == f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/env.db"
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/cfg.db"
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/cfg.db"


def test_lineage_tags_follow_the_data(labelled):
    rng = np.random.default_rng(0)
    X_unlab = rng.random((5, labelled.X.shape[1]), dtype=np.float32)
    tags = lineage_tags(labelled, X_unlab)
    assert tags["lineage.labelled_count"] == str(len(labelled)) == "112"
    assert tags["lineage.labelled_positive"] == str(int(labelled.y.sum()))
    assert tags["lineage.source.paper"] == "112" and tags["lineage.source.aimd"] == "0"
    assert tags["lineage.label_sources"] == "paper=112"
    assert tags["lineage.unlabelled_count"] == "5"
    assert "git_commit" in tags and "xrdmatch.version" in tags

    # one extra AIMD label changes the labelled hash and the source counts
    more = labelled.subset(np.arange(len(labelled)))
    more.sources[3] = "aimd"
    t2 = lineage_tags(more, X_unlab)
    assert t2["lineage.labelled_hash"] != tags["lineage.labelled_hash"]
    assert t2["lineage.source.aimd"] == "1" and t2["lineage.source.paper"] == "111"
    assert t2["lineage.label_sources"] == "aimd=1,paper=111"
    # a changed unlabelled pattern changes its hash, the labelled hash stays
    X2 = X_unlab.copy()
    X2[2, 100] += 0.5
    t3 = lineage_tags(labelled, X2)
    assert t3["lineage.unlabelled_hash"] != tags["lineage.unlabelled_hash"]
    assert t3["lineage.labelled_hash"] == tags["lineage.labelled_hash"]


def _evaluation_result(labelled, ens_dir):
    """An evaluation result in evaluate_grouped_cv's layout, from a real ensemble's predictions."""
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.metrics import binary_metrics

    pr = Ensemble.load(ens_dir).predict_proba(labelled.X)
    pred = pr["majority"]
    m = binary_metrics(labelled.y, pred, pr["p_mean"])
    return {
        "protocol": "grouped-cv",
        "results": [{"method": "flexmatch-ensemble", "members": 2, **m}],
        "prevalence": float(labelled.y.mean()),
        "per_fold": [{"method": "flexmatch-ensemble", "fold": 0, **m}],
        "predictions": {"flexmatch-ensemble": {"id": labelled.ids, "y": labelled.y.tolist(),
                                               "p": pr["p_mean"].tolist(), "pred": pred.tolist()}},
    }, m


def test_run_logs_config_metrics_artifacts_lineage(cfg, labelled, mlflow_registry, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from xrdmatch.training.ensemble import Ensemble

    ens = Ensemble.load(mlflow_registry.ens_a)
    history = [m.history for m in ens.members]  # real per-step training logs, one per member
    result, m = _evaluation_result(labelled, mlflow_registry.ens_a)
    tags = lineage_tags(labelled, labelled.X[:3])
    with mlflow_run(cfg, "evaluate", tags=tags) as run:
        curves = log_training(history)
        logged = log_evaluation(result, tmp_path / "out" / "evaluation.json")
    client = MlflowClient(tracking_uri(cfg))
    r = client.get_run(run.info.run_id)
    # the full resolved config as params, lineage and version tags
    assert r.data.params["training.network"] == "fast"
    assert r.data.params["tracking.promotion_metric"] == "grouped_cv_macro_f1"
    assert r.data.tags["lineage.labelled_hash"] == labelled.hash()
    assert r.data.tags["lineage.source.paper"] == "112"
    assert r.data.tags["git_commit"]
    # per-step metrics: every member's loss at every step
    n_steps = len(ens.members[0].history)
    loss_key = next(k for k in curves if k.startswith("member0.") and "loss" in k)
    hist = client.get_metric_history(run.info.run_id, loss_key)
    assert sorted(h.step for h in hist) == [row["step"] for row in ens.members[0].history][:n_steps]
    assert any(k.startswith("member1.") for k in curves)
    # evaluation scalars, per method
    assert r.data.metrics["flexmatch-ensemble.macro_f1"] == pytest.approx(m["macro_f1"])
    assert logged["prevalence"] == pytest.approx(labelled.y.mean())
    # artifacts: the JSON and the four figures, as real PNGs
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    names |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    for want in ("evaluation/evaluation.json", "evaluation/confusion_matrix_flexmatch-ensemble.png",
                 "evaluation/pr_curve_flexmatch-ensemble.png", "evaluation/calibration_flexmatch-ensemble.png",
                 "plots/learning_curves.png"):
        assert want in names, (want, names)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation",
                                                dst_path=str(tmp_path / "dl"), tracking_uri=tracking_uri(cfg))
    from pathlib import Path

    for png in Path(local).glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["results"][0]["macro_f1"] == pytest.approx(m["macro_f1"])
    # the artifacts live in the run directory (embedded default store)
    assert r.info.artifact_uri.startswith((tmp_path / "run" / "mlflow" / "artifacts").as_uri())


def test_campaign_rounds_nest_as_child_runs(cfg):
    from mlflow.tracking import MlflowClient

    with mlflow_run(cfg, "campaign") as parent:
        with mlflow_run(cfg, "round-0", nested=True, log_config=False) as child0:
            pass
    parent_id = parent.info.run_id
    # a resumed campaign: the parent is not active in this process any more
    with mlflow_run(cfg, "round-1", parent_run_id=parent_id, log_config=False) as child1:
        pass
    client = MlflowClient(configure(cfg))
    for child in (child0, child1):
        assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent_id


def test_registry_metrics_names():
    res = {"protocol": "grouped-cv", "results": [{"method": "supervised", "macro_f1": 0.6},
                                                  {"method": "flexmatch-ensemble", "macro_f1": 0.7, "pr_auc": 0.5}]}
    assert registry_metrics(res) == {"grouped_cv_macro_f1": 0.7, "grouped_cv_pr_auc": 0.5}
    with pytest.raises(KeyError):
        registry_metrics(res, "fixmatch")


def test_a_resumed_run_logs_each_training_step_once(cfg):
    """Killed after some per-step metrics were logged (and before the tag that says they all
    were), the rerun logs only the steps the run does not hold yet."""
    from mlflow.tracking import MlflowClient

    history = [[{"step": s, "loss": 1.0 / s, "mask_rate": 0.1 * s} for s in range(1, 6)]]
    with mlflow_run(cfg, "train") as run:
        log_training([[row for row in history[0] if row["step"] <= 3]])  # the killed attempt got this far
        log_training(history, resumed=True)
    client = MlflowClient(configure(cfg))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "member0.loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]


def test_an_evaluation_json_with_nan_is_valid_json(cfg, tmp_path):
    # a metric that is undefined on a fold (NaN) is null in the file and the artifact, never a
    # bare NaN token that strict JSON readers refuse
    def no_nan(token):
        raise ValueError(f"{token} is not JSON")

    out = tmp_path / "e.json"
    with mlflow_run(cfg, "evaluate"):
        log_evaluation({"protocol": "paper", "results": [{"method": "m", "macro_f1": 0.5, "pr_auc": float("nan")}]},
                       out)
    assert json.loads(out.read_text(), parse_constant=no_nan)["results"][0]["pr_auc"] is None


def test_evaluate_refuses_an_unwritable_out_before_any_training(tmp_path):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for option in ("--out", "--markdown"):
        res = CliRunner().invoke(app, ["evaluate", "--dir", str(tmp_path / "run"), option, str(blocker / "r.json")])
        assert res.exit_code == 2 and f"{option} {blocker / 'r.json'}: cannot be written there" in res.output
        assert not (tmp_path / "run").exists()  # nothing trained, no run directory made
