"""Evaluation: split properties, metrics against hand-computed cases, protocols end to end (CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xrdmatch.training.metrics import best_threshold, binary_metrics, calls, summarise_repeats, vote
from xrdmatch.training.splits import (
    grouped_stratified_kfold,
    inner_split,
    paper_label_draws,
    paper_pool,
    repeated_grouped_splits,
    subsample_groups,
)

# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("folds", [2, 5])
def test_grouped_cv_on_the_112_never_splits_a_formula_and_is_stratified(labelled, folds):
    y, g = labelled.y, np.asarray(labelled.groups)
    splits = repeated_grouped_splits(y, g, folds=folds, repeats=3, seed=0)
    assert len(splits) == 3 * folds
    prevalence = y.mean()
    for r in range(3):
        reps = [s for s in splits if s.repeat == r]
        tests = np.concatenate([s.test for s in reps])
        assert sorted(tests.tolist()) == list(range(len(y)))  # a partition: every compound tested once
        for s in reps:
            assert len(np.intersect1d(s.train, s.test)) == 0
            assert len(s.train) + len(s.test) == len(y)
            assert not set(g[s.train]) & set(g[s.test]), "a reduced formula straddles train/test"
            # stratified: each test fold's superionic share within 1 compound-ish of the overall 20.5 %
            n_pos = int(y[s.test].sum())
            expected = prevalence * len(s.test)
            assert abs(n_pos - expected) <= 1.5, (r, s.fold, n_pos, expected)
    # the repeats are different partitions
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(splits[:folds], splits[folds : 2 * folds]))


def test_polymorphs_share_a_fold(labelled):
    g = np.asarray(labelled.groups)
    for tr, te in grouped_stratified_kfold(labelled.y, g, 5, seed=3):
        for formula in ("Li3N", "Li7La3Zr2O12", "Li3PS4"):
            members = np.flatnonzero(g == formula)
            assert np.isin(members, te).all() or not np.isin(members, te).any()


def test_subsample_groups_keeps_whole_formulas_of_both_classes(labelled):
    y, g = labelled.y.astype(int), np.asarray(labelled.groups)
    tr, _ = grouped_stratified_kfold(y, g, 5, seed=0)[0]
    half = subsample_groups(tr, y, g, 0.5, seed=1)
    assert set(half) < set(tr)  # a strict subset of the training fold
    for formula in set(g[half]):  # every compound of a drawn formula comes along
        assert set(np.flatnonzero(g == formula)) & set(tr) <= set(half)
    for c in (0, 1):  # about half the formulas of each class
        n_all, n_half = len(set(g[tr][y[tr] == c])), len(set(g[half][y[half] == c]))
        assert abs(n_half - n_all / 2) <= 1.5, (c, n_half, n_all)
    assert np.array_equal(half, subsample_groups(tr, y, g, 0.5, seed=1))
    assert not np.array_equal(half, subsample_groups(tr, y, g, 0.5, seed=2))
    assert np.array_equal(subsample_groups(tr, y, g, 1.0, seed=1), tr)
    assert y[subsample_groups(tr, y, g, 0.01, seed=1)].sum() >= 2  # never a class left out
    with pytest.raises(ValueError, match="frac"):
        subsample_groups(tr, y, g, 0.0, seed=1)
    # each class's share exactly, formulas with both labels (Li3PS4, Li7La3Zr2O12) drawn once, as superionic
    mixed = {f for f in set(g) if set(y[g == f]) == {0, 1}}
    assert mixed == {"Li3PS4", "Li7La3Zr2O12"}
    for k, (tr, _) in enumerate(grouped_stratified_kfold(y, g, 5, seed=0) + grouped_stratified_kfold(y, g, 5, seed=1)):
        sup = set(g[tr][y[tr] == 1])
        other = set(g[tr]) - sup
        for frac in (0.25, 0.5):
            kept = set(g[subsample_groups(tr, y, g, frac, seed=k)])
            assert len(kept & sup) == max(2, round(frac * len(sup))), (k, frac)
            assert len(kept & other) == max(2, round(frac * len(other))), (k, frac)


def test_splits_are_deterministic_given_the_seed(labelled):
    a = repeated_grouped_splits(labelled.y, labelled.groups, 5, 2, seed=7)
    b = repeated_grouped_splits(labelled.y, labelled.groups, 5, 2, seed=7)
    c = repeated_grouped_splits(labelled.y, labelled.groups, 5, 2, seed=8)
    assert all(np.array_equal(x.test, z.test) for x, z in zip(a, b))
    assert not all(np.array_equal(x.test, z.test) for x, z in zip(a, c))


def test_inner_split_stays_inside_the_training_fold(labelled):
    y, g = labelled.y, np.asarray(labelled.groups)
    for s in repeated_grouped_splits(y, g, 5, 1, seed=0):
        itr, iva = inner_split(s.train, y, g, n_splits=4, seed=11)
        assert np.isin(itr, s.train).all() and np.isin(iva, s.train).all()
        assert not np.isin(iva, s.test).any() and not np.isin(itr, s.test).any()
        assert sorted(np.concatenate([itr, iva]).tolist()) == sorted(s.train.tolist())
        assert not set(g[itr]) & set(g[iva])
        assert 0 < y[iva].sum() < len(iva)


def test_impossible_splits_fail_with_a_clear_message():
    y = np.array([1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="class 1 has only 1 groups"):
        grouped_stratified_kfold(y, list("abcdef"), 2, 0)
    with pytest.raises(ValueError, match="folds must be"):
        grouped_stratified_kfold(y, list("aabbcc"), 4, 0)


def test_paper_pool_replays_numpy_seed_0(labelled):
    y = labelled.y
    np.random.seed(0)
    perm = np.random.permutation(len(y))  # the authors' global-state call
    pool, hold = paper_pool(y, seed=0)
    assert len(pool) == 93 and len(hold) == 19
    assert int(y[pool].sum()) == 19 and int(y[hold].sum()) == 4
    first_pos = [i for i in perm if y[i] == 1][:19]
    first_neg = [i for i in perm if y[i] == 0][:74]
    assert sorted(pool.tolist()) == sorted(first_pos + first_neg)
    draws = paper_label_draws(y, pool, n_members=10, seed=0)
    assert len(draws) == 10
    for d in draws:
        assert len(d) == 20 and int(y[d].sum()) == 10 and np.isin(d, pool).all()
    assert len({tuple(d) for d in draws}) == 10
    again = paper_label_draws(y, pool, n_members=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))


def test_grouped_cv_plan_never_trains_or_selects_on_the_test_fold(labelled):
    from xrdmatch.config import load_config
    from xrdmatch.training.evaluation import EvalData, plan_grouped_cv, training_config

    cfg = load_config(None, {"evaluation": {"threshold_selection": "inner", "folds": 5, "repeats": 2}})
    tcfg = training_config(cfg)
    data = EvalData(X=labelled.X, y=labelled.y, ids=labelled.ids, formulas=labelled.formulas,
                    groups=np.asarray(labelled.groups), X_unlab=labelled.X[:4], data_hash="d", unlab_hash="u",
                    unlab_source="test")
    plan = plan_grouped_cv(cfg, data)
    splits, jobs, inner = plan.splits, plan.jobs, plan.inner
    by_fold = {(s.repeat, s.fold): s for s in splits}
    # supervised 1 + fixmatch 1 + flexmatch 5 (the single flexmatch model is member 0), x2 phases
    assert len(jobs) == len(splits) * 2 * (1 + 1 + tcfg.ensemble_size)
    assert len({j.digest for j in jobs}) == len(jobs)
    for j in jobs:
        r, f, phase = j.key.split("/")[:3]
        s = by_fold[(int(r[1:]), int(f[1:]))]
        assert np.isin(j.train, s.train).all() and not np.isin(j.train, s.test).any()
        if phase == "inner":  # model selection data: inside the training fold only
            assert np.isin(j.predict, s.train).all()
            assert np.array_equal(j.predict, inner[(s.repeat, s.fold)][1])
        else:
            assert np.array_equal(j.predict, s.test)


# ---------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_case():
    # 10 compounds, 4 superionic. Predictions: TP=3, FN=1, FP=1, TN=5.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    m = binary_metrics(y, pred, score=None)
    p1, r1 = 3 / 4, 3 / 4
    f1_pos = 2 * p1 * r1 / (p1 + r1)  # 0.75
    p0, r0 = 5 / 6, 5 / 6
    f1_neg = 2 * p0 * r0 / (p0 + r0)  # 0.8333
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1_superionic"] == pytest.approx(f1_pos)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["prevalence"] == pytest.approx(0.4)


def test_pr_auc_is_average_precision():
    # ranking by score: 1 (pos), 0.8 (neg), 0.6 (pos), 0.2 (neg): AP = (1/1 + 2/3) / 2
    m = binary_metrics([1, 0, 1, 0], [1, 1, 1, 0], score=[1.0, 0.8, 0.6, 0.2])
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    perfect = binary_metrics([0, 0, 1, 1], [0, 0, 1, 1], score=[0.1, 0.2, 0.7, 0.9])
    assert perfect["pr_auc"] == pytest.approx(1.0) and perfect["macro_f1"] == pytest.approx(1.0)
    assert math.isnan(binary_metrics([0, 0], [0, 1], score=[0.1, 0.9])["pr_auc"])


def test_no_predicted_superionic_counts_as_zero_not_crash():
    m = binary_metrics([1, 0, 0], [0, 0, 0], score=[0.4, 0.1, 0.2])
    assert m["precision"] == 0 and m["recall"] == 0 and m["f1_superionic"] == 0
    assert m["macro_f1"] == pytest.approx((0 + 0.8) / 2)


def test_summary_is_mean_and_std_over_repeats():
    rows = [
        {"repeat": 0, "macro_f1": 0.6}, {"repeat": 0, "macro_f1": 0.8},  # repeat mean 0.7
        {"repeat": 1, "macro_f1": 0.9}, {"repeat": 1, "macro_f1": 0.9},  # repeat mean 0.9
    ]
    s = summarise_repeats(rows, keys=("macro_f1",))
    assert s["macro_f1"] == pytest.approx(0.8)
    assert s["macro_f1_std"] == pytest.approx(0.1)
    assert s["macro_f1_fold_std"] == pytest.approx(np.std([0.6, 0.8, 0.9, 0.9]))
    assert s["std_over"] == "repeats"
    one = summarise_repeats(rows[:2], keys=("macro_f1",))  # one repeat: the folds' spread
    assert one["macro_f1_std"] == pytest.approx(0.1) and one["std_over"] == "folds"


def test_one_decision_rule_for_members_ensembles_and_the_served_model():
    """p > threshold (a tie is not superionic, as the network's argmax), >= ceil(f x n) votes."""
    from xrdmatch.platform.pyfunc_model import decide
    from xrdmatch.training.evaluation import combine

    assert calls([0.5, 0.5000001, 0.2]).tolist() == [0, 1, 0]
    assert calls([0.6, 0.7], threshold=0.6).tolist() == [0, 1]
    P = np.array([[0.9, 0.5, 0.1]] * 5 + [[0.1, 0.9, 0.1]] * 5)  # 5 of 10 / 5 of 10 / 0 of 10 votes
    assert vote(P, 0.5).tolist() == [1, 1, 0] and vote(P, 0.6).tolist() == [0, 0, 0]
    assert vote(P[:1], 0.5).tolist() == calls(P[0]).tolist()  # one member: its own call
    c = combine(P, 0.5)
    assert c["votes"].tolist() == [5, 5, 0] and c["pred"].tolist() == [1, 1, 0]
    assert decide({"p_mean": P.mean(0), "p_members": P}, 0.5, 0.5).tolist() == [1, 1, 0]
    assert decide({"p_mean": np.array([0.5, 0.51])}, 0.5, 0.5).tolist() == [0, 1]


def test_best_threshold_maximises_macro_f1():
    y = np.array([0, 0, 0, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.35, 0.4])
    t = best_threshold(y, score)
    assert 0.3 <= t < 0.35
    assert binary_metrics(y, score > t)["macro_f1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- protocols end to end (real Ray, real training)

TINY = {
    "ray": {"num_cpus": 2},
    "database": {"limit": 24},
    "xrd": {"batch_size": 12, "workers": 1},
    "training": {"iterations": 2, "batch_labelled": 8, "batch_unlabelled": 8, "ensemble_size": 2},
    "evaluation": {
        "folds": 2, "repeats": 1, "unlabelled_limit": 16, "paper_members": 2,
        "methods": ["supervised", "flexmatch", "flexmatch-ensemble"],
    },
}


def _tiny_config(tmp_path, extra=None, run_dir=None):
    import yaml

    from xrdmatch.config import _merge

    data = _merge(TINY, {"run_dir": str(run_dir or tmp_path / "run")})
    if extra:
        data = _merge(data, extra)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_run")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _kill_cli_when(args, ready, timeout=240):
    """Run the CLI in its own session; SIGKILL the whole group once ``ready()`` is true."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "xrdmatch.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _a_member_cached(cache_dir):
    # a finished member, not the .tmp.npz it is written to before its atomic rename
    return lambda: cache_dir.is_dir() and any(not f.name.endswith(".tmp.npz") for f in cache_dir.glob("*.npz"))


def test_cli_grouped_cv_resumes_after_kill_9_and_writes_the_json_shape(tmp_path, ray_local, shared_run, labelled):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cfg = _tiny_config(tmp_path, {"training": {"iterations": 5}}, run_dir=shared_run)
    out, md = tmp_path / "cv.json", tmp_path / "cv.md"
    args = ["evaluate", "--protocol", "grouped-cv", "--config", str(cfg), "--out", str(out), "--markdown", str(md)]
    cache = shared_run / "evaluation" / "grouped-cv" / "members"
    rc = _kill_cli_when(args, _a_member_cached(cache))
    assert rc == -9 and not out.exists(), "the first run should have been killed mid-way"
    cached = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cache.glob("*.npz") if not f.name.endswith(".tmp.npz")}
    n_cached = len(cached)
    assert 1 <= n_cached < 6
    (killed,) = [r for r in _client(cfg).search_runs([_client(cfg).get_experiment_by_name("xrdmatch").experiment_id])
                 if r.info.run_name == "evaluate-grouped-cv"]
    assert killed.info.status == "RUNNING"  # kill -9: nothing could close it
    res = CliRunner().invoke(app, args)  # same command again: resumes
    assert res.exit_code == 0, res.output
    assert f"resuming MLflow run {killed.info.run_id} (running)" in res.output
    assert f"6 member trainings: {n_cached} cached, {6 - n_cached} to run" in res.output
    # the finished members were read, not trained and written again
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cached} == cached
    assert len(list(cache.glob("*.npz"))) == 6
    # the finished evaluation is an MLflow run: config, per-method metrics, JSON and figures
    run = _finished_run(cfg, "evaluate-grouped-cv")
    assert run.info.run_id == killed.info.run_id  # the killed run was finished, not left RUNNING beside a new one
    assert run.data.params["evaluation.folds"] == "2" and run.data.tags["xrdmatch.kind"] == "evaluate"
    assert 0.0 <= run.data.metrics["flexmatch-ensemble.macro_f1"] <= 1.0
    assert run.data.tags["lineage.labelled_count"] == "112" and run.data.tags["lineage.unlabelled_hash"]
    arts = _artifacts(cfg, run, "evaluation")
    for want in ("cv.json", "confusion_matrix_flexmatch-ensemble.png",
                 "pr_curve_flexmatch-ensemble.png", "calibration_flexmatch-ensemble.png"):
        assert f"evaluation/{want}" in arts, arts
    r = json.loads(out.read_text())
    assert r["protocol"] == "grouped-cv"
    assert [x["method"] for x in r["results"]] == ["supervised", "flexmatch", "flexmatch-ensemble"]
    for x in r["results"]:
        for k in ("macro_f1", "macro_f1_std", "f1_superionic", "f1_superionic_std", "precision", "recall", "pr_auc"):
            assert isinstance(x[k], float) and 0.0 <= x[k] <= 1.0, (x["method"], k, x[k])
    assert {"machine", "wall_time_s", "config", "folds", "per_fold", "predictions"} <= set(r)
    assert r["config"]["evaluation"]["folds"] == 2 and r["member_trainings"] == 2 * (1 + 2)
    # per-sample predictions: each of the 112 compounds scored exactly once per method (1 repeat)
    p = r["predictions"]["flexmatch-ensemble"]
    assert sorted(p["id"]) == sorted(set(p["id"])) and len(p["id"]) == 112
    assert all(0.0 <= v <= 1.0 for v in p["p"]) and set(p["votes"]) <= {0, 1, 2}
    # the single flexmatch model is member 0 of the ensemble: fewer trainings, same seeds
    assert len(p["pred"]) == len(r["predictions"]["flexmatch"]["pred"])
    # no formula of a test fold is in its training fold: every compound is tested once per repeat,
    # so each reduced formula must sit in exactly one test fold (the rest of the 112 train it)
    for f in r["folds"]:
        assert f["n_train"] + f["n_test"] == 112 and f["n_superionic_test"] >= 1
    folds_of = {}
    for g, rep, fold in zip(p["group"], p["repeat"], p["fold"]):
        folds_of.setdefault((rep, g), set()).add(fold)
    assert len(folds_of) < 112 and all(len(v) == 1 for v in folds_of.values())  # 103 formulas, none split
    # the numbers follow from the predictions: true labels, per-fold metrics, their mean
    from xrdmatch.training.metrics import binary_metrics

    truth = dict(zip(labelled.ids, np.asarray(labelled.y).tolist()))
    for x in r["results"]:
        pm = r["predictions"][x["method"]]
        assert [truth[i] for i in pm["id"]] == pm["y"]
        rows = [f for f in r["per_fold"] if f["method"] == x["method"]]
        assert len(rows) == 2
        for f in rows:
            sel = [k for k, (rep, fold) in enumerate(zip(pm["repeat"], pm["fold"])) if (rep, fold) == (f["repeat"], f["fold"])]
            want = binary_metrics(np.asarray(pm["y"])[sel], np.asarray(pm["pred"])[sel], np.asarray(pm["p"])[sel])
            for k in ("macro_f1", "f1_superionic", "precision", "recall", "pr_auc"):
                assert f[k] == pytest.approx(want[k], abs=1e-9), (x["method"], f["fold"], k)
        for k in ("macro_f1", "f1_superionic", "pr_auc"):
            assert x[k] == pytest.approx(np.mean([f[k] for f in rows]), abs=1e-9)
            assert run.data.metrics[f"{x['method']}.{k}"] == pytest.approx(x[k], abs=1e-9)
    table = md.read_text()
    assert table.startswith("| method | macro-F1 |") and "flexmatch-ensemble" in table and "wall time" in table
    # same command again: every member prediction comes from the cache, identical numbers
    out2 = tmp_path / "cv2.json"
    res2 = CliRunner().invoke(app, args[:-4] + ["--out", str(out2)])
    assert res2.exit_code == 0, res2.output
    assert "6 cached, 0 to run" in res2.output
    assert f"already evaluated with these settings, data and code: MLflow run {run.info.run_id}" in res2.output
    runs = [r for r in _client(cfg).search_runs([run.info.experiment_id]) if r.info.run_name == "evaluate-grouped-cv"]
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # one run per evaluation, however often it is run
    r2 = json.loads(out2.read_text())
    assert [x["macro_f1"] for x in r2["results"]] == [x["macro_f1"] for x in r["results"]]
    # --from-json renders without training
    res3 = CliRunner().invoke(app, ["evaluate", "--from-json", str(out)])
    assert res3.exit_code == 0 and "supervised" in res3.output and "macro-F1" in res3.output


def test_paper_protocol_reports_what_the_paper_reports(tmp_path, ray_local, shared_run):
    from xrdmatch.config import load_config
    from xrdmatch.training.evaluation import evaluate_paper, results_markdown

    # same run directory as the grouped-cv test: the XRD patterns cache is reused
    cfg = load_config(_tiny_config(tmp_path, {"evaluation": {"paper_methods": ["flexmatch-ensemble"]}},
                                   run_dir=shared_run))
    r = evaluate_paper(cfg)
    assert r["protocol"] == "paper" and r["paper_reported"]["macro_f1_all112"] == 0.918
    (x,) = r["results"]
    for k in ("macro_f1", "macro_f1_std", "f1_superionic", "precision", "recall", "pr_auc",
              "macro_f1_all112", "macro_f1_unseen", "member_macro_f1_unseen"):
        assert 0.0 <= x[k] <= 1.0, k
    assert x["macro_f1"] == x["macro_f1_unseen"]
    # 2 members x 20 labels from the 93-compound pool: >= 19 held-out + pool leftovers are unseen
    assert 112 - 40 <= x["n_unseen"] <= 112 - 20 and x["votes_needed"] == 1
    assert len(r["split"]["pool"]) == 93 and len(r["split"]["holdout"]) == 19
    pm = r["predictions"]["flexmatch-ensemble"]
    trained = pm["trained_on"]
    assert sum(trained) == 112 - x["n_unseen"]
    # all-112 and unseen figures follow from the per-compound calls
    from xrdmatch.training.metrics import binary_metrics

    y, pred, prob = (np.asarray(pm[k]) for k in ("y", "pred", "p"))
    unseen = np.asarray(trained) == 0
    assert x["macro_f1_all112"] == pytest.approx(binary_metrics(y, pred, prob)["macro_f1"], abs=1e-9)
    want = binary_metrics(y[unseen], pred[unseen], prob[unseen])
    assert x["macro_f1_unseen"] == pytest.approx(want["macro_f1"], abs=1e-9)
    assert x["f1_superionic_unseen"] == pytest.approx(want["f1_superionic"], abs=1e-9)
    md = results_markdown(r)
    assert "paper (published" in md
    # figures depend on the CPU model: the result and its table name it
    assert r["machine"]["cpu"] and f"CPUs of {r['machine']['cpu']} (" in md


def test_members_trained_elsewhere_are_the_members_ray_trains(tmp_path, ray_local, shared_run, repo_root):
    """network_accuracy.py --export-jobs + scripts/train_member_jobs.py (the path of a GPU
    machine without Ray): the same cache files, bit for bit, as the evaluation's Ray tasks."""
    import shutil
    import subprocess
    import sys

    from xrdmatch.config import load_config
    from xrdmatch.training.evaluation import evaluate_grouped_cv, load_eval_data, plan_grouped_cv, training_config

    cfg_path = _tiny_config(tmp_path, run_dir=shared_run)
    dest, jobs_dir, out = tmp_path / "acc", tmp_path / "jobs", tmp_path / "out"
    common = [str(cfg_path), "--networks", "fast", "--methods", "supervised,flexmatch", "--iterations", "2",
              "--folds", "2", "--repeats", "1", "--dir", str(dest)]
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=repo_root, capture_output=True, text=True)  # noqa: E731
    r = run("benchmarks/network_accuracy.py", "--config", *common, "--export-jobs", str(jobs_dir))
    assert r.returncode == 0, r.stderr
    assert "fast: 4 member trainings exported" in r.stdout and not (dest / "fast" / "evaluation").exists()
    r = run("scripts/train_member_jobs.py", str(jobs_dir), "--out", str(out), "--device", "cpu", "--workers", "2")
    assert r.returncode == 0, r.stderr
    shutil.copytree(out, dest, dirs_exist_ok=True)

    # the evaluation as network_accuracy.py configures it, run here through Ray in another folder
    over = {"training": {"network": "fast"},
            "evaluation": {"methods": ["supervised", "flexmatch"], "iterations": 2, "folds": 2, "repeats": 1}}
    ref = load_config(cfg_path, {**over, "run_dir": str(tmp_path / "ref")})
    evaluate_grouped_cv(ref)
    ref_plan = plan_grouped_cv(ref, load_eval_data(ref, training_config(ref), print))
    cfg = load_config(cfg_path, {**over, "run_dir": str(dest / "fast")})
    plan = plan_grouped_cv(cfg, load_eval_data(cfg, training_config(cfg), print))
    jobs = ref_plan.jobs
    assert [j.cache_name() for j in jobs] == [j.cache_name() for j in plan.jobs] and len(jobs) == 4
    assert not plan.uncached() and not ref_plan.uncached()
    for j in jobs:
        with np.load(plan.cache_dir / j.cache_name()) as a, np.load(ref_plan.cache_dir / j.cache_name()) as b:
            assert np.array_equal(a["p"], b["p"]) and np.array_equal(a["predict"], b["predict"]), j.key
    assert not list(plan.cache_dir.glob("*.tmp.npz"))


def _client(cfg_path):
    from mlflow.tracking import MlflowClient

    from xrdmatch.config import load_config
    from xrdmatch.platform.tracking import tracking_uri

    uri = tracking_uri(load_config(cfg_path))
    return MlflowClient(uri, uri)  # the registry too: else MLflow's process-wide one (another test's)


def _finished_run(cfg_path, name: str):
    client = _client(cfg_path)
    exp = client.get_experiment_by_name("xrdmatch")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name and r.info.status == "FINISHED"]
    assert runs, f"no finished MLflow run {name}"
    return runs[0]


