"""The campaign state machine: store records, run-dir lock, the training key that decides when a
round retrains, and an end-to-end campaign that is killed with SIGKILL at two stages, resumed,
and reuses its model in a round without a new label; real Ray, MLflow, CHGNet MD, SQLite store."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xrdmatch.platform.campaign_store import DONE, FAILED, RUNNING, CampaignStore, campaign_id_for
from xrdmatch.platform.lock import RunDirLock, RunDirLocked, lock_holder

REPO = Path(__file__).resolve().parent.parent


def _holding(code: str) -> subprocess.Popen:
    """A process that runs ``code`` (which takes a lock, then prints 'held' and sleeps), once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / "campaign.lock"
    holder = _holding("import sys,time; from xrdmatch.platform.lock import RunDirLock; "
                      f"l = RunDirLock({str(lock)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    try:
        with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid} on "):
            RunDirLock(lock).acquire()
        assert lock_holder(lock)["pid"] == holder.pid  # what `campaign status` shows
        os.killpg(holder.pid, signal.SIGKILL)  # a crash never leaves a stale lock
        holder.wait(10)
        assert lock_holder(lock) is None
        with RunDirLock(lock):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)


def test_an_md_folder_has_one_writer_and_a_killed_one_frees_it(tmp_path):
    """exclusive_dir (each MD job's folder): a second worker waits, renewing its lease, and gives
    up after the timeout; once the holder dies (kill -9) the folder is taken at once."""
    from xrdmatch.platform.lock import DirectoryBusy, exclusive_dir

    md = tmp_path / "md" / "mp-1-abc"
    holder = _holding("import time; from xrdmatch.platform.lock import exclusive_dir\n"
                      f"with exclusive_dir({str(md)!r}, 5):\n    print('held', flush=True); time.sleep(60)")
    try:
        beats = []
        with pytest.raises(DirectoryBusy, match="still in use by another process"):
            with exclusive_dir(md, timeout_s=1.0, poll_s=0.1, while_waiting=lambda: beats.append(1)):
                pass
        assert len(beats) >= 5  # the waiting worker kept its lease alive
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        entered = []
        with exclusive_dir(md, timeout_s=1.0):
            entered.append(True)
        assert entered == [True]
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)


def test_store_records_stages_once_and_keeps_campaigns_apart(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # one database, two campaigns (e.g. one PostgreSQL)
    a = CampaignStore(url, campaign_id_for(tmp_path / "a"))
    b = CampaignStore(url, campaign_id_for(tmp_path / "b"))
    assert a.cid != b.cid and campaign_id_for(tmp_path / "a") == a.cid  # stable per run dir
    for s in (a, b):
        s.ensure_campaign(str(tmp_path), {})
        s.ensure_round(1)
    assert a.start_stage(1, "train") == 1
    assert a.start_stage(1, "train") == 2  # re-entered after a crash: attempt 2
    cand = {"rank": 0, "structure_id": "mp-1", "formula": "Li2O", "p_mean": 0.9, "p_std": 0.1, "score": 0.9}
    a.start_stage(1, "select")
    a.finish_stage(1, "select", {"picks": ["mp-1"]}, 1.5, candidates=[cand])
    assert a.stage(1, "select").status == DONE and a.stage(1, "select").result == {"picks": ["mp-1"]}
    with pytest.raises(RuntimeError, match="already done"):
        a.start_stage(1, "select")
    assert [c.structure_id for c in a.candidates()] == ["mp-1"]
    assert b.candidates() == [] and b.stages() == []
    assert a.stage(1, "train").status == RUNNING


def test_training_key_changes_with_labels_data_and_settings_only():
    from xrdmatch.config import Config
    from xrdmatch.platform.campaign import training_key

    cfg = Config()
    lin = {"lineage.labelled_hash": "a" * 16, "lineage.unlabelled_hash": "b" * 16, "campaign.round": "1"}
    key = training_key(cfg, lin)
    assert training_key(cfg, lin | {"campaign.round": "2"}) == key  # the round itself is not a reason
    assert training_key(cfg.model_copy(update={"campaign": cfg.campaign.model_copy(update={"rounds": 9})}), lin) == key
    changed = [
        training_key(cfg, lin | {"lineage.labelled_hash": "c" * 16}),  # a new label
        training_key(cfg, lin | {"lineage.unlabelled_hash": "d" * 16}),  # another database
        training_key(cfg.model_copy(update={"training": cfg.training.model_copy(update={"iterations": 7})}), lin),
        training_key(cfg.model_copy(update={"labels": cfg.labels.model_copy(
            update={"source_weights": {**cfg.labels.source_weights, "mlip-md": 0.0}})}), lin),
        training_key(cfg.model_copy(update={"seed": 1}), lin),
        # the decision rule: served by the registered model, and the champion metric's calls
        training_key(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"decision_threshold": 0.3})}), lin),
        training_key(cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"vote_fraction": 1.0})}), lin),
    ]
    assert len({key, *changed}) == 1 + len(changed)


def test_training_key_and_member_cache_change_with_the_training_code(monkeypatch, tmp_path):
    import numpy as np

    from xrdmatch.config import Config, TrainingConfig
    from xrdmatch.platform.campaign import training_key
    from xrdmatch.training import evaluation, fingerprint, trainer

    cfg = Config()
    lin = {"lineage.labelled_hash": "a" * 16, "lineage.unlabelled_hash": "b" * 16}
    job = evaluation.MemberJob("r0/f0/full/flexmatch/m0", "flexmatch", 3, np.arange(5), np.arange(5, 8))
    before = training_key(cfg, lin), evaluation.member_digest(job, TrainingConfig(), "d" * 16, "u" * 16)
    assert fingerprint.code_fingerprint.__wrapped__() == fingerprint.code_fingerprint()  # stable
    source = open(trainer.__file__).read()
    edited = tmp_path / "trainer.py"
    # a comment, a docstring and the layout are not the code: nothing is trained again
    edited.write_text(source.replace('"""', '"""Edited. ', 1).replace("\n", "\n\n", 3) + "\n# edited\n")
    monkeypatch.setattr(trainer, "__file__", str(edited))
    assert fingerprint.code_fingerprint.__wrapped__() == fingerprint.code_fingerprint()
    edited.write_text(source + "\n_EDITED = 1\n")  # one more line of code
    new = fingerprint.code_fingerprint.__wrapped__()
    assert new != fingerprint.code_fingerprint()
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: new)
    monkeypatch.setattr(evaluation, "code_fingerprint", lambda: new)
    after = training_key(cfg, lin), evaluation.member_digest(job, TrainingConfig(), "d" * 16, "u" * 16)
    assert after[0] != before[0] and after[1] != before[1]


