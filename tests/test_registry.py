"""Model registry: one pyfunc per ensemble, champion/challenger aliases, searchable version tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xrdmatch.platform.registry import beats, list_versions


def _client(reg):
    from mlflow.tracking import MlflowClient

    from xrdmatch.platform.tracking import configure

    return MlflowClient(configure(reg.cfg))


def test_aliases_follow_the_promotion_rule(mlflow_registry):
    reg = mlflow_registry
    v1, v2, v3 = reg.versions
    # the first version becomes champion; a worse one stays challenger; a better one takes over
    assert (v1.version, v1.promoted) == ("1", True) and "champion" in v1.aliases and "challenger" in v1.aliases
    assert (v2.version, v2.promoted, v2.aliases) == ("2", False, ["challenger"])
    assert (v3.version, v3.promoted) == ("3", True)
    client = _client(reg)
    name = reg.cfg.tracking.registry_name
    assert name == "xrdmatch-superionic"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "3"
    mv2 = client.get_model_version(name, "2")
    assert mv2.tags["promotion.promoted"] == "false" and mv2.tags["promotion.previous_champion"] == "1"
    assert mv2.tags["promotion.rule"] == "grouped_cv_macro_f1 > champion + 0"
    run = client.get_run(v3.run_id)
    assert run.data.tags["registry.promotion_rule"] == "grouped_cv_macro_f1 > champion + 0"
    assert run.data.tags["registry.version"] == "3"


def test_promotion_rule_edges():
    assert beats(0.61, 0.60, 0.0) and not beats(0.60, 0.60, 0.0)
    assert not beats(0.62, 0.60, 0.05) and beats(0.66, 0.60, 0.05)
    assert beats(0.3, 0.5, 0.1, greater_is_better=False) and not beats(0.45, 0.5, 0.1, greater_is_better=False)
    assert beats(0.1, None, 0.0) and not beats(None, 0.1, 0.0)


def test_version_tags_are_searchable(mlflow_registry, labelled):
    reg = mlflow_registry
    client = _client(reg)
    name = reg.cfg.tracking.registry_name
    h = labelled.hash()
    assert reg.lineage["lineage.labelled_hash"] == h
    found = client.search_model_versions(f"name = '{name}' and tags.`lineage.labelled_hash` = '{h}'")
    assert sorted(str(mv.version) for mv in found) == ["1", "2", "3"]
    found = client.search_model_versions(f"name = '{name}' and tags.`metric.grouped_cv_macro_f1` = '0.6'")
    assert [str(mv.version) for mv in found] == ["3"]
    assert client.search_model_versions(f"name = '{name}' and tags.`lineage.source.aimd` != '0'") == []
    assert client.search_model_versions(f"name = '{name}' and tags.`lineage.labelled_hash` = 'nope'") == []
    # the same through list_versions
    vs = list_versions(reg.cfg, {"promotion.promoted": "true"})
    assert [v.version for v in vs] == ["3", "1"]
    assert vs[0].aliases == ["challenger", "champion"] and vs[1].aliases == []
    assert vs[0].metrics == {"grouped_cv_macro_f1": 0.6, "grouped_cv_pr_auc": 0.3}
    assert vs[0].lineage["lineage.labelled_count"] == "112"


def test_pyfunc_is_the_ensemble(mlflow_registry, labelled):
    """models:/...@champion is ensemble B (v3), loaded from code + safetensors, no pickles."""
    import mlflow
    import yaml

    from xrdmatch.platform.pyfunc_model import COLUMNS, patterns_frame
    from xrdmatch.training.ensemble import Ensemble

    reg = mlflow_registry
    X = labelled.X[:12]
    model = mlflow.pyfunc.load_model(f"models:/{reg.cfg.tracking.registry_name}@champion")
    out = model.predict(patterns_frame(X))
    assert list(out.columns) == ["p_superionic", "p_std", "superionic"]
    b = Ensemble.load(reg.ens_b).predict_proba(X)
    a = Ensemble.load(reg.ens_a).predict_proba(X)
    np.testing.assert_allclose(out["p_superionic"], b["p_mean"], rtol=1e-6)
    np.testing.assert_allclose(out["p_std"], b["p_std"], rtol=1e-5, atol=1e-9)
    assert not np.allclose(a["p_mean"], b["p_mean"])  # the alias really selects version 3
    # the decision is the rule the evaluation scored (evaluation.vote_fraction of the members)
    from xrdmatch.training.evaluation import combine

    np.testing.assert_array_equal(out["superionic"], combine(b["p_members"], reg.cfg.evaluation.vote_fraction)["pred"])
    # signature: 4501 named double columns in, three columns out; a wrong frame is refused
    sig = model.metadata.signature
    assert sig.inputs.input_names() == COLUMNS and len(COLUMNS) == 4501
    assert sig.outputs.input_names() == ["p_superionic", "p_std", "superionic"]
    with pytest.raises(Exception):
        model.predict(patterns_frame(X).drop(columns=["v7"]))
    # models from code: the model folder holds our source file and the safetensors, no pickle
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{reg.cfg.tracking.registry_name}/3"))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    ens_dir = reg.ens_b.name  # MLflow keeps the folder's name under artifacts/
    assert f"artifacts/{ens_dir}/ensemble.json" in files and f"artifacts/{ens_dir}/member_0.safetensors" in files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    assert (local / "input_example.json").is_file()


def test_models_cli_lists_versions(mlflow_registry, monkeypatch):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(app, ["models", "--dir", str(mlflow_registry.run_dir)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "xrdmatch-superionic" in out and "challenger, champion" in out
    for v, f1 in (("1", "0.500"), ("2", "0.400"), ("3", "0.600")):
        assert f1 in out
    assert "112 (paper=112)" in out
    assert "grouped_cv_macro_f1 > champion + 0" in out


def test_screen_cli_scores_the_database_with_the_champion(mlflow_registry, tmp_path, monkeypatch):
    """`xrdmatch screen`: the champion (v3 = ensemble B) scores every pattern of the configured
    database on Ray actors; the scores equal the ensemble's own; the run is on record."""
    import pandas as pd
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.platform.tracking import tracking_uri
    from xrdmatch.training.ensemble import Ensemble

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_path = tmp_path / "screen.yaml"
    cfg_path.write_text(yaml.safe_dump({"run_dir": str(mlflow_registry.run_dir), "ray": {"num_cpus": 2},
                                        "database": {"limit": 60}, "xrd": {"batch_size": 30, "workers": 1},
                                        "campaign": {"screen_batch_size": 25}}))
    out = tmp_path / "scores.parquet"
    res = CliRunner().invoke(app, ["screen", "--config", str(cfg_path), "--out", str(out), "--top", "3",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "(v3)" in res.output
    scores = pd.read_parquet(out)
    cfg = load_config(cfg_path)
    pt = ensure_patterns(cfg, progress=False)
    assert list(scores["id"]) == list(pt.ids) and len(scores) == 60
    want = Ensemble.load(mlflow_registry.ens_b).predict_proba(pt.X)["p_mean"]
    np.testing.assert_allclose(scores["p_mean"].to_numpy(), want, atol=1e-5)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "screen-v3")
    assert run.data.tags["model.uri"] == "models:/xrdmatch-superionic@champion"
    assert run.data.metrics["n_structures"] == 60
    assert {a.path for a in client.list_artifacts(run.info.run_id, "screen")} == {
        "screen/score_histogram.png", "screen/top.csv"}