def _artifacts(cfg_path, run, path=None) -> set[str]:
    return {a.path for a in _client(cfg_path).list_artifacts(run.info.run_id, path)}


def test_train_cli_resumes_after_kill_9_logs_the_run_and_registers_once(tmp_path, ray_local, monkeypatch):
    """`xrdmatch train` killed mid-training: the rerun reopens the same MLflow run, resumes the
    member from its Ray Train checkpoint, logs curves and lineage once, scores the promotion
    metric and registers one pyfunc version that becomes champion (the first one) and shows in
    `xrdmatch models`; a third call trains nothing and registers nothing."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.training.ensemble import Ensemble

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, {"training": {"iterations": 30, "checkpoint_every": 5, "ensemble_size": 1,
                                               "unlabelled_limit": 16},
                                  "campaign": {"eval_folds": 2, "eval_iterations": 2}}, run_dir=run_dir)
    args = ["train", "--config", str(cfg)]

    # killed once Ray Train has recorded a checkpoint (a checkpoint folder appears on disk before
    # it is recorded, and a kill then leaves nothing to resume from)
    from tests.conftest import registered_checkpoints

    rc = _kill_cli_when(args, lambda: registered_checkpoints(run_dir / "train", "train-*/ray_results/*"))
    assert rc == -9, "the first run should have been killed mid-training"
    assert not list((run_dir / "models").glob("train-*/ensemble.json"))
    client = _client(cfg)
    exp = client.get_experiment_by_name("xrdmatch")
    killed = client.search_runs([exp.experiment_id], "tags.`xrdmatch.kind` = 'train'")
    assert len(killed) == 1 and killed[0].info.status == "RUNNING"

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"resuming MLflow run {killed[0].info.run_id}" in res.output
    assert "registered xrdmatch-superionic v1" in res.output and "champion" in res.output
    runs = client.search_runs([exp.experiment_id], "tags.`xrdmatch.kind` = 'train'")
    assert [r.info.run_id for r in runs] == [killed[0].info.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("train-")
    hist = Ensemble.load(run.data.tags["xrdmatch.model_dir"]).members[0].history
    assert [h["step"] for h in hist] == list(range(1, 31))
    assert hist[-1]["attempt_start"] >= 5  # continued from a checkpoint, not from step 0
    # the loss curve was logged once, not once per attempt
    assert [h.step for h in client.get_metric_history(run.info.run_id, "member0.loss")] == list(range(1, 31))
    assert "plots/learning_curves.png" in _artifacts(cfg, run, "plots")
    assert run.data.params["training.iterations"] == "30"
    # lineage: the 16 of the 24 database patterns the member trained on, not the whole database
    assert run.data.tags["lineage.labelled_count"] == "112" and run.data.tags["lineage.unlabelled_count"] == "16"
    assert 0.0 <= run.data.metrics["grouped_cv_macro_f1"] <= 1.0 and run.data.metrics["n_labelled"] == 112
    # the promotion metric is the pooled out-of-fold calls of the cached fold members
    from xrdmatch.config import load_config
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.training.dataset import build_training_set
    from xrdmatch.training.metrics import binary_metrics, calls

    c = load_config(cfg)
    pt = ensure_patterns(c, progress=False)
    ls, _ = build_training_set(c, pt)
    from xrdmatch.platform.tracking import array_hash
    from xrdmatch.training.dataset import unlabelled_pool
    from xrdmatch.training.ensemble import unlabelled_subset

    seen = unlabelled_subset(unlabelled_pool(pt, ls), c.training)
    assert len(seen) == 16 and run.data.tags["lineage.unlabelled_hash"] == array_hash(seen) != array_hash(pt.X)
    files = sorted((run_dir / "champion" / "members").glob("*.npz"))
    assert len(files) == 2 * c.campaign.eval_ensemble_size
    total, count = np.zeros(len(ls.y)), np.zeros(len(ls.y))
    for f in files:  # the test compounds (the labels file) sit after the training labels
        with np.load(f) as z:
            total[z["predict"] - len(ls)] += z["p"]
            count[z["predict"] - len(ls)] += 1
    assert (count == c.campaign.eval_ensemble_size).all()  # every compound tested in exactly one fold
    p = total / count
    want = binary_metrics(np.asarray(ls.y), calls(p), p)
    assert run.data.metrics["grouped_cv_macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-9)
    assert run.data.metrics["grouped_cv_pr_auc"] == pytest.approx(want["pr_auc"], abs=1e-9)
    versions = client.search_model_versions("name='xrdmatch-superionic'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run.info.run_id
    assert run.data.tags["registry.version"] == "1" and run.data.tags["registry.promoted"] == "true"
    res = CliRunner().invoke(app, ["models", "--config", str(cfg)])
    assert res.exit_code == 0 and "champion" in res.output and "112" in res.output, res.output

    res = CliRunner().invoke(app, args)  # finished: nothing is trained or registered again
    assert res.exit_code == 0, res.output
    assert "already trained" in res.output and "registered xrdmatch-superionic v1" in res.output
    assert len(client.search_runs([exp.experiment_id], "tags.`xrdmatch.kind` = 'train'")) == 1
    assert len(client.search_model_versions("name='xrdmatch-superionic'")) == 1


def test_unknown_method_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cfg = _tiny_config(tmp_path, {"evaluation": {"methods": ["supervised", "meanteacher"]}})
    res = CliRunner().invoke(app, ["evaluate", "--config", str(cfg), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2
    assert "meanteacher" in res.output and not (tmp_path / "x.json").exists()


def test_a_failing_member_keeps_the_others_work_and_names_itself(tmp_path, ray_local, labelled):
    """One member training raises (here: a job whose training indices are out of range): the
    others finish and are cached, and the error names the failed member and its exception."""
    from xrdmatch.config import Config, TrainingConfig
    from xrdmatch.training.evaluation import MemberJob, MemberTrainingError, run_jobs

    X, y = np.asarray(labelled.X, np.float32), np.asarray(labelled.y, np.int64)
    tcfg = TrainingConfig(network="fast", algorithm="supervised", iterations=2, batch_labelled=8, ensemble_size=1)
    good = MemberJob("f0/m0", "supervised", 1, np.arange(0, 80), np.arange(80, 112), digest="good")
    bad = MemberJob("f1/m0", "supervised", 2, np.arange(100, 130), np.arange(0, 10), digest="bad")
    cache = tmp_path / "members"
    logs: list[str] = []
    with pytest.raises(MemberTrainingError, match=r"1 of 2 member trainings failed .*f1/m0: IndexError") as e:
        run_jobs([good, bad], X, y, np.zeros((0, X.shape[1]), np.float32), tcfg, cache, Config(), logs.append)
    assert not isinstance(e.value, ValueError)  # `evaluate` reads a ValueError as bad input (exit 2)
    assert (cache / good.cache_name()).is_file() and not (cache / bad.cache_name()).exists()
    out = run_jobs([good], X, y, np.zeros((0, X.shape[1]), np.float32), tcfg, cache, Config(), logs.append)
    assert out["f0/m0"].shape == (32,) and "1 member trainings: 1 cached, 0 to run" in logs


def test_from_json_renders_the_issues_minimal_shape_and_names_a_bad_file(tmp_path):
    """The issue's JSON shape has no *_std of precision/recall/PR-AUC and no run metadata: it is
    rendered as it is; a file that is not a result is refused naming it and what is wrong."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cv = {"protocol": "grouped-cv", "results": [{"method": "flexmatch-ensemble", "macro_f1": 0.61, "macro_f1_std": 0.02,
                                                 "f1_superionic": 0.4, "f1_superionic_std": 0.05, "precision": 0.5,
                                                 "recall": 0.33, "pr_auc": 0.36}]}
    paper = {"protocol": "paper", "results": [{"method": "flexmatch-ensemble", "macro_f1_all112": 0.7,
                                               "macro_f1_unseen": 0.55}]}
    for name, result, want in (("cv", cv, "0.610 ± 0.020"), ("paper", paper, "0.550")):
        f, md = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
        f.write_text(json.dumps(result))
        res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f), "--markdown", str(md)])
        assert res.exit_code == 0, res.output
        assert want in md.read_text() and "flexmatch-ensemble" in md.read_text()
    assert "| flexmatch-ensemble | 0.610 ± 0.020 | 0.400 ± 0.050 | 0.500 | 0.330 | 0.360 |" in (tmp_path / "cv.md").read_text()
    # an 80-column terminal: every number whole (the paper table's eight columns once showed "0.…")
    paper["results"][0].update(members=10, votes_needed=5, macro_f1_std=0.041, f1_superionic=0.444,
                               f1_superionic_std=0.123, member_macro_f1_unseen=0.777,
                               member_macro_f1_unseen_std=0.055, pr_auc=0.321, n_unseen=19, n_superionic_unseen=4)
    for result, numbers in ((cv, ["0.610", "± 0.020", "0.400", "± 0.050", "0.330", "0.360"]),
                            (paper, ["0.700", "0.550", "± 0.041", "0.444", "± 0.123", "0.777", "± 0.055", "0.321",
                                     "19 (4)", "0.918"])):
        f = tmp_path / "narrow.json"
        f.write_text(json.dumps(result))
        res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f)], env={"COLUMNS": "80"})
        assert res.exit_code == 0 and "…" not in res.stdout, res.stdout
        assert all(n in res.stdout for n in numbers), res.stdout
        assert max(len(line) for line in res.stdout.splitlines()) <= 80, res.stdout
    for bad, why in (([1, 2], "not an object"), ({"protocol": "cv", "results": []}, "'protocol' is 'cv'"),
                     ({"protocol": "paper", "results": [{"macro_f1": 1}]}, "results[0] has no 'method'")):
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(bad))
        res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f)])
        assert res.exit_code == 2 and str(f) in res.output and why in res.output, res.output