def test_the_code_fingerprint_covers_how_members_are_scored(monkeypatch):
    """Cached member predictions come from Ensemble.predict_proba: another scoring function is
    another fingerprint (a cache written by the old one is not reused)."""
    from xrdmatch.training import fingerprint
    from xrdmatch.training.ensemble import Ensemble

    base = fingerprint.code_fingerprint.__wrapped__()

    def predict_proba(self, X, batch_size=1024, device="cpu", **kw):
        return {"p_mean": X.max(axis=1)}

    monkeypatch.setattr(Ensemble, "predict_proba", predict_proba)
    changed = fingerprint.code_fingerprint.__wrapped__()
    assert changed != base

    def _models(self, device):  # how the networks are built for scoring (e.g. eval mode) counts too
        return []

    monkeypatch.setattr(Ensemble, "_models", _models)
    assert fingerprint.code_fingerprint.__wrapped__() not in (base, changed)


# ------------------------------------------------------------------------------ end to end
def tiny_config(tmp_path: Path, rounds: int = 1, validation: dict | None = None, training: dict | None = None) -> Path:
    cfg = {
        "seed": 0,
        "database": {"path": str(REPO / "data/mp_li_structures.jsonl.xz"), "limit": 240},
        "labels": {"path": str(REPO / "data/xrdmatch_lbs.csv")},
        "ray": {"num_cpus": 2},
        "xrd": {"batch_size": 120},
        "training": {"network": "fast", "algorithm": "fixmatch", "iterations": 4, "ensemble_size": 1,
                     "batch_labelled": 16, "batch_unlabelled": 16, "unlabelled_limit": 128, "checkpoint_every": 2},
        "validation": {"calculator": "chgnet", "temperatures": [1100.0, 1300.0], "equilibration_steps": 2,
                       "production_steps": 20, "traj_interval": 2, "min_atoms": 8, "min_length": 0.0,
                       "msd_fit_start_fs": 0.0,  # 40 fs of MD: machinery, not physics
                       "lease_s": 4.0, "heartbeat_s": 0.5, "poll_s": 0.5, "workers": 1, "max_attempts": 5},
        "campaign": {"rounds": rounds, "candidates_per_round": 1, "max_sites_md": 10, "eval_folds": 0,
                     "screen_batch_size": 120, "poll_s": 0.5},
    }
    cfg["validation"] |= validation or {}
    cfg["training"] |= training or {}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _start(cfg: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    fh = open(log, "a")
    return subprocess.Popen([sys.executable, "-m", "xrdmatch.cli", "campaign", "run", "--config", str(cfg),
                             "--dir", str(run_dir), "--no-progress"], stdout=fh, stderr=subprocess.STDOUT,
                            env=_env(), cwd=str(run_dir.parent), start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the campaign and everything it started (its own session: Ray, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def _wait_for(pred, proc, log: Path, what: str, timeout: float = 150.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"campaign exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    _kill(proc)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _store(run_dir: Path) -> CampaignStore | None:
    cid = campaign_id_for(run_dir, create=False)
    if cid is None or not (run_dir / "store.db").exists():
        return None
    return CampaignStore(f"sqlite:///{run_dir / 'store.db'}", cid)


def _snapshot(store: CampaignStore) -> dict:
    return {(s.round, s.stage): (s.result, s.finished_at, s.attempts) for s in store.stages() if s.status == DONE}


def _stage_running(run_dir: Path, rnd: int, stage: str):
    st = _store(run_dir)
    rec = st.stage(rnd, stage) if st else None
    return st if rec is not None and rec.status == RUNNING else None


@pytest.mark.slow
def test_campaign_resumes_after_kill9_exactly_once_and_learns_from_its_verdict(tmp_path):
    """Killed (kill -9) while training and stopped (SIGTERM) while validating, resumed each time,
    every finished stage kept; the loop closes: round 1's MD verdict is a label in the store,
    round 2 trains a new ensemble on 113 labels, registers it as version 2 and screens with it.
    (A round without a new label: test_a_round_without_a_new_label_...)"""
    import hashlib

    import mlflow
    from mlflow import MlflowClient

    from xrdmatch.platform import queue
    from xrdmatch.platform.labels import list_labels

    # enough steps after the first checkpoint that the kill lands mid-training
    cfg = tiny_config(tmp_path, rounds=2, training={"iterations": 30, "checkpoint_every": 5},
                      # criteria opened and temperatures far apart, so that 20 MD steps decide
                      # (over 40 fs the MSD grows with T: Ea > 0, not 'non-Arrhenius')
                      validation={"min_li_msd": 0.0, "min_r2": 0.0, "verdict_z": 0.0, "max_framework_msd": 1000.0,
                                  "temperatures": [600.0, 2000.0]})
    run_dir = tmp_path / "run"
    log = tmp_path / "campaign.log"

    # 1) a second campaign on the dir is refused while the first runs; kill -9 the first while
    # round 1 trains, after its first checkpoint
    proc = _start(cfg, run_dir, log)
    _wait_for(lambda: _store(run_dir), proc, log, "the campaign started")  # it holds the run-dir lock
    second = subprocess.run([sys.executable, "-m", "xrdmatch.cli", "campaign", "run", "--config", str(cfg),
                             "--dir", str(run_dir)], capture_output=True, text=True, env=_env(), timeout=120)
    assert second.returncode == 3, second.stderr
    assert f"in use by pid {proc.pid}" in second.stderr

    from tests.conftest import registered_checkpoints

    def checkpointed():  # one that Ray Train has recorded (a folder on disk may not be yet)
        st = _stage_running(run_dir, 1, "train")
        return st if st and registered_checkpoints(run_dir / "train" / "round-001", "ray_results/*") else None

    store = _wait_for(checkpointed, proc, log, "round 1 train checkpointed")
    before_a = _snapshot(store)
    assert (1, "patterns") in before_a
    _kill(proc)
    parent_run = store.campaign().mlflow_run_id
    assert parent_run

    # 2) resume; stop it with SIGTERM (docker stop, kubectl delete) while round 1 validates (MD
    # job claimed by a worker): the stage is recorded as stopped and the job handed back, not
    # left leased (kill -9 of a worker mid-MD: tests/test_validation_e2e.py)
    proc = _start(cfg, run_dir, log)

    def md_running():
        st = _stage_running(run_dir, 1, "validate")
        return st if st and any(j.state == "running" for j in queue.list_jobs(st.url)) else None

    store = _wait_for(md_running, proc, log, "round 1 MD job running")
    before_b = _snapshot(store)
    proc.send_signal(signal.SIGTERM)  # to the CLI alone, as a container runtime sends it
    assert proc.wait(120) != 0
    _kill(proc)  # anything left in its session
    stopped = store.stage(1, "validate")
    assert stopped.status == FAILED and stopped.error.startswith("SystemExit"), stopped.error
    (job,) = queue.list_jobs(store.url)
    assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None), log.read_text()[-3000:]
    for key, rec in before_a.items():
        assert before_b[key] == rec, f"finished stage {key} was redone"
    assert {(1, s) for s in ("patterns", "train", "register", "screen", "select")} <= set(before_b)

    # 3) resume to the end: round 1 finishes with a label, round 2 trains on it
    proc = _start(cfg, run_dir, log)
    rc = proc.wait(300)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    assert "resuming" in out and "stage timings" in out
    store = _store(run_dir)
    final = _snapshot(store)
    for key, rec_ in before_b.items():
        assert final[key] == rec_, f"finished stage {key} was redone"
    attempts = {(s.round, s.stage): s.attempts for s in store.stages()}
    assert attempts[(1, "train")] == 2 and attempts[(1, "validate")] == 2
    assert all(v == 1 for k, v in attempts.items() if k not in {(1, "train"), (1, "validate")}), attempts
    assert {r for r, _ in final} == {1, 2} and len(final) == 14

    # exactly once: one job per candidate, at most one label per structure
    cands = store.candidates()
    assert [c.round for c in cands] == [1, 2] and len({c.structure_id for c in cands}) == 2
    jobs = queue.list_jobs(store.url)
    assert sorted(j.structure_id for j in jobs) == sorted(c.structure_id for c in cands)
    assert all(j.state in queue.FINISHED for j in jobs)
    labels = list_labels(store.url)
    assert len({lab.structure_id for lab in labels}) == len(labels) == sum(j.state == "done" for j in jobs)
    for c in cands:
        assert c.verdict is not None
    assert sum(store.stage(r, "label").result["new_labels"] for r in (1, 2)) == len(labels)

    # the verdict is a label, and round 2 trained, registered and screened with it
    labels_by_id = {lab.structure_id: lab for lab in labels}
    c1 = cands[0]
    assert c1.verdict in ("superionic", "not_superionic"), c1.verdict
    assert labels_by_id[c1.structure_id].method == "mlip-md"
    assert labels_by_id[c1.structure_id].label == int(c1.verdict == "superionic")
    assert store.stage(1, "label").result["new_labels"] == 1
    tr = {r: store.stage(r, "train").result for r in (1, 2)}
    assert "reused_from" not in tr[2] and tr[2]["train_key"] != tr[1]["train_key"]
    assert tr[1]["n_labelled"] == 112 and tr[2]["n_labelled"] == 113
    assert tr[2]["by_source"] == {"paper": 112, "mlip-md": 1}
    assert tr[2]["labelled_hash"] != tr[1]["labelled_hash"] and tr[2]["model_dir"] != tr[1]["model_dir"]
    assert {r: store.stage(r, "register").result["version"] for r in (1, 2)} == {1: "1", 2: "2"}
    scores = {s.round: s for s in store.all_scores()}
    assert scores[2].model_version == "2" and scores[2].sha256 != scores[1].sha256
    for s in scores.values():  # scores pointer + Parquet per round
        assert hashlib.sha256(Path(s.path).read_bytes()).hexdigest() == s.sha256 and s.n == 240
    # round 2 does not pick round 1's composition again
    assert cands[1].structure_id != c1.structure_id and cands[1].formula != c1.formula

    # MLflow: the same parent run, one child per round, one registered version per round
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    assert store.campaign().mlflow_run_id == parent_run
    client = MlflowClient()
    exp = client.get_experiment_by_name("xrdmatch")
    children = {r.data.tags["xrdmatch.round"]: r for r in
                client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run}'")}
    assert sorted(children) == ["1", "2"] and "xrdmatch.model_from_round" not in children["2"].data.tags
    versions = {str(v.version): v for v in client.search_model_versions("name='xrdmatch-superionic'")}
    assert sorted(versions) == ["1", "2"]  # register was not redone, nor repeated
    assert versions["1"].run_id == children["1"].info.run_id and versions["2"].run_id == children["2"].info.run_id
    # the screen's count is the registered model's calls over the same patterns
    import numpy as np
    import pandas as pd

    from xrdmatch.config import load_config
    from xrdmatch.platform.patterns import load_patterns, patterns_dir_for
    from xrdmatch.platform.pyfunc_model import patterns_frame

    pt = load_patterns(patterns_dir_for(load_config(cfg, {"run_dir": str(run_dir)})))
    served = mlflow.pyfunc.load_model("models:/xrdmatch-superionic/1").predict(patterns_frame(pt.X))
    screened = store.stage(1, "screen").result
    assert screened["n_positive"] == int(served["superionic"].sum())
    votes = pd.read_parquet(scores[1].path).set_index("id").loc[list(pt.ids), "votes"].to_numpy()
    np.testing.assert_array_equal(votes >= screened["votes_needed"], served["superionic"].to_numpy(bool))
    # the scores are the round's ensemble on those patterns, in their order
    from xrdmatch.training.ensemble import Ensemble

    ens = Ensemble.load(tr[1]["model_dir"])
    got = pd.read_parquet(scores[1].path)
    assert list(got["id"]) == list(pt.ids)
    np.testing.assert_allclose(got["p_mean"], ens.predict_proba(pt.X)["p_mean"], rtol=1e-5, atol=1e-6)
    # the killed training was resumed from its checkpoint, not restarted
    hist = ens.members[0].history
    assert [h["step"] for h in hist] == list(range(1, 31)) and hist[-1]["attempt_start"] >= 5

    # status and report read it all back
    from xrdmatch.platform.report import campaign_status, write_report

    rcfg = load_config(cfg, {"run_dir": str(run_dir)})
    status = "\n".join(campaign_status(rcfg))
    champ = client.get_model_version_by_alias("xrdmatch-superionic", "champion").version
    assert "round 1: patterns: done" in status and f"champion: xrdmatch-superionic v{champ}" in status
    assert "queue: queued 0, running 0" in status
    html_text = write_report(rcfg).read_text()
    for c in cands:
        assert c.structure_id in html_text and c.formula in html_text

    # another run dir sees none of this campaign's jobs or labels
    other = tmp_path / "other"
    other.mkdir()
    assert queue.counts_by_state(f"sqlite:///{other / 'store.db'}")["done"] == 0
    assert list_labels(f"sqlite:///{other / 'store.db'}") == []

def test_a_round_without_a_new_label_reuses_the_last_model_and_its_version(tmp_path):
    """Round 2's labels, data, settings and code are round 1's (its MD gave no label): its train
    stage reuses round 1's ensemble instead of training it again, its register stage that
    ensemble's version instead of registering a copy, and its screen gives the same scores."""
    import mlflow
    import ray
    from mlflow import MlflowClient

    from xrdmatch.config import load_config
    from xrdmatch.platform.campaign import (
        Context,
        stage_patterns,
        stage_register,
        stage_screen,
        stage_train,
        summary_line,
    )
    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.ray_utils import init_ray
    from xrdmatch.platform.tracking import configure

    db = tmp_path / "db.jsonl"  # 23 entries and a broken line: the patterns stage says where it went
    lines = [line.strip() for _, line in itertools.islice(iter_jsonl_lines(REPO / "data/mp_li_structures.jsonl.xz"), 23)]
    db.write_text("\n".join(lines[:10] + ['{"id": "mp-cut", "lattice": [[1, 0'] + lines[10:]) + "\n")
    cfg = load_config(tiny_config(tmp_path, training={"iterations": 2}),
                      {"run_dir": str(tmp_path / "run"), "database": {"path": str(db), "limit": None},
                       "xrd": {"batch_size": 12}})
    paths = RunPaths.of(cfg.run_dir)
    cfg.tracking.tracking_uri = paths.mlflow_tracking_uri
    store = CampaignStore(paths.store_url, "c1")
    store.ensure_campaign(str(paths.root), {})
    ctx = Context(cfg, paths, store, paths.store_url, echo=lambda s: None, progress=False)
    configure(cfg)
    init_ray(None, 2)
    res = {}
    try:
        for rnd in (1, 2):  # the campaign's loop, for these three stages
            store.ensure_round(rnd)
            with mlflow.start_run(run_name=f"round-{rnd}") as run:
                ctx.round_run_ids[rnd] = run.info.run_id
                for name, stage in (("patterns", stage_patterns), ("train", stage_train), ("register", stage_register),
                                    ("screen", stage_screen)):
                    store.start_stage(rnd, name)
                    res[rnd, name], extra = stage(ctx, rnd)
                    store.finish_stage(rnd, name, res[rnd, name], 0.0, **extra)
    finally:
        ray.shutdown()
    pat = res[1, "patterns"]
    assert (pat["n_patterns"], pat["n_failed"]) == (23, 1) and pat["errors_file"].endswith("errors.parquet")
    assert summary_line(1, "patterns", pat, 1.0).endswith(f"; 1 entries failed, see {pat['errors_file']}")
    tr1, tr2 = res[1, "train"], res[2, "train"]
    assert "reused_from" not in tr1 and tr2["reused_from"] == 1
    assert tr2["train_key"] == tr1["train_key"] and tr2["model_dir"] == tr1["model_dir"]
    assert [p.name for p in (paths.root / "train").iterdir()] == ["round-001"]  # nothing trained for round 2
    assert res[1, "register"]["version"] == res[2, "register"]["version"] == "1"
    assert res[2, "register"]["reused_from"] == 1 and res[2, "register"]["promoted"] is False
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{cfg.tracking.registry_name}'")] == ["1"]
    assert client.get_run(ctx.round_run_ids[2]).data.tags["xrdmatch.model_from_round"] == "1"
    scores = {s.round: s for s in store.all_scores()}
    assert scores[2].sha256 == scores[1].sha256 and scores[2].path != scores[1].path and scores[2].n == 23


# ------------------------------------------------------------------------------ status of broken inputs
def _status_config(tmp_path: Path, labels: Path, tracking_uri: str | None) -> Path:
    cfg = {"run_dir": str(tmp_path / "run"), "labels": {"path": str(labels)}}
    if tracking_uri:
        cfg["tracking"] = {"tracking_uri": tracking_uri}
    p = tmp_path / "status.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _status(cfg: Path):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    return CliRunner().invoke(app, ["campaign", "status", "-c", str(cfg)])


def _new_campaign(run_dir: Path) -> str:
    cid = campaign_id_for(run_dir)
    CampaignStore(f"sqlite:///{run_dir / 'store.db'}", cid).ensure_campaign(str(run_dir), {})
    return cid


def test_status_shows_unreadable_labels_and_tracking_store_instead_of_none(tmp_path):
    _new_campaign(tmp_path / "run")
    bad_store = tmp_path / "mlflow-bad.db"
    bad_store.write_bytes(b"this is not an SQLite database\n" * 64)
    missing = tmp_path / "no-such-labels.csv"
    res = _status(_status_config(tmp_path, missing, f"sqlite:///{bad_store}"))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"labels: ERROR labelled file not found: {missing}" in lines, res.output
    champ = [ln for ln in lines if ln.startswith("champion:")]
    assert len(champ) == 1 and champ[0].startswith(f"champion: unavailable (tracking store sqlite:///{bad_store}: ")
    assert "file is not a database" in champ[0]
    assert "labels: none" not in res.output and "champion: none yet" not in res.output

    garbled = tmp_path / "garbled.csv"
    garbled.write_bytes(b"\xff\xfe\x00\x81 not text\n\x00\x9c\n")
    res = _status(_status_config(tmp_path, garbled, f"sqlite:///{bad_store}"))
    assert res.exit_code == 0, res.output
    assert any(ln.startswith(f"labels: ERROR {garbled}: ") for ln in res.output.splitlines()), res.output

    # a usable store without a champion, and readable labels, still read as such
    res = _status(_status_config(tmp_path, REPO / "data/xrdmatch_lbs.csv", f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert res.exit_code == 0, res.output
    assert "champion: none yet" in res.output.splitlines()
    assert any(ln.startswith("labels: paper ") for ln in res.output.splitlines()), res.output


@pytest.mark.parametrize("content, what", [
    ("", "is empty"),
    ("{\"campaign_id\": ", "not valid JSON"),
    ("{}", "has no 'campaign_id' key"),
    ("[\"abc\"]", "has no 'campaign_id' key"),
    ("{\"campaign_id\": \"\"}", "must be a non-empty string"),
])
def test_unusable_campaign_json_is_a_one_line_error_naming_the_file(tmp_path, content, what):
    from xrdmatch.platform.campaign import CampaignError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    f = run_dir / "campaign.json"
    f.write_text(content)
    for create in (False, True):
        with pytest.raises(CampaignError, match=what) as ei:
            campaign_id_for(run_dir, create=create)
        assert str(f) in str(ei.value)
    assert f.read_text() == content  # never replaced: the id ties the run dir to its rows in the store
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cfg = _status_config(tmp_path, REPO / "data/xrdmatch_lbs.csv", None)
    for cmd in (["status"], ["report", "-o", str(tmp_path / "r.html")], ["run", "--no-progress"]):
        res = CliRunner().invoke(app, ["campaign", *cmd, "-c", str(cfg)])
        assert res.exit_code == 1, (cmd, res.output)
        err = res.output.strip()
        assert err.startswith(f"error: {f}: ") and what in err and len(err.splitlines()) == 1, (cmd, err)
    assert f.read_text() == content and not (tmp_path / "r.html").exists()


def test_a_candidate_md_could_only_fail_is_recorded_and_the_stage_goes_on(tmp_path, database_path):
    """A picked structure that the queue refuses (atoms closer than validation.min_distance) is
    a failed candidate with the reason, not a validate stage that fails on every resume; the
    database is read past a bad line to find the candidates."""
    import json
    from itertools import islice

    from xrdmatch.config import load_config
    from xrdmatch.platform import queue
    from xrdmatch.platform.campaign import Context, stage_validate
    from xrdmatch.platform.campaign_store import CampaignStore
    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.paths import RunPaths

    rec = json.loads(next(islice(iter_jsonl_lines(database_path), 1))[1])
    squeezed = {**rec, "id": "squeezed", "frac_coords": [rec["frac_coords"][0]] * 2 + rec["frac_coords"][2:]}
    db = tmp_path / "db.jsonl"
    db.write_text("{not json\n" + json.dumps(squeezed) + "\n")
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "database": {"path": str(db)}})
    paths = RunPaths.of(cfg.run_dir)
    url = paths.store_url
    store = CampaignStore(url, "c1")
    store.ensure_campaign(str(paths.root), cfg.model_dump(mode="json"))
    store.ensure_round(1)
    store.start_stage(1, "select")
    store.finish_stage(1, "select", {}, 0.0, candidates=[{
        "rank": 0, "structure_id": "squeezed", "formula": rec["formula"], "p_mean": 0.9, "p_std": 0.0, "score": 0.9}])
    result, _ = stage_validate(Context(cfg, paths, store, url, echo=lambda s: None, progress=False), 1)
    assert result["states"] == {"squeezed": "refused"} and result["jobs"] == {}
    assert "too close" in result["refused"]["squeezed"]
    (cand,) = store.candidates(1)
    assert cand.verdict == "failed" and "too close" in json.loads(cand.detail_json)["error"]
    assert queue.list_jobs(url) == []


def test_register_resumed_after_a_crash_between_version_and_aliases_settles_the_version(tmp_path, labelled):
    """log_model creates the registered version before its tags and aliases exist; a campaign
    killed in between must, on resume, tag and promote that version (the first one: champion),
    not leave a registry without a champion. Resuming again changes nothing."""
    import mlflow
    from mlflow import MlflowClient

    from xrdmatch.config import TrainingConfig, load_config
    from xrdmatch.platform.campaign import Context, stage_register
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.registry import log_version
    from xrdmatch.platform.tracking import configure
    from xrdmatch.training.ensemble import train_ensemble

    cfg = load_config(None, {"run_dir": str(tmp_path / "run")})
    paths = RunPaths.of(cfg.run_dir)
    cfg.tracking.tracking_uri = paths.mlflow_tracking_uri
    ens = tmp_path / "ens"
    train_ensemble(labelled.X, labelled.y, None, TrainingConfig(network="fast", algorithm="supervised", iterations=3,
                   ensemble_size=1, batch_labelled=16, seed=0), use_ray=False).save(ens)
    metrics, lineage = {cfg.tracking.promotion_metric: 0.6}, {"lineage.labelled_hash": "abc"}
    store = CampaignStore(paths.store_url, "c1")
    store.ensure_campaign(str(paths.root), {})
    store.ensure_round(1)
    store.start_stage(1, "train")
    store.finish_stage(1, "train", {"model_dir": str(ens), "metrics": metrics, "lineage": lineage}, 0.0)
    configure(cfg)
    with mlflow.start_run(run_name="round-1") as run:
        pass
    version, _ = log_version(cfg, ens, lineage, run_id=run.info.run_id)  # the state a kill there leaves
    client = MlflowClient()
    name = cfg.tracking.registry_name
    assert not client.get_model_version(name, version).aliases
    assert "promotion.promoted" not in (client.get_model_version(name, version).tags or {})

    ctx = Context(cfg, paths, store, paths.store_url, echo=lambda s: None, progress=False)
    ctx.round_run_ids[1] = run.info.run_id
    first, _ = stage_register(ctx, 1)
    again, _ = stage_register(ctx, 1)
    for res in (first, again):
        assert res["resumed"] and res["version"] == version and res["promoted"] is True
        assert res["aliases"] == ["challenger", "champion"]
    mv = client.get_model_version(name, version)
    assert mv.tags[f"metric.{cfg.tracking.promotion_metric}"] == "0.6" and mv.tags["lineage.labelled_hash"] == "abc"
    assert mv.tags["promotion.previous_champion"] == "none"
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == [version]
    assert client.get_run(run.info.run_id).data.tags["registry.promoted"] == "true"


def _round_one_store(tmp_path, cfg_overrides: dict, cands: list[dict]):
    """A campaign store whose round 1 picked ``cands`` (select stage done)."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.campaign import Context
    from xrdmatch.platform.paths import RunPaths

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), **cfg_overrides})
    paths = RunPaths.of(cfg.run_dir)
    store = CampaignStore(paths.store_url, "c1")
    store.ensure_campaign(str(paths.root), cfg.model_dump(mode="json"))
    store.ensure_round(1)
    store.start_stage(1, "select")
    store.finish_stage(1, "select", {"picks": [c["structure_id"] for c in cands]}, 0.0, candidates=[
        {"rank": r, "formula": "Li3N", "p_mean": 0.9, "p_std": 0.0, "score": 0.9, **c} for r, c in enumerate(cands)])
    return cfg, store, Context(cfg, paths, store, paths.store_url, echo=lambda s: None, progress=False)


def test_label_budget_counts_only_candidates_sent_to_md(tmp_path):
    """A pick the queue refused (a failed candidate without a job) cost no MD: it does not use
    up campaign.label_budget, neither in should_stop nor in how many the next round picks."""
    import numpy as np
    import pandas as pd

    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.platform.campaign import should_stop, stage_select
    from xrdmatch.platform.patterns import PatternTable

    cfg, store, ctx = _round_one_store(tmp_path, {"campaign": {"rounds": 5, "label_budget": 3}},
                                       [{"structure_id": "sent"}, {"structure_id": "refused"}])
    store.update_candidate("sent", job_id="1", verdict="superionic")
    store.update_candidate("refused", verdict="failed", detail={"state": "refused", "error": "too close"})
    assert should_stop(ctx, 2) is None
    ctx.cfg = cfg.model_copy(update={"campaign": cfg.campaign.model_copy(update={"label_budget": 2})})
    assert should_stop(ctx, 2) is None  # 1 of 2 sent to MD
    store.update_candidate("refused", job_id="2")
    assert should_stop(ctx, 2) == "label budget of 2 used"
    store.update_candidate("refused", job_id=None)
    ctx.cfg = cfg
    # round 2 picks min(candidates_per_round = 2, budget 3 - 1 sent) = 2
    ids = ["sent", "refused", "new-1", "new-2", "new-3"]
    groups = ["Li3N", "Li2S", "Li5Au", "Li7Pt", "Li9Ir"]
    ctx._patterns = PatternTable(ids=ids, formulas=groups, X=np.eye(len(ids), 4501, dtype=np.float32))
    ctx._meta = pd.DataFrame({"group": groups, "elements": ["Li N", "Li S", "Au Li", "Li Pt", "Ir Li"],
                              "n_sites": 4, "n_li": 2.0, "a": 10.0, "b": 10.0, "c": 10.0}, index=ids)
    p = np.asarray([0.99, 0.98, 0.9, 0.8, 0.7])
    write_scores(ctx.scores_path(2), ids, groups, ScreeningResult(p_mean=p, p_std=np.zeros(5), votes=np.ones(5)))
    store.ensure_round(2)
    result, extra = stage_select(ctx, 2)
    assert result["n_requested"] == 2 and result["picks"] == ["new-1", "new-2"]


def test_only_a_done_job_gives_its_candidate_a_conductivity(tmp_path, database_path):
    """An inconclusive MD result keeps its sigma on the job, not as the candidate's sigma(300 K)."""
    import json
    from itertools import islice

    from xrdmatch.platform import queue
    from xrdmatch.platform.campaign import stage_validate
    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.labels import label_from_result

    recs = [json.loads(line) for _, line in islice(iter_jsonl_lines(database_path), 2)]
    db = tmp_path / "db.jsonl"
    db.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg, store, ctx = _round_one_store(tmp_path, {"database": {"path": str(db)}},
                                       [{"structure_id": r["id"]} for r in recs])
    for r, verdict in zip(recs, ("superionic", "inconclusive")):
        jid = queue.submit(ctx.url, r["id"], r, cfg.validation)
        job = queue.claim(ctx.url, "w1", lease_s=60)
        assert job.id == jid
        res = {"structure_id": r["id"], "formula": r["formula"], "verdict": verdict, "reason": "test",
               "method": "mlip-md", "sigma_300": 1e-3}
        queue.complete(ctx.url, jid, "w1", res, label_from_result(res, protocol_hash=job.protocol_hash,
                                                                    job_id=jid, record=r))
    result, _ = stage_validate(ctx, 1)
    assert result["states"] == {recs[0]["id"]: "done", recs[1]["id"]: "inconclusive"}
    got = {c.structure_id: (c.verdict, c.sigma_300k) for c in store.candidates(1)}
    assert got == {recs[0]["id"]: ("superionic", 1e-3), recs[1]["id"]: ("inconclusive", None)}


def test_a_composition_picked_in_an_earlier_round_is_not_picked_again(tmp_path):
    """A polymorph (another id, the same reduced formula) of an earlier round's pick is skipped,
    whatever that pick's verdict; other compositions are picked best first."""
    import numpy as np
    import pandas as pd

    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.platform.campaign import stage_select
    from xrdmatch.platform.patterns import PatternTable

    cfg, store, ctx = _round_one_store(tmp_path, {"campaign": {"rounds": 3, "candidates_per_round": 2}},
                                       [{"structure_id": "first", "formula": "Li5Au"}])
    store.update_candidate("first", job_id="1", verdict="inconclusive")
    ids = ["first", "polymorph", "new-1", "new-2"]
    groups = ["Li5Au", "Li5Au", "Li7Pt", "Li9Ir"]
    ctx._patterns = PatternTable(ids=ids, formulas=groups, X=np.eye(len(ids), 4501, dtype=np.float32))
    ctx._meta = pd.DataFrame({"group": groups, "elements": ["Au Li", "Au Li", "Li Pt", "Ir Li"],
                              "n_sites": 4, "n_li": 2.0, "a": 10.0, "b": 10.0, "c": 10.0}, index=ids)
    write_scores(ctx.scores_path(2), ids, groups, ScreeningResult(p_mean=np.asarray([0.99, 0.98, 0.9, 0.8]),
                                                                  p_std=np.zeros(4), votes=np.ones(4)))
    store.ensure_round(2)
    result, _ = stage_select(ctx, 2)
    assert result["picks"] == ["new-1", "new-2"]


def test_an_id_longer_than_the_store_holds_is_not_picked(tmp_path):
    """A database folder's file name can make an id the candidate table cannot hold (PostgreSQL
    refuses it, failing the stage): it is skipped, counted, and the next best is picked."""
    import numpy as np
    import pandas as pd

    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.platform.campaign import max_candidate_id, stage_select, summary_line
    from xrdmatch.platform.patterns import PatternTable

    cfg, store, ctx = _round_one_store(tmp_path, {"campaign": {"rounds": 3, "candidates_per_round": 1}}, [])
    limit = max_candidate_id()
    assert limit == 128  # the candidate table's column (the job table's is 200)
    ids = ["x" * (limit + 1), "x" * limit]
    groups = ["Li7Pt", "Li9Ir"]
    ctx._patterns = PatternTable(ids=ids, formulas=groups, X=np.eye(len(ids), 4501, dtype=np.float32))
    ctx._meta = pd.DataFrame({"group": groups, "elements": ["Li Pt", "Ir Li"],
                              "n_sites": 4, "n_li": 2.0, "a": 10.0, "b": 10.0, "c": 10.0}, index=ids)
    write_scores(ctx.scores_path(2), ids, groups, ScreeningResult(p_mean=np.asarray([0.99, 0.9]),
                                                                  p_std=np.zeros(2), votes=np.ones(2)))
    store.ensure_round(2)
    result, _ = stage_select(ctx, 2)
    assert result["picks"] == [ids[1]] and result["n_id_too_long"] == 1
    assert "1 ids longer than the store's 128 characters skipped" in summary_line(2, "select", result, 0.1)


def test_a_structure_validated_outside_the_campaign_is_not_picked(tmp_path, database_path):
    """A job finished under this protocol by `validate submit` (or another campaign on the store)
    would be returned as it is: picking it spends a slot, and a label budget, on no new MD. It is
    skipped, and so are the polymorphs of an inconclusive one; a failed one's polymorphs are not."""
    import json
    from itertools import islice

    import numpy as np
    import pandas as pd

    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.platform import queue
    from xrdmatch.platform.campaign import stage_select
    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.patterns import PatternTable

    cfg, store, ctx = _round_one_store(tmp_path, {"campaign": {"rounds": 3, "candidates_per_round": 3}}, [])
    recs = [json.loads(line) for _, line in islice(iter_jsonl_lines(database_path), 2)]
    for rec, how in zip(recs, ("inconclusive", "failed")):
        jid = queue.submit(ctx.url, rec["id"], rec, cfg.validation)
        queue.claim(ctx.url, "w", lease_s=60)
        if how == "failed":
            queue.fail(ctx.url, jid, "w", "MD crashed")
        else:
            queue.complete(ctx.url, jid, "w", {"structure_id": rec["id"], "verdict": how, "reason": "r"}, None)
    other = cfg.validation.model_copy(update={"temperatures": [700.0, 900.0]})  # another protocol: no bar
    queue.submit(ctx.url, "elsewhere", recs[1] | {"id": "elsewhere"}, other)
    g0, g1 = (queue.get_job(ctx.url, j).formula for j in (1, 2))
    ids = [recs[0]["id"], "polymorph-0", recs[1]["id"], "polymorph-1", "new-1"]
    groups = [g0, g0, g1, g1, "Li9Ir"]
    ctx._patterns = PatternTable(ids=ids, formulas=groups, X=np.eye(len(ids), 4501, dtype=np.float32))
    ctx._meta = pd.DataFrame({"group": groups, "elements": "Li", "n_sites": 4, "n_li": 2.0, "a": 10.0, "b": 10.0, "c": 10.0},
                             index=ids)
    write_scores(ctx.scores_path(2), ids, groups, ScreeningResult(p_mean=np.linspace(0.99, 0.9, 5),
                                                                  p_std=np.zeros(5), votes=np.ones(5)))
    store.ensure_round(2)
    result, _ = stage_select(ctx, 2)
    assert result["picks"] == ["polymorph-1", "new-1"] and result["n_validated_elsewhere"] == 2


def test_the_label_stage_counts_this_rounds_verdicts_not_every_label_of_a_candidate(tmp_path):
    """An imported measurement of a candidate is not one of this round's MD verdicts, and one
    candidate is one new label."""
    from xrdmatch.platform.campaign import stage_label
    from xrdmatch.platform.labels import LabelRecord, add_label

    cfg, store, ctx = _round_one_store(tmp_path, {}, [{"structure_id": "mp-1"}, {"structure_id": "mp-2"}])
    store.update_candidate("mp-1", job_id="7")
    store.update_candidate("mp-2", job_id="8")  # its MD was inconclusive: no label
    add_label(ctx.url, LabelRecord("mp-1", "Li3N", "mlip-md", 1, "proto", job_id=7))
    add_label(ctx.url, LabelRecord("mp-1", "Li3N", "experiment", 1, "import:experiment"))
    add_label(ctx.url, LabelRecord("mp-2", "Li3N", "experiment", 0, "import:experiment"))
    import mlflow

    from xrdmatch.platform.tracking import configure

    configure(cfg)  # the stage logs its counts to the round's MLflow run
    with mlflow.start_run(run_name="round-1"):
        result, _ = stage_label(ctx, 1)
    assert (result["new_labels"], result["new_superionic"], result["validated_total"]) == (1, 1, 1)
    assert result["labels"] == {"mp-1": {"label": 1, "sigma_300": None}}


def test_only_structures_the_md_can_take_are_eligible(tmp_path):
    """md_cell_atoms: the MD supercell's atom count, or 'never' for a unit cell above
    max_sites_md, a broken lattice, a cell whose smallest fitting supercell exceeds max_atoms, or
    one whose supercell holds a single Li while verdicts need an error band (no label possible)."""
    import pandas as pd

    from xrdmatch.config import load_config
    from xrdmatch.platform.campaign import md_cell_atoms
    from xrdmatch.simulation.md import choose_supercell

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "campaign": {"max_sites_md": 10},
                             "validation": {"min_atoms": 8, "min_length": 9.0, "max_atoms": 60}})
    meta = pd.DataFrame({"n_sites": [2, 12, 2, 2, 4, 8, 2],
                         "n_li": [1.0, 4.0, 1.0, 1.0, 2.0, 1.0, 1.0],
                         "a": [4.5, 5.0, float("nan"), 2.0, 9.5, 9.5, 9.5],
                         "b": [4.5, 5.0, 4.0, 2.0, 9.5, 9.5, 9.5],
                         "c": [4.5, 5.0, 4.0, 2.0, 9.5, 9.5, 9.5]})
    got = md_cell_atoms(cfg, meta)
    m = choose_supercell((4.5, 4.5, 4.5), 2, 8, 9.0, 60)
    assert got[0] == 2 * m[0] * m[1] * m[2] == 16  # 2 x 2 x 2 copies reach 9 A (8 Li)
    assert got[4] == 8  # 9.5 A already: two copies of 4 sites reach min_atoms
    assert got[6] == 8  # 4 copies of a 1-Li cell for min_atoms: 4 Li
    never = got.max()
    assert never >= 10**9 and list(got[[1, 2, 3]]) == [never] * 3  # too many sites; NaN; 5^3 x 2 = 250 > 60
    assert cfg.validation.verdict_z > 0 and got[5] == never  # one Li in its 8-atom cell: no error, no label
    point = load_config(None, {"run_dir": str(tmp_path / "run"), "campaign": {"max_sites_md": 10},
                               "validation": {"min_atoms": 8, "min_length": 9.0, "max_atoms": 60, "verdict_z": 0}})
    assert md_cell_atoms(point, meta)[5] == 8  # decided on the point estimate, one Li can be labelled


def test_element_filters_read_elements_not_species_strings(tmp_path):
    """'Li+' is lithium and a {'Li': 0.5, 'U': 0.5} site holds uranium: the facts the filters read
    (elements, formula group) come from the elements of every site, so an oxidation-state or a
    disordered Li structure stays eligible and a disordered U one is still forbidden."""
    import json

    import numpy as np

    from xrdmatch.config import load_config
    from xrdmatch.platform.acquisition import element_matrix, eligibility_mask
    from xrdmatch.platform.campaign import structure_meta

    lat = [[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]]
    recs = [("plain", ["Li", "Li", "O"]), ("charged", ["Li+", "Li+", "O2-"]),
            ("mixed", [{"Li": 0.5, "Na": 0.5}, "Cl"]), ("uranium", [{"Li": 0.5, "U": 0.5}, "O"])]
    db = tmp_path / "db.jsonl"
    db.write_text("".join(json.dumps({"id": i, "lattice": lat, "species": sp,
                                      "frac_coords": [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]][: len(sp)]}) + "\n"
                          for i, sp in recs))
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "database": {"path": str(db)}})
    meta = structure_meta(cfg, tmp_path / "meta.parquet", [i for i, _ in recs])
    assert list(meta["elements"]) == ["Li O", "Li O", "Cl Li Na", "Li O U"]
    assert list(meta["n_li"]) == [2.0, 2.0, 0.5, 0.5]  # Li per unit cell, occupancies summed
    assert meta["group"].iat[0] == meta["group"].iat[1] == "Li2O"  # one composition, one group
    presence, vocab = element_matrix([e.split() for e in meta["elements"]])
    ok = eligibility_mask(presence, vocab, np.ones(4, int), list(meta["group"]), required=["Li"],
                          forbidden={"U"}, max_sites=10)
    assert list(ok) == [True, True, True, False]


