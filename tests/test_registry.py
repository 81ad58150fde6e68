"""Model registry: one pyfunc per ensemble, champion/challenger aliases, searchable version tags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
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
    assert list(out.columns) == ["p_superionic", "p_std", "superionic", "error"]
    assert (out["error"] == "").all()
    b = Ensemble.load(reg.ens_b).predict_proba(X)
    a = Ensemble.load(reg.ens_a).predict_proba(X)
    np.testing.assert_allclose(out["p_superionic"], b["p_mean"], rtol=1e-6)
    np.testing.assert_allclose(out["p_std"], b["p_std"], rtol=1e-5, atol=1e-9)
    assert not np.allclose(a["p_mean"], b["p_mean"])  # the alias really selects version 3
    # the decision is the rule the evaluation scored (evaluation.vote_fraction of the members)
    from xrdmatch.training.evaluation import combine

    np.testing.assert_array_equal(out["superionic"], combine(b["p_members"], reg.cfg.evaluation.vote_fraction)["pred"])
    # signature: one (-1, 4501) float64 tensor in, four columns out; an array is taken as the
    # frame is, and input of another shape or dtype is refused
    sig = model.metadata.signature
    (spec,) = sig.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype(np.float64), (-1, 4501)) and len(COLUMNS) == 4501
    assert sig.outputs.input_names() == ["p_superionic", "p_std", "superionic", "error"]
    pd.testing.assert_frame_equal(model.predict(np.asarray(X, np.float64)), out)
    with pytest.raises(Exception, match="shape"):
        model.predict(patterns_frame(X).drop(columns=["v7"]))
    with pytest.raises(Exception, match="dtype"):
        model.predict(np.asarray(X, np.float32))
    # a bad row gets its reason and no prediction; the rest of the batch is scored as alone
    bad = np.array(X, dtype=np.float64)
    bad[2, 100] = np.nan
    bad[5] = 0.0
    bad[7, 3] = np.inf
    got = model.predict(patterns_frame(bad))
    assert "NaN or infinite" in got.loc[2, "error"] and "NaN or infinite" in got.loc[7, "error"]
    assert "flat" in got.loc[5, "error"]
    good = [i for i in range(len(X)) if i not in (2, 5, 7)]
    assert (got.loc[good, "error"] == "").all()
    assert got.loc[[2, 5, 7], ["p_superionic", "p_std"]].isna().all().all()
    assert got.loc[[2, 5, 7], "superionic"].isna().all()
    np.testing.assert_allclose(got.loc[good, "p_superionic"], b["p_mean"][good], rtol=1e-6)
    np.testing.assert_array_equal(got.loc[good, "superionic"].astype(int), out.loc[good, "superionic"].astype(int))
    # served over HTTP by MLflow's scoring server, an unscored row is null: strict JSON, no bare NaN
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"dataframe_split": patterns_frame(bad).to_dict(orient="split")})
    served = scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())

    def no_nan(token):
        raise ValueError(f"{token} is not JSON")

    rows = json.loads(served.response, parse_constant=no_nan)["predictions"]
    assert rows[5]["p_superionic"] is None and rows[5]["p_std"] is None and "flat" in rows[5]["error"]
    assert rows[0]["p_superionic"] == pytest.approx(float(b["p_mean"][0]), rel=1e-6)
    # the tensor form of the same request (what the stored serving example uses) answers the same
    body = json.dumps({"inputs": np.where(np.isfinite(bad), bad, 0.0).tolist()})
    tensor_rows = json.loads(scoring_server.invocations(body, "application/json", model,
                                                        model.metadata.get_input_schema()).response)["predictions"]
    assert [r["p_superionic"] for r in tensor_rows][:2] == [r["p_superionic"] for r in rows][:2]
    assert "flat" in tensor_rows[5]["error"]
    # models from code: the model folder holds our source file and the safetensors, no pickle
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{reg.cfg.tracking.registry_name}/3"))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    ens_dir = reg.ens_b.name  # MLflow keeps the folder's name under artifacts/
    assert f"artifacts/{ens_dir}/ensemble.json" in files and f"artifacts/{ens_dir}/member_0.safetensors" in files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    assert (local / "input_example.json").is_file()
    served_example = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(served_example["inputs"]).shape == (1, 4501)


def test_metric_text_prints_counts_as_integers():
    from xrdmatch.training.metrics import metric_text

    assert [metric_text(k, v) for k, v in (("grouped_cv_n", 112.0), ("n_superionic", 23.0), ("grouped_cv_recall", 1.0),
                                           ("macro_f1", 0.6321), ("pr_auc", None))] == ["112", "23", "1.000", "0.632", "-"]


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
    assert "metrics: grouped_cv_*" in out and "macro_f1" in out and "pr_auc" in out and "…" not in out
    # a terminal too narrow for the table gets one block per version, nothing cut to "vers…"
    res = CliRunner().invoke(app, ["models", "--dir", str(mlflow_registry.run_dir)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and "┃" not in res.output
    blocks = {b.split("\n", 1)[0]: b for b in res.output.split("\nversion ")[1:]}
    assert sorted(blocks) == ["1", "2", "3"], res.output
    for v, f1 in (("1", "0.500"), ("2", "0.400"), ("3", "0.600")):
        assert f"    grouped_cv_macro_f1: {f1}\n" in blocks[v] and "    labelled (sources): 112 (paper=112)\n" in blocks[v]
    assert "    aliases: challenger, champion\n" in blocks["3"] and "aliases" not in blocks["1"] + blocks["2"]


def test_models_cli_prints_a_store_path_as_it_is_not_as_rich_markup(mlflow_registry, tmp_path, monkeypatch):
    """The table's title shows the store URL: a run directory path holding '[/]' crashed it (MarkupError)."""
    import shutil

    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "[red]x[" / "]run"  # the path reads .../[red]x[/]run
    shutil.copytree(mlflow_registry.run_dir / "mlflow", run_dir / "mlflow", ignore=shutil.ignore_patterns("artifacts"))
    res = CliRunner().invoke(app, ["models", "--dir", str(run_dir)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and f"sqlite:///{run_dir}" in res.output and "challenger, champion" in res.output, res.output


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
    # a screen killed mid-way left its run RUNNING: the same command reopens it, not a third run
    killed = client.create_run(exp.experiment_id, run_name="screen-v3",
                               tags={"xrdmatch.screen_key": run.data.tags["xrdmatch.screen_key"]})
    res = CliRunner().invoke(app, ["screen", "--config", str(cfg_path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0 and f"resuming MLflow run {killed.info.run_id}" in res.output, res.output
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "screen-v3"]
    assert len(runs) == 2 and client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert client.get_run(killed.info.run_id).data.metrics["n_structures"] == 60


def test_screen_refuses_an_unusable_out_before_scoring(tmp_path, monkeypatch):
    """A folder (or a path under a file) as --out: exit 2 naming it, before the model is looked up
    or anything is scored; nothing is left beside it."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "scores"
    folder.mkdir()
    (tmp_path / "afile").write_text("x")
    for out, why in ((folder, "is a directory"), (tmp_path / "afile" / "s.parquet", "is not a directory")):
        # the run dir has no model: without the check this got as far as "cannot load model"
        res = CliRunner().invoke(app, ["screen", "--dir", str(tmp_path / "no_model_run"), "--out", str(out),
                                       "--no-progress"])
        assert res.exit_code == 2, res.output
        assert f"--out {out}" in res.output and why in res.output and "cannot load model" not in res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "scores"]  # no run directory made either
    assert list(folder.iterdir()) == []


def test_screen_masks_a_password_in_the_model_uri_it_prints_and_tags(mlflow_registry, tmp_path, monkeypatch):
    """A model URI with user:password@ (sftp://, http(s)://): the printed lines and the run's
    model.uri tag show user:***@host, also when the model cannot be loaded."""
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_path = tmp_path / "screen.yaml"
    cfg_path.write_text(yaml.safe_dump({"run_dir": str(mlflow_registry.run_dir), "ray": {"num_cpus": 1},
                                        "database": {"limit": 20}, "xrd": {"batch_size": 20, "workers": 1}}))
    res = CliRunner().invoke(app, ["screen", "--config", str(cfg_path), "--no-progress",
                                   "--model", "sftp://u:s3cret@127.0.0.1:1/models/m"])
    assert res.exit_code == 2 and "s3cret" not in res.output, res.output
    assert "error: cannot load model sftp://u:***@127.0.0.1:1/models/m: " in res.output
    uri = f"file://u:s3cret@localhost{mlflow_registry.ens_b}"  # MLflow reads it as the local folder
    res = CliRunner().invoke(app, ["screen", "--config", str(cfg_path), "--no-progress", "--top", "1",
                                   "--out", str(tmp_path / "s.parquet"), "--model", uri])
    assert res.exit_code == 0 and "s3cret" not in res.output, res.output
    assert f"with file://u:***@localhost{mlflow_registry.ens_b} (vlocal)" in res.output
    cfg = load_config(cfg_path)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "screen-vlocal")
    assert run.data.tags["model.uri"] == f"file://u:***@localhost{mlflow_registry.ens_b}"


def test_pip_requirements_drop_local_versions(monkeypatch):
    """``torch 2.13.0+cpu`` is not on PyPI: the logged pins carry public versions only."""
    from xrdmatch.platform import registry

    monkeypatch.setattr(registry.metadata, "version", lambda pkg: "2.13.0+cu130" if pkg == "torch" else "1.2.3+cpu")
    reqs = registry._pip_requirements()
    assert "torch==2.13.0" in reqs and "pydantic==1.2.3" in reqs
    assert not [r for r in reqs if "+" in r], reqs


_LOAD_WITHOUT_INSTALLED_XRDMATCH = r'''
import ast, importlib.abc, json, os, re, site, sys
from importlib import metadata
from importlib.machinery import PathFinder
import json
from pathlib import Path

repo, tracking_uri, model_uri, x_path, out_path = sys.argv[1:6]
# the installed xrdmatch (editable finder, site-packages, the repo) is out of reach; a copy on
# sys.path elsewhere (the model's code/ folder, once MLflow puts it there) is importable
hidden = {os.path.realpath(p) for p in [repo, os.getcwd(), *site.getsitepackages(), site.getusersitepackages()]}


class OnlyShippedXrdmatch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "xrdmatch":
            spec = PathFinder.find_spec(name, [p for p in sys.path if p and os.path.realpath(p) not in hidden])
            if spec is None:
                raise ModuleNotFoundError("No module named 'xrdmatch' (installed copy hidden)", name=name)
            return spec
        if name.startswith("xrdmatch."):
            return PathFinder.find_spec(name, path)  # from the parent package's own folder
        return None


sys.meta_path.insert(0, OnlyShippedXrdmatch())
for m in [m for m in sys.modules if m == "xrdmatch" or m.startswith("xrdmatch.")]:
    del sys.modules[m]
try:
    import xrdmatch  # noqa: F401
    raise SystemExit("the installed xrdmatch is still importable")
except ModuleNotFoundError:
    pass

import mlflow
import numpy as np
import pandas as pd

mlflow.set_tracking_uri(tracking_uri)
model = mlflow.pyfunc.load_model(model_uri)
X = np.load(x_path).astype(np.float64)  # the signature's dtype
out = model.predict(pd.DataFrame(X, columns=[f"v{i}" for i in range(1, X.shape[1] + 1)]))
import xrdmatch

root = Path(xrdmatch.__file__).resolve().parents[2]  # <model>/code/xrdmatch/__init__.py
# third-party packages that the model's code imports and that this process really imported
dists = metadata.packages_distributions()
needed = {}  # top-level module -> the distributions that provide it
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None)
    if not f or not Path(f).resolve().is_relative_to(root) or not f.endswith(".py"):
        continue
    for node in ast.walk(ast.parse(Path(f).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for top in {n.split(".")[0] for n in names}:
            if top in sys.modules and top not in sys.stdlib_module_names and top != "xrdmatch":
                needed[top] = sorted(re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top]))
Path(out_path).write_text(json.dumps({"xrdmatch": xrdmatch.__file__, "model_root": str(root),
                                      "needed": needed, **{c: out[c].tolist() for c in out.columns}}))
'''


def test_registered_model_loads_where_xrdmatch_is_not_installed(mlflow_registry, labelled, tmp_path, repo_root):
    """The model ships its code (code_paths) and its requirements: a process that cannot import the
    installed xrdmatch loads models:/... from / and predicts the ensemble's numbers."""
    import json
    import os
    import re
    import subprocess
    import sys

    import mlflow

    from xrdmatch.platform.tracking import configure
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.evaluation import combine

    reg = mlflow_registry
    uri = f"models:/{reg.cfg.tracking.registry_name}/3"
    X = labelled.X[:9]
    np.save(tmp_path / "X.npy", X)
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_INSTALLED_XRDMATCH)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    res = subprocess.run([sys.executable, str(script), str(repo_root), reg.cfg.tracking.tracking_uri, uri,
                          str(tmp_path / "X.npy"), str(tmp_path / "out.json")],
                         cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert Path(got["xrdmatch"]).resolve().is_relative_to(Path(got["model_root"]) / "code")
    b = Ensemble.load(reg.ens_b).predict_proba(X)
    np.testing.assert_allclose(got["p_superionic"], b["p_mean"], rtol=1e-6)
    np.testing.assert_array_equal(got["superionic"], combine(b["p_members"], reg.cfg.evaluation.vote_fraction)["pred"])
    # requirements: every package the shipped code imported is pinned, with a version PyPI hosts
    configure(reg.cfg)
    local = Path(mlflow.artifacts.download_artifacts(uri))
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if "+" in r], reqs
    pinned = {re.sub(r"[-_.]+", "-", r.split("==")[0]).lower() for r in reqs}
    assert got["needed"] and all(pinned & set(d) for d in got["needed"].values()), (got["needed"], reqs)
    assert {"torch", "pydantic", "pyyaml", "safetensors"} <= pinned


def _members_proba(ens, X, block: int = 25) -> np.ndarray:
    """(members, n) probabilities computed block by block, as the screening actors do."""
    return np.concatenate([ens.predict_proba(X[i:i + block])["p_members"] for i in range(0, len(X), block)], axis=1)


@pytest.fixture(scope="module")
def custom_rule_registry(tmp_path_factory, mlflow_registry, labelled):
    """The four members of ensembles A and B as one ensemble, registered (own run dir) with a
    tracking.decision_threshold and evaluation.vote_fraction (0.75: 3 of 4 members) other than the
    model's fallbacks (0.5, 0.5). Each tiny member is nearly constant, so the threshold goes in the
    widest gap of the central values of the member whose median ranks third: the calls then
    depend on the pattern, and on both settings."""
    from types import SimpleNamespace

    from xrdmatch.config import load_config
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.registry import register_ensemble
    from xrdmatch.training.ensemble import Ensemble

    root = tmp_path_factory.mktemp("custom_rule")
    a, b = Ensemble.load(mlflow_registry.ens_a), Ensemble.load(mlflow_registry.ens_b)
    ens_dir = Ensemble(members=a.members + b.members, network=a.network, threshold=a.threshold).save(root / "ens_ab")
    P = _members_proba(Ensemble.load(ens_dir), labelled.X)
    v = np.sort(P[np.argsort(np.median(P, axis=1))[-3]])[len(labelled.X) // 4: 3 * len(labelled.X) // 4]
    gap = int(np.argmax(np.diff(v)))
    threshold = float((v[gap] + v[gap + 1]) / 2)
    cfg = load_config(None, {"run_dir": str(root / "run"), "tracking": {"decision_threshold": threshold},
                             "evaluation": {"vote_fraction": 0.75}})
    cfg.tracking.tracking_uri = RunPaths.of(cfg.run_dir).mlflow_tracking_uri
    rv = register_ensemble(cfg, ens_dir, {"grouped_cv_macro_f1": 0.5}, mlflow_registry.lineage)
    return SimpleNamespace(cfg=cfg, run_dir=root / "run", ens=ens_dir, version=rv, threshold=threshold)


def test_pyfunc_applies_the_registered_threshold_and_vote_fraction(custom_rule_registry, labelled):
    """The loaded model calls with the registered tracking.decision_threshold and
    evaluation.vote_fraction (its model config), not its fallbacks."""
    import mlflow

    from xrdmatch.platform.pyfunc_model import patterns_frame
    from xrdmatch.platform.tracking import configure
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.metrics import vote

    reg, thr = custom_rule_registry, custom_rule_registry.threshold
    configure(reg.cfg)
    model = mlflow.pyfunc.load_model(f"models:/{reg.cfg.tracking.registry_name}/{reg.version.version}")
    assert model.model_config == {"threshold": thr, "vote_fraction": 0.75}
    X = labelled.X
    P = _members_proba(Ensemble.load(reg.ens), X)
    want = vote(P, 0.75, thr)
    # the data tell the registered rule from the fallbacks, each setting on its own
    assert 0 < want.sum() < len(X)
    for other in (vote(P, 0.5, 0.5), vote(P, 0.5, thr), vote(P, 0.75, 0.5)):
        assert not np.array_equal(want, other)
    np.testing.assert_array_equal(model.predict(patterns_frame(X))["superionic"], want)


def test_screen_counts_with_the_models_rule(custom_rule_registry, tmp_path, monkeypatch):
    """`xrdmatch screen` calls superionic as the served model does (>= ceil(vote_fraction x members)
    members with p > threshold), with the model's threshold and vote_fraction, not p_mean >= the
    config's threshold."""
    import pandas as pd
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.platform.tracking import tracking_uri
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.metrics import calls, vote

    reg, thr = custom_rule_registry, custom_rule_registry.threshold
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_path = tmp_path / "screen.yaml"  # the config keeps the defaults 0.5 / 0.5: the model's values must win
    cfg_path.write_text(yaml.safe_dump({"run_dir": str(reg.run_dir), "ray": {"num_cpus": 2},
                                        "database": {"limit": 60}, "xrd": {"batch_size": 30, "workers": 1},
                                        "campaign": {"screen_batch_size": 25}}))
    out = tmp_path / "scores.parquet"
    res = CliRunner().invoke(app, ["screen", "--config", str(cfg_path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = load_config(cfg_path)
    pt = ensure_patterns(cfg, progress=False)
    P = _members_proba(Ensemble.load(reg.ens), pt.X)
    want = vote(P, 0.75, thr)
    assert 0 < want.sum() < len(want) and int(want.sum()) != int((P.mean(0) >= 0.5).sum())
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "screen-v1")
    assert run.data.metrics["n_positive"] == int(want.sum())
    assert run.data.metrics["fraction_positive"] == pytest.approx(want.mean())
    assert (run.data.tags["screen.decision_threshold"], run.data.tags["screen.vote_fraction"],
            run.data.tags["screen.rule_from"]) == (f"{thr:g}", "0.75", "model")
    assert f"{int(want.sum())} called superionic (>= 3 of 4 members with p > {thr:g})" in res.output
    # the Parquet's votes are the members over the model's threshold
    np.testing.assert_array_equal(pd.read_parquet(out)["votes"].to_numpy(), calls(P, thr).sum(0))


def test_an_unreachable_store_is_not_an_empty_registry(tmp_path, monkeypatch):
    """Real MLflow errors: a missing model or alias is "none"; a store that cannot be reached is an
    error, and `xrdmatch models` says so instead of "no registered versions"."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.platform.registry import not_found

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri, uri)
    errors = []
    for call in (lambda: client.get_model_version_by_alias("absent", "champion"),
                 lambda: (client.create_registered_model("m"), client.get_model_version_by_alias("m", "champion"))):
        with pytest.raises(MlflowException) as e:
            call()
        errors.append(e.value)
    assert all(not_found(e) for e in errors)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    down = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(MlflowException) as e:
        MlflowClient(down, down).get_model_version_by_alias("m", "champion")
    assert not not_found(e.value)
    mlflow.set_tracking_uri(uri)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "tracking": {"tracking_uri": down}}))
    res = CliRunner().invoke(app, ["models", "-c", str(cfg)])
    assert res.exit_code == 1 and "error: tracking store http://127.0.0.1:9" in res.output, res.output
    assert "no registered versions" not in res.output


def test_an_unreachable_database_tracking_store_is_one_line_without_mlflows_retries(tmp_path, caplog):
    """MLflow retries a database it cannot reach for ~100 s, logging a warning a try; the CLI
    probes it once first: one line, password masked, and no retry was logged."""
    pytest.importorskip("psycopg")
    import yaml
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                   "tracking": {"tracking_uri": "postgresql://u:s3cret@127.0.0.1:1/mlf"}}))
    res = CliRunner().invoke(app, ["models", "-c", str(cfg)])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: tracking store postgresql://u:***@127.0.0.1:1/mlf: "), res.output
    assert len(res.output.strip().splitlines()) == 1 and "s3cret" not in res.output
    assert not [r for r in caplog.records if "will be retried" in r.getMessage()]
    # a database tracking store whose driver is not installed (MySQL's default, MySQLdb): one line too
    import importlib.util

    if importlib.util.find_spec("MySQLdb") is None:
        cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                       "tracking": {"tracking_uri": "mysql://u:s3cret@127.0.0.1:1/mlf"}}))
        cif = tmp_path / "LiF.cif"
        cif.write_text("data_LiF\n_cell_length_a 4.0\n_cell_length_b 4.0\n_cell_length_c 4.0\n"
                       "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
                       "_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
                       "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
                       "Li1 Li 0 0 0\nF1 F 0.5 0.5 0.5\n")
        for args in (["models"], ["screen", "--out", str(tmp_path / "s.parquet")], ["predict", str(cif)]):
            res = CliRunner().invoke(app, [*args, "-c", str(cfg)])
            assert res.exit_code == 1, (args, res.output)
            assert res.output.startswith("error: tracking store mysql://u:***@127.0.0.1:1/mlf: the database driver "
                                         "of 'mysql' is not installed"), (args, res.output)
            assert len(res.output.strip().splitlines()) == 1, res.output


def test_a_failed_champion_lookup_promotes_nothing_and_a_retry_decides(tmp_path, labelled, monkeypatch):
    """The champion lookup fails with a store error (injected: an outage between two calls cannot
    be timed otherwise): settle_version raises and writes no decision; once the store answers, a
    retry decides on the real champion's metric."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tests.conftest import _tiny_ensemble
    from xrdmatch.config import load_config
    from xrdmatch.platform.registry import log_version, register_ensemble, settle_version
    from xrdmatch.platform.tracking import lineage_tags

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"),
                             "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    ens = _tiny_ensemble(labelled, 0, tmp_path / "ens")
    lineage = lineage_tags(labelled, labelled.X[:7])
    first = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.6}, lineage)
    version, run_id = log_version(cfg, ens, lineage)
    real = MlflowClient.get_model_version_by_alias

    def outage(self, name, alias):
        raise MlflowException("API request failed: connection refused", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", outage)
    with pytest.raises(MlflowException, match="connection refused"):
        settle_version(cfg, version, {"grouped_cv_macro_f1": 0.4}, lineage, run_id)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", real)
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    assert "promotion.promoted" not in (client.get_model_version(cfg.tracking.registry_name, version).tags or {})
    assert str(client.get_model_version_by_alias(cfg.tracking.registry_name, "champion").version) == str(first.version)
    rv = settle_version(cfg, version, {"grouped_cv_macro_f1": 0.4}, lineage, run_id)
    assert not rv.promoted and rv.aliases == ["challenger"]


def test_settling_an_old_version_again_never_takes_back_an_alias_a_later_one_holds(tmp_path, labelled):
    """A rerun of a registered training (same run), or a resume of one that crashed between its
    decision and its aliases, finishes that decision only where no later registration moved on:
    the better version registered since keeps champion and challenger."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import _tiny_ensemble
    from xrdmatch.config import load_config
    from xrdmatch.platform.registry import log_version, register_ensemble, settle_version
    from xrdmatch.platform.tracking import lineage_tags, mlflow_run

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"),
                             "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    ens = _tiny_ensemble(labelled, 0, tmp_path / "ens")
    lineage = lineage_tags(labelled, labelled.X[:7])
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    name = cfg.tracking.registry_name

    def holder(alias: str) -> str:
        return str(client.get_model_version_by_alias(name, alias).version)

    with mlflow_run(cfg, "train-A") as r:  # a training run: a rerun registers into it again
        run_a = r.info.run_id
    a = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.5}, lineage, run_id=run_a)
    b = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.7}, lineage)
    assert a.promoted and b.promoted and holder("champion") == holder("challenger") == b.version
    again = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.5}, lineage, run_id=run_a)  # a rerun of A
    assert again.resumed and again.version == a.version and again.aliases == []
    assert holder("champion") == holder("challenger") == b.version
    # C decides (promoted over B) and crashes before its aliases; D registers meanwhile
    c_version, c_run = log_version(cfg, ens, lineage)
    real = MlflowClient.set_registered_model_alias

    def crash(self, *args):
        raise RuntimeError("killed between the decision and the aliases")

    MlflowClient.set_registered_model_alias = crash
    try:
        with pytest.raises(RuntimeError):
            settle_version(cfg, c_version, {"grouped_cv_macro_f1": 0.8}, lineage, c_run)
    finally:
        MlflowClient.set_registered_model_alias = real
    d = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.9}, lineage)
    assert holder("champion") == d.version
    c = settle_version(cfg, c_version, {"grouped_cv_macro_f1": 0.8}, lineage, c_run)  # the resume of C
    assert c.promoted and c.aliases == [] and holder("champion") == holder("challenger") == d.version
    # (a resume with nothing registered in between still finishes its decision: test_campaign's
    # test_register_resumed_after_a_crash_between_version_and_aliases_settles_the_version)


def test_screening_pool_fits_the_cluster():
    """One actor per CPU, never more than blocks; GPU actors only as many as GPUs fit, and none
    on a cluster without GPUs is an error naming the setting (not a screen that waits forever)."""
    import ray

    from xrdmatch.actors.screening import pool_size
    from xrdmatch.platform.ray_utils import init_ray

    init_ray(None, 2)
    cpus = int(ray.cluster_resources()["CPU"])
    assert pool_size(21755, 1000, None, 0.0) == cpus
    assert pool_size(500, 1000, None, 0.0) == 1 and pool_size(500, 1000, 7, 0.0) == 7
    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(RuntimeError, match="campaign.screen_gpus_per_actor = 0.5 but the Ray cluster has 0 GPUs"):
        pool_size(21755, 1000, None, 0.5)


def _settle_at_once(cfg, logged, f1s, lineage) -> list:
    """settle_version of every logged version, all started together (one thread each)."""
    import threading

    from xrdmatch.platform.registry import settle_version

    start = threading.Barrier(len(logged))
    out: list = [None] * len(logged)

    def settle(i, version, run_id):
        start.wait()
        try:
            out[i] = settle_version(cfg, version, {"grouped_cv_macro_f1": f1s[i]}, lineage, run_id)
        except BaseException as e:  # noqa: BLE001 - checked below
            out[i] = e

    threads = [threading.Thread(target=settle, args=(i, v, r)) for i, (v, r) in enumerate(logged)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_registrations_settling_at_once_decide_one_after_another(tmp_path, labelled):
    """Four versions settle at the same moment (a campaign round, an `xrdmatch train`, ...). Each
    decision reads the champion, then moves the aliases: without the registry lock all four
    read the same old champion, all four 'beat' it and the last writer kept `champion` (seen:
    the worst of the four). With it the decisions form one sequence: the best version is
    champion, the newest is challenger, and every decision is the one it would be in turn."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import _tiny_ensemble
    from xrdmatch.config import load_config
    from xrdmatch.platform.registry import log_version, register_ensemble
    from xrdmatch.platform.tracking import lineage_tags

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"),
                             "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    ens = _tiny_ensemble(labelled, 0, tmp_path / "ens")
    lineage = lineage_tags(labelled, labelled.X[:7])
    first = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.5}, lineage)
    logged = [log_version(cfg, ens, lineage) for _ in range(4)]
    f1s = [0.6, 0.75, 0.65, 0.7]  # the best is neither the first nor the last logged
    settled = _settle_at_once(cfg, logged, f1s, lineage)
    assert not [s for s in settled if isinstance(s, BaseException)], settled

    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    name = cfg.tracking.registry_name
    f1 = {first.version: 0.5} | {v: f for (v, _), f in zip(logged, f1s)}
    tags = {v: client.get_model_version(name, v).tags for v, _ in logged}
    assert str(client.get_model_version_by_alias(name, "champion").version) == logged[1][0]  # 0.75
    assert str(client.get_model_version_by_alias(name, "challenger").version) == logged[-1][0]
    # serialisable: the promoted versions, in order of their metric, each replaced the one before
    promoted = sorted((v for v in tags if tags[v]["promotion.promoted"] == "true"), key=f1.get)
    assert [tags[v]["promotion.previous_champion"] for v in promoted] == [first.version, *promoted[:-1]]
    for v in tags:  # and each one left out lost to the champion of its turn
        if tags[v]["promotion.promoted"] == "false":
            assert f1[v] <= f1[tags[v]["promotion.previous_champion"]], (v, tags[v])
    assert {s.version: s.promoted for s in settled} == {v: tags[v]["promotion.promoted"] == "true" for v in tags}


def _hold_registry_lock(over: dict):
    """Another process holding the registry lock of the config ``over`` (a registration deciding)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import json, sys, time; from xrdmatch.config import load_config\n"
         "from xrdmatch.platform.registry_lock import registry_lock\n"
         "with registry_lock(load_config(None, json.loads(sys.argv[1]))):\n"
         "    print('held', flush=True); time.sleep(120)", json.dumps(over)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.skipif(not os.environ.get("XRDMATCH_TEST_PG_URL"),
                    reason="XRDMATCH_TEST_PG_URL not set (scripts/postgres.sh starts a server; .ci/run does)")
def test_a_registry_behind_a_server_locks_in_the_clusters_postgresql_store(tmp_path):
    """Cluster mode (an MLflow server over HTTP, the platform's store on PostgreSQL): the lock is
    a PostgreSQL advisory lock there, shared by every driver on the store, one per registered
    model name; kill -9 of its holder ends the session and frees it."""
    import signal

    from xrdmatch.config import load_config
    from xrdmatch.platform.registry_lock import RegistryBusy, lock_target, registry_lock

    pg = os.environ["XRDMATCH_TEST_PG_URL"]
    over = {"run_dir": str(tmp_path / "run"), "store": {"url": pg},
            "tracking": {"tracking_uri": "http://127.0.0.1:5000", "registry_name": f"lock-test-{os.getpid()}"}}
    cfg = load_config(None, over)
    assert lock_target(cfg) == pg
    holder = _hold_registry_lock(over)
    try:
        with pytest.raises(RegistryBusy, match=rf"registry 'lock-test-{os.getpid()}': .*PostgreSQL advisory lock"):
            with registry_lock(cfg, timeout_s=0.5):
                pass
        other = load_config(None, over | {"tracking": over["tracking"] | {"registry_name": "another-model"}})
        with registry_lock(other, timeout_s=0.5):  # another model's decisions do not wait
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with registry_lock(cfg, timeout_s=10):
        with pytest.raises(RegistryBusy):  # held by this session now: a second session waits
            with registry_lock(cfg, timeout_s=0.3):
                pass


def test_train_that_cannot_take_the_registry_lock_says_so_and_a_rerun_registers(tmp_path, monkeypatch):
    """Another registration holds the lock (an flock beside the run's SQLite registry) and
    `xrdmatch train` waits past tracking.registry_lock_timeout_s: one line naming the setting,
    exit 1, no promotion decided, the ensemble kept. kill -9 of the holder frees the lock (the
    kernel drops the flock), and the same command then registers that ensemble without training
    it again."""
    import signal

    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.registry_lock import lock_target
    from xrdmatch.platform.tracking import configure

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = {"run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2}, "database": {"limit": 24},
            "xrd": {"batch_size": 12, "workers": 1},
            "training": {"iterations": 2, "batch_labelled": 8, "batch_unlabelled": 8, "ensemble_size": 1,
                         "unlabelled_limit": 16},
            "campaign": {"eval_folds": 0}, "tracking": {"registry_lock_timeout_s": 0.5}}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(over))
    assert lock_target(load_config(cfg)) == f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}"
    holder = _hold_registry_lock(over)
    try:
        res = CliRunner().invoke(app, ["train", "--no-ray", "--config", str(cfg)])
        assert res.exit_code == 1, res.output
        assert ("error: registry 'xrdmatch-superionic': another registration held its promotion lock "
                f"({tmp_path / 'run' / 'mlflow' / 'mlflow.db.registry.lock'}) for more than 0.5 s "
                "(tracking.registry_lock_timeout_s); the ensemble is saved and logged") in res.output
        assert "Traceback" not in res.output
        client = MlflowClient(configure(load_config(cfg)))
        (mv,) = client.search_model_versions("name='xrdmatch-superionic'")
        assert "promotion.promoted" not in mv.tags and not mv.aliases  # logged, nothing decided
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = CliRunner().invoke(app, ["train", "--no-ray", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "already trained with these labels" in res.output and "trained 1 members" not in res.output
    assert "registered xrdmatch-superionic v1 (challenger, champion; promoted to champion)" in res.output


def test_promote_rolls_the_champion_back_and_the_next_registration_is_compared_with_it(tmp_path, labelled,
                                                                                        monkeypatch):
    """`xrdmatch promote 1` after v2 became champion: v1 holds `champion` (what predict and screen
    load), the move is a tag of v1 with its reason, and a later registration is compared with v1.
    An unknown version or alias is one line and changes nothing."""
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from tests.conftest import _tiny_ensemble
    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.registry import default_model_uri, register_ensemble
    from xrdmatch.platform.tracking import configure, lineage_tags

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}))
    cfg = load_config(cfg_file)
    ens = _tiny_ensemble(labelled, 0, tmp_path / "ens")
    lineage = lineage_tags(labelled, labelled.X[:7])
    for f1 in (0.5, 0.7):
        register_ensemble(cfg, ens, {"grouped_cv_macro_f1": f1}, lineage)
    client = MlflowClient(configure(cfg))
    name = cfg.tracking.registry_name

    def holder(alias: str) -> str:
        return str(client.get_model_version_by_alias(name, alias).version)

    run = CliRunner().invoke
    res = run(app, ["promote", "1", "--reason", "v2 called every sulfide superionic", "-c", str(cfg_file)])
    assert res.exit_code == 0, res.output
    assert "xrdmatch-superionic@champion: v2 -> v1" in res.output
    assert holder("champion") == "1" and holder("challenger") == "2"
    res = run(app, ["promote", "2", "--alias", "challenger", "-c", str(cfg_file)])
    assert res.exit_code == 0 and "xrdmatch-superionic@challenger is v2 already; nothing changed" in res.output
    assert not [t for t in client.get_model_version(name, "2").tags if t.startswith("promotion.by_hand")]
    assert default_model_uri(cfg) == "models:/xrdmatch-superionic@champion"
    tag = client.get_model_version(name, "1").tags["promotion.by_hand.champion"]
    assert tag.startswith("was v2, at 20") and tag.endswith(": v2 called every sulfide superionic")
    from xrdmatch.platform.campaign_store import CampaignStore, campaign_id_for
    from xrdmatch.platform.report import campaign_status

    run_dir = tmp_path / "run"
    CampaignStore(f"sqlite:///{run_dir / 'store.db'}", campaign_id_for(run_dir)).ensure_campaign(str(run_dir), {})
    (line,) = [ln for ln in campaign_status(cfg) if ln.startswith("champion:")]
    assert line.startswith("champion: xrdmatch-superionic v1 (grouped_cv_macro_f1 0.500); set by hand (was v2, at 20")
    assert line.endswith(": v2 called every sulfide superionic)")
    monkeypatch.setenv("COLUMNS", "80")  # `models` prints one block per version at this width
    listing = run(app, ["models", "-c", str(cfg_file)]).output
    assert "version 2\n    aliases: challenger\n" in listing and "version 1\n    aliases: champion (by hand)\n" in listing, listing

    for args, why in ((["promote", "9"], "error: xrdmatch-superionic has no version '9' (registered: 1, 2)"),
                      (["promote", "2", "--alias", "prod"], "error: --alias 'prod': one of champion, challenger"),
                      (["promote", "v2"], "Invalid value for 'version'")):
        res = run(app, [*args, "-c", str(cfg_file)])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    assert holder("champion") == "1"

    v3 = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": 0.6}, lineage)  # beats v1's 0.5, not v2's 0.7
    assert v3.promoted and holder("champion") == v3.version
    assert client.get_model_version(name, v3.version).tags["promotion.previous_champion"] == "1"