def test_from_json_prints_method_names_and_paths_as_they_are_not_as_rich_markup(tmp_path):
    """A method name or path holding '[/]' crashed the output (MarkupError), '[red]x' lost its tag."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    folder = tmp_path / "[red]res[" / "]x"  # the path reads .../[red]res[/]x/
    folder.mkdir(parents=True)
    f = folder / "cv.json"
    f.write_text(json.dumps({"protocol": "grouped-cv", "results": [{"method": "[bold]m[/]", "macro_f1": 0.6}]}))
    res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "[bold]m[/]" in res.output, res.output
    res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f), "--markdown", str(f / "t.md")])
    assert res.exit_code == 2 and f"--markdown {f / 't.md'}: cannot be written there" in res.output, res.output
    f.write_text("[]")
    res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f)])
    assert res.exit_code == 2 and f"--from-json {f}: not an evaluation result" in res.output, res.output


def test_from_json_refuses_an_unwritable_markdown_naming_it(tmp_path):
    """--from-json with --markdown to a folder, or under a file: one line naming it, exit 2."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    f = tmp_path / "cv.json"
    f.write_text(json.dumps({"protocol": "grouped-cv", "results": [{"method": "m", "macro_f1": 0.6}]}))
    folder = tmp_path / "tables"
    folder.mkdir()
    for md, why in ((folder, "is a directory"), (f / "table.md", f"{f} is a file")):
        res = CliRunner().invoke(app, ["evaluate", "--from-json", str(f), "--markdown", str(md)])
        assert res.exit_code == 2, res.output
        assert f"--markdown {md}: cannot be written there" in res.output and why in res.output, res.output
        assert "Traceback" not in res.output
    assert list(folder.iterdir()) == []