def test_a_round_without_an_eligible_candidate_ends_the_campaign(tmp_path):
    from xrdmatch.platform.campaign import should_stop

    cfg, store, ctx = _round_one_store(tmp_path, {"campaign": {"rounds": 5}}, [])
    assert should_stop(ctx, 2) == "round 1 found no eligible candidate"
    cfg, store, ctx = _round_one_store(tmp_path / "b", {"campaign": {"rounds": 5}}, [{"structure_id": "x"}])
    assert should_stop(ctx, 2) is None


def test_status_and_report_say_why_a_stage_failed(tmp_path):
    """The reason a stage failed outlives the terminal: `campaign status` and the report show
    the stored error's first line."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.report import campaign_status, write_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, {"run_dir": str(run_dir)})
    store = CampaignStore(f"sqlite:///{run_dir / 'store.db'}", _new_campaign(run_dir))
    store.ensure_round(1)
    store.start_stage(1, "validate")
    store.fail_stage(1, "validate", "CampaignError: calculator 'gpaw' unavailable on <every> worker\nTraceback ...")
    status = campaign_status(cfg)
    assert "round 1: " in "\n".join(status) and "validate: FAILED (attempt 1)" in "\n".join(status)
    assert "  validate failed: CampaignError: calculator 'gpaw' unavailable on <every> worker" in status
    html_text = write_report(cfg).read_text()
    assert "calculator &#x27;gpaw&#x27; unavailable on &lt;every&gt; worker" in html_text and "Traceback" not in html_text


def test_campaign_report_refuses_an_unusable_out_and_writes_it_whole(tmp_path):
    """`campaign report -o` to a folder or under a file: exit 2 naming it, before the report is
    built; a usable one gets the whole report and no temp file beside it."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    CampaignStore(f"sqlite:///{run_dir / 'store.db'}", _new_campaign(run_dir)).ensure_round(1)
    folder, afile = tmp_path / "reports", tmp_path / "afile"
    folder.mkdir()
    afile.write_text("x")
    for out, why in ((folder, "is a directory"), (afile / "report.html", f"{afile} is not a directory")):
        res = CliRunner().invoke(app, ["campaign", "report", "--dir", str(run_dir), "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert f"--out {out}: " in res.output and why in res.output and "Traceback" not in res.output
    assert list(folder.iterdir()) == [] and afile.read_text() == "x"
    res = CliRunner().invoke(app, ["campaign", "report", "--dir", str(run_dir), "-o", str(folder / "r.html")])
    assert res.exit_code == 0, res.output
    assert [p.name for p in folder.iterdir()] == ["r.html"] and "</html>" in (folder / "r.html").read_text()


def test_a_calculator_that_cannot_run_fails_the_stage_not_the_candidates(tmp_path, database_path):
    """Every MD job of the round fails on the setup (a calculator that is not installed): the
    validate stage fails saying so, and no candidate is recorded as failed (no verdict, no
    composition excluded later); after the fix, requeue + rerun validate them."""
    import json
    from itertools import islice

    import ray

    from xrdmatch.platform import queue
    from xrdmatch.platform.campaign import CampaignError, stage_validate
    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.ray_utils import init_ray

    recs = [json.loads(line) for _, line in islice(iter_jsonl_lines(database_path), 1)]
    db = tmp_path / "db.jsonl"
    db.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg, store, ctx = _round_one_store(
        tmp_path, {"database": {"path": str(db)}, "campaign": {"poll_s": 0.2},
                   "validation": {"calculator": "notapackage.Calc", "method": "mlip-md", "workers": 1,
                                  "poll_s": 0.2, "min_atoms": 1, "min_length": 0.0}},
        [{"structure_id": r["id"]} for r in recs])
    init_ray(None, 2)
    try:
        with pytest.raises(CampaignError, match="every MD job failed because the calculator cannot be used: "
                                                "CalculatorUnavailable: calculator 'notapackage.Calc'"):
            stage_validate(ctx, 1)
    finally:
        ray.shutdown()
    assert [j.state for j in queue.list_jobs(ctx.url)] == ["failed"]
    assert [c.verdict for c in store.candidates(1)] == [None]


def test_a_campaign_run_started_by_a_killed_process_is_reopened_not_doubled(tmp_path):
    """kill -9 between starting the campaign's (or a round's) MLflow run and storing its id: the
    rerun finds the run by its tags and logs into it, instead of leaving it RUNNING beside a
    second one."""
    import mlflow

    from xrdmatch.platform.campaign import _start_parent_run, _start_round_run
    from xrdmatch.platform.tracking import configure

    cfg, store, ctx = _round_one_store(tmp_path, {}, [])
    configure(cfg)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment) or mlflow.get_experiment(
        mlflow.create_experiment(cfg.tracking.experiment))
    client = mlflow.MlflowClient()
    # what the killed process left: the runs exist, the store never learnt their ids
    orphan = client.create_run(exp.experiment_id, run_name="campaign-run",
                               tags={"xrdmatch.kind": "campaign", "xrdmatch.campaign_id": store.cid})
    orphan_round = client.create_run(exp.experiment_id, run_name="round-1", tags={
        "xrdmatch.kind": "campaign-round", "xrdmatch.campaign_id": store.cid, "xrdmatch.round": "1",
        "mlflow.parentRunId": orphan.info.run_id})
    client.create_run(exp.experiment_id, tags={"xrdmatch.kind": "campaign", "xrdmatch.campaign_id": "another"})
    with _start_parent_run(ctx) as parent:
        with _start_round_run(ctx, 1) as rnd:
            assert (parent.info.run_id, rnd.info.run_id) == (orphan.info.run_id, orphan_round.info.run_id)
    assert store.campaign().mlflow_run_id == orphan.info.run_id
    assert next(r for r in store.rounds() if r.round == 1).mlflow_run_id == orphan_round.info.run_id
    runs = client.search_runs([exp.experiment_id], f"tags.`xrdmatch.campaign_id` = '{store.cid}'")
    assert len(runs) == 2 and client.get_run(orphan.info.run_id).data.params  # the config was logged into it


def test_status_and_report_tell_a_rounds_own_md_result_and_where_it_stands(tmp_path):
    """The report shows a candidate's own MD result (not an imported measurement of the same
    structure); a round killed between two stages is not "finished"; a finished campaign given
    more rounds is running again."""
    from xrdmatch.platform.campaign_store import DONE
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.platform.report import build_report, campaign_status, current_stage

    from xrdmatch.config import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, {"run_dir": str(run_dir)})
    url = f"sqlite:///{run_dir / 'store.db'}"
    store = CampaignStore(url, _new_campaign(run_dir))
    store.ensure_round(1)
    for stage in ("patterns", "train", "register", "screen"):
        store.start_stage(1, stage)
        store.finish_stage(1, stage, {}, 0.0)
    store.start_stage(1, "select")
    store.finish_stage(1, "select", {"picks": ["mp-1"]}, 0.0, candidates=[
        {"rank": 0, "formula": "Li3N", "p_mean": 0.9, "p_std": 0.0, "score": 0.9, "structure_id": "mp-1"}])
    store.update_candidate("mp-1", job_id="7", verdict="inconclusive")
    add_label(url, LabelRecord("mp-1", "Li3N", "experiment", 1, "import:experiment", sigma_300=3.3e-9))
    html_text = build_report(cfg)
    assert "3.30e-09" not in html_text  # the measurement is not this candidate's MD result
    # killed after select finished, before validate started: round 1 is at validate, not finished
    assert current_stage(store) == (1, "validate", "pending")
    assert "current: round 1 stage validate (pending" in "\n".join(campaign_status(cfg))
    store.set_campaign(status=DONE)
    store.ensure_campaign(str(run_dir), {})
    assert store.campaign().status != DONE