def test_the_promotion_metric_scores_every_version_on_the_same_compounds_and_folds(tmp_path, labelled):
    """Versions are compared on the labels file's compounds with the same folds, whatever labels
    they were trained on; a validated label joins a fold's training part only when its
    composition (integer formula: 'LiLaTi2O6' is the paper's 'La0.5Li0.5TiO3') is not tested there."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.champion import plan_champion
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(overrides={"run_dir": str(tmp_path), "campaign": {"eval_folds": 3},
                                 "labels": {"source_weights": {"paper": 1.0, "mlip-md": 0.5}}})
    tcfg = cfg.training.model_copy(update={"ensemble_size": 1})
    U = np.zeros((0, 4501), np.float32)
    ls0, w0 = build_training_set(cfg, PatternTable(ids=[], formulas=[], X=np.zeros((0, 4501), np.float32)))
    before = plan_champion(cfg, ls0, w0, U, tcfg)
    new = {"mp-1222315": "LiLaTi2O6", "mp-x": "Li3N", "mp-y": "Li2ZnCl4"}
    for sid, f in new.items():
        add_label(store_url(cfg), LabelRecord(sid, f, "mlip-md", 1, "proto"))
    pt = PatternTable(ids=list(new), formulas=list(new.values()), X=np.eye(3, 4501, dtype=np.float32))
    ls1, w1 = build_training_set(cfg, pt)
    assert len(ls1) == 115 and ls1.groups[-3] == "Li0.5La0.5Ti1O3"  # the paper compound's group
    after = plan_champion(cfg, ls1, w1, U, tcfg)
    assert before.n_train == 112 and after.n_train == 115
    for (tr0, te0), (tr1, te1) in zip(before.splits, after.splits):  # the same folds of the same 112
        assert np.array_equal(tr0, tr1) and np.array_equal(te0, te1)
    for jb, ja in zip(before.jobs, after.jobs):
        assert np.array_equal(jb.predict - 112, ja.predict - 115)  # the same test compounds
        tested = {labelled.groups[i] for i in ja.predict - 115}
        trained = {ls1.groups[i] for i in ja.train}
        assert not tested & trained  # no composition on both sides
        extra = {ls1.ids[i] for i in ja.train if i >= 112}
        assert extra == {sid for sid, g in zip(list(new), ls1.groups[-3:]) if g not in tested}
        assert np.array_equal(np.asarray(ja.train)[np.asarray(ja.train) < 112], jb.train)
    # the test part always holds the file's labels, not the version's
    assert np.array_equal(after.y[115:], labelled.y) and np.array_equal(after.X[115:], labelled.X)


def test_a_version_with_no_label_outside_a_test_fold_has_no_promotion_metric(tmp_path, labelled):
    """With the labels file weighted 0, a version trained on one validated label has nothing to
    learn from in the fold that tests that label's composition: the metric is refused before any
    training, naming the fold; with a label of a composition the file does not hold, every fold
    has one to train on."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.champion import UnscorableVersion, champion_metrics, plan_champion
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(overrides={"run_dir": str(tmp_path), "campaign": {"eval_folds": 3},
                                 "labels": {"source_weights": {"paper": 0.0, "mlip-md": 1.0}}})
    tcfg = cfg.training.model_copy(update={"ensemble_size": 1})
    U = np.zeros((0, 4501), np.float32)
    assert "Li3N" in labelled.groups
    add_label(store_url(cfg), LabelRecord("mp-x", "Li3N", "mlip-md", 1, "proto"))  # a composition of the file
    pt = PatternTable(ids=["mp-x", "mp-y"], formulas=["Li3N", "LiBe2"], X=np.eye(2, 4501, dtype=np.float32))
    ls, w = build_training_set(cfg, pt)
    assert ls.ids == ["mp-x"]
    with pytest.raises(UnscorableVersion, match=r"fold \d of 3 of the labels file leaves this version no label "
                                                r"of weight > 0 to train on \(0 of its 1 labels"):
        champion_metrics(cfg, ls, w, U, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before any member trained
    add_label(store_url(cfg), LabelRecord("mp-y", "LiBe2", "mlip-md", 0, "proto"))  # tested in no fold
    ls, w = build_training_set(cfg, pt)
    plan = plan_champion(cfg, ls, w, U, tcfg)
    trained = sorted(sorted(ls.ids[i] for i in j.train) for j in plan.jobs)
    assert trained == [["mp-x", "mp-y"], ["mp-x", "mp-y"], ["mp-y"]]  # Li3N's fold trains on LiBe2 alone
    # a campaign round says why it has no metric (not "campaign.eval_folds = 0")
    from xrdmatch.platform.campaign import summary_line

    line = summary_line(1, "train", {"n_labelled": 1, "by_source": {"mlip-md": 1}, "metrics": {},
                                     "metrics_note": "no promotion metric: fold 2 of 3 ..."}, 1.0)
    assert "no promotion metric: fold 2 of 3" in line and "eval_folds" not in line, line


def test_a_store_label_on_a_labels_file_compound_replaces_its_label(tmp_path, labelled):
    """The labels file is older than any stored label: a newer weighted label of one of its
    compounds counts instead (with the compound's own pattern and group), also when the file's
    own source has weight 0."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.training.dataset import build_training_set

    sid = labelled.ids[0]
    i0 = 0
    flipped = 1 - int(labelled.y[i0])
    for paper_w in (1.0, 0.0):
        cfg = load_config(overrides={"run_dir": str(tmp_path / str(paper_w)), "labels": {
            "source_weights": {"paper": paper_w, "experiment": 2.0}}})
        add_label(store_url(cfg), LabelRecord(sid, labelled.formulas[i0], "experiment", flipped, "import:experiment"))
        ls, w = build_training_set(cfg)
        assert len(ls) == (112 if paper_w else 1)
        j = ls.ids.index(sid)
        assert (int(ls.y[j]), ls.sources[j], float(w[j])) == (flipped, "experiment", 2.0)
        assert ls.groups[j] == labelled.groups[i0] and np.array_equal(ls.X[j], labelled.X[i0])


def test_the_evaluation_key_follows_the_data_contents_and_the_run_directory(tmp_path, labelled_csv):
    """A corrected label (same file name) or another run directory on a shared tracking server is
    another evaluation: its numbers are logged, not skipped as "already evaluated"."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.cli_evaluate import evaluation_key

    lab = tmp_path / "labels.csv"
    lab.write_text(labelled_csv.read_text())
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "labels": {"path": str(lab)}})
    key = evaluation_key(cfg, "grouped-cv")
    assert evaluation_key(cfg, "grouped-cv") == key and evaluation_key(cfg, "paper") != key
    assert evaluation_key(cfg.model_copy(update={"run_dir": str(tmp_path / "other")}), "grouped-cv") != key
    head, first, *rest = lab.read_text().splitlines(keepends=True)
    cells = first.rstrip("\n").split(",")
    col = head.rstrip("\n").split(",").index("label")
    cells[col] = "1" if cells[col] == "0" else "0"  # one label corrected, in place
    lab.write_text(head + ",".join(cells) + "\n" + "".join(rest))
    assert evaluation_key(cfg, "grouped-cv") != key
