"""Evaluation protocols for XRDMatch: the paper's, replayed, and an honest grouped CV.

Both protocols reduce to "train member m of algorithm a on labelled indices I, predict
P(superionic) for indices J" (:class:`MemberJob`). Every job is a Ray task (one CPU), its
prediction is cached on disk under the run directory keyed by everything that determines it,
so a killed evaluation resumes where it stopped and a re-run with the same config is free.
Ensembles are the majority vote of their members' cached predictions, computed here exactly as
``Ensemble.predict_proba`` does (mean probability, votes = members with p > 0.5).

Nothing is ever selected on the compounds being scored: members keep their final weights
(no "best" checkpoint), the decision threshold is 0.5 or chosen on an inner split of the
training fold (``evaluation.threshold_selection: inner``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdmatch.config import Config, TrainingConfig
from xrdmatch.training.fingerprint import code_fingerprint
from xrdmatch.training.metrics import (
    METRICS, best_threshold, binary_metrics, calls, summarise_repeats, vote, vote_threshold,
)
from xrdmatch.training.splits import inner_split, paper_label_draws, paper_pool, repeated_grouped_splits

#: What the paper reports (Wan et al. 2024): ensemble macro-F1 on all 112, members on their unseen.
PAPER_REPORTED = {"macro_f1_all112": 0.918, "member_macro_f1_unseen": 0.80, "member_macro_f1_unseen_std": 0.04}

ALGORITHMS = ("supervised", "fixmatch", "flexmatch")

LogFn = Callable[[str], None]


# ------------------------------------------------------------------ methods and jobs


@dataclass(frozen=True)
class Method:
    name: str
    algorithm: str
    members: int  # 1 = a single model


def parse_methods(names: list[str], ensemble_size: int) -> list[Method]:
    """'flexmatch' -> one member; 'flexmatch-ensemble' -> ``ensemble_size`` members."""
    out = []
    for n in names:
        algo, _, suffix = n.partition("-")
        if algo not in ALGORITHMS or suffix not in ("", "ensemble"):
            raise ValueError(
                f"evaluation method {n!r}: expected one of {list(ALGORITHMS)} optionally with '-ensemble'"
            )
        out.append(Method(n, algo, ensemble_size if suffix else 1))
    return out


@dataclass
class MemberJob:
    """Train one member on ``train`` (indices of the labelled set), predict ``predict``."""

    key: str  # unique within a protocol run, e.g. "r0/f1/full/flexmatch/m2"
    algorithm: str
    seed: int
    train: np.ndarray
    predict: np.ndarray
    sample_weight: np.ndarray | None = None
    digest: str = ""  # cache key, filled by member_digest

    def cache_name(self) -> str:
        return f"{self.key.replace('/', '_')}-{self.digest}.npz"


def member_digest(job: MemberJob, tcfg: TrainingConfig, data_hash: str, unlab_hash: str) -> str:
    """The job's cache key: everything that determines its prediction, the training code included."""
    h = hashlib.sha256()
    h.update(code_fingerprint().encode())  # a member cached by other code is trained again
    h.update(json.dumps(tcfg.result_settings(), sort_keys=True).encode())
    h.update(f"{job.algorithm}|{job.seed}|{data_hash}|{unlab_hash}".encode())
    h.update(np.asarray(job.train, np.int64).tobytes())
    h.update(np.asarray(job.predict, np.int64).tobytes())
    if job.sample_weight is not None:
        h.update(np.asarray(job.sample_weight, np.float64).tobytes())
    return h.hexdigest()[:16]


def member_seed(base: int, repeat: int, fold: int, member: int) -> int:
    """Fixed before the run from the config seed; distinct for every (repeat, fold, member)."""
    return int(base) * 1_000_003 + repeat * 10_007 + fold * 101 + member


def inner_seed(base: int, repeat: int, fold: int) -> int:
    """Seed of everything drawn inside one outer training fold (its inner split, a label
    subsample): fixed before the run, distinct per (repeat, fold)."""
    return int(base) + 7919 * (repeat + 1) + fold


def train_predict(X, y, X_unlab, tcfg_json: dict, algorithm: str, seed: int, train, predict, sample_weight,
                  device: str = "cpu"):
    """One member job: train with the training core, return P(superionic) of ``predict`` and the
    seconds it took. Runs in a Ray task, or in process on a machine without Ray
    (scripts/train_member_jobs.py)."""
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.trainer import train_member

    tcfg = TrainingConfig.model_validate({**tcfg_json, "algorithm": algorithm})
    t0 = time.time()
    sw = None if sample_weight is None else np.asarray(sample_weight)
    member = train_member(X[train], y[train], X_unlab, tcfg, seed, sample_weight=sw, device=device)
    proba = Ensemble([member], network=tcfg.network, threshold=tcfg.augment.threshold).predict_proba(
        X[predict], device=device)
    return np.asarray(proba["p_mean"], dtype=np.float64), time.time() - t0


def save_member_prediction(path: Path, p: np.ndarray, predict: np.ndarray, seed: int) -> None:
    """One member's cached prediction; atomic, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, p=p, predict=predict, seed=seed)
    os.replace(tmp, path)


def run_jobs(
    jobs: list[MemberJob],
    X: np.ndarray,
    y: np.ndarray,
    X_unlab: np.ndarray,
    tcfg: TrainingConfig,
    cache_dir: Path,
    cfg: Config,
    log: LogFn,
) -> dict[str, np.ndarray]:
    """P(superionic) of every job's ``predict`` indices; cached jobs are read, the rest run on Ray."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    todo = []
    for j in jobs:
        f = cache_dir / j.cache_name()
        if f.is_file():
            with np.load(f) as z:
                out[j.key] = z["p"]
        else:
            todo.append(j)
    log(f"{len(jobs)} member trainings: {len(jobs) - len(todo)} cached, {len(todo)} to run")
    if not todo:
        return out

    from xrdmatch.platform.ray_utils import error_text, init_ray
    from xrdmatch.training.ray_train import member_task_options

    ray = init_ray(cfg.ray.address, cfg.ray.num_cpus)
    options, device = member_task_options(tcfg)
    task = ray.remote(max_retries=1, **options)(train_predict)
    X_ref, y_ref, U_ref = ray.put(X), ray.put(y), ray.put(X_unlab)
    tcfg_json = tcfg.model_dump(mode="json")
    pending = {
        task.remote(X_ref, y_ref, U_ref, tcfg_json, j.algorithm, j.seed, j.train, j.predict, j.sample_weight, device): j
        for j in todo
    }
    t0, done = time.time(), 0
    failed: dict[str, str] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        j = pending.pop(ready[0])
        try:
            p, dt = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # keep the others' work: they are cached as they finish
            failed[j.key] = error_text(e)
            log(f"  {j.key} failed: {failed[j.key]}")
            continue
        save_member_prediction(cache_dir / j.cache_name(), p, j.predict, j.seed)
        out[j.key] = p
        done += 1
        eta = (time.time() - t0) / done * len(pending)
        log(f"  [{done}/{len(todo)}] {j.key} trained in {dt:.0f} s (eta {eta / 60:.1f} min)")
    if failed:
        first = next(iter(failed.items()))
        raise MemberTrainingError(f"{len(failed)} of {len(todo)} member trainings failed (the {done} others are "
                                  f"cached; rerun to retry only the failed): {first[0]}: {first[1]}")
    return out


class MemberTrainingError(RuntimeError):
    """Member trainings raised; the message names them. Not a ValueError: not the user's input."""


# ------------------------------------------------------------------ data


@dataclass
class EvalData:
    X: np.ndarray
    y: np.ndarray
    ids: list[str]
    formulas: list[str]
    groups: np.ndarray
    X_unlab: np.ndarray
    data_hash: str
    unlab_hash: str
    unlab_source: str
    sample_weight: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def training_config(cfg: Config) -> TrainingConfig:
    """The training section with the evaluation's cost overrides applied."""
    t = cfg.training.model_copy(deep=True)
    ev = cfg.evaluation
    if ev.iterations is not None:
        t.iterations = ev.iterations
    if ev.unlabelled_limit is not None:
        t.unlabelled_limit = ev.unlabelled_limit
    if ev.ensemble_size is not None:
        t.ensemble_size = ev.ensemble_size
    return t


def load_eval_data(cfg: Config, tcfg: TrainingConfig, log: LogFn) -> EvalData:
    """The labelled set of the config and the (subsampled) unlabelled patterns of its database."""
    from xrdmatch.platform.data import load_labelled
    from xrdmatch.platform.patterns import ensure_patterns

    lab = load_labelled(cfg.labels.path)
    table = ensure_patterns(cfg)
    U = np.asarray(table.X, dtype=np.float32)
    n_all = len(U)
    if tcfg.unlabelled_limit is not None and n_all > tcfg.unlabelled_limit:
        rng = np.random.default_rng(cfg.evaluation.seed)
        U = U[np.sort(rng.choice(n_all, tcfg.unlabelled_limit, replace=False))]
    uh = hashlib.sha256(np.ascontiguousarray(U).tobytes()).hexdigest()[:16]
    log(f"labelled: {len(lab)} ({int(lab.y.sum())} superionic, {len(set(lab.groups))} formulas); "
        f"unlabelled: {len(U)} of {n_all} patterns")
    return EvalData(
        X=lab.X, y=lab.y.astype(np.int64), ids=lab.ids, formulas=lab.formulas, groups=np.asarray(lab.groups),
        X_unlab=U, data_hash=lab.hash(), unlab_hash=uh, unlab_source=f"{cfg.database.path} ({len(U)} of {n_all})",
    )


# ------------------------------------------------------------------ ensemble rule


def combine(p_members: np.ndarray, vote_fraction: float, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """(members, samples) probabilities -> p_mean, p_std, votes, pred.

    p_mean / p_std / votes (members with p > 0.5) as ``Ensemble.predict_proba``; the call is
    ``votes >= ceil(vote_fraction * members)`` (the paper: >= 5 of 10; ``Ensemble.majority``
    would need 6 of 10). A single member calls superionic when p > threshold.
    """
    p_members = np.atleast_2d(p_members)
    return {"p_mean": p_members.mean(0), "p_std": p_members.std(0), "votes": calls(p_members, threshold).sum(axis=0),
            "pred": vote(p_members, vote_fraction, threshold)}


# ------------------------------------------------------------------ grouped CV


@dataclass
class GroupedCVPlan:
    """Everything ``evaluate_grouped_cv`` trains or reads, fixed before any training: another
    machine can train the members (``uncached``) into ``cache_dir``, e.g. a GPU without Ray."""

    tcfg: TrainingConfig
    methods: list[Method]
    splits: list
    jobs: list[MemberJob]
    inner: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # (repeat, fold) -> (train, validation)
    cache_dir: Path

    def uncached(self) -> list[MemberJob]:
        """The jobs whose prediction ``cache_dir`` does not hold yet."""
        return [j for j in self.jobs if not (self.cache_dir / j.cache_name()).is_file()]


def plan_grouped_cv(cfg: Config, data: EvalData) -> GroupedCVPlan:
    """Outer splits, every member training job, and the inner (train, validation) split per fold.

    "full" jobs train on the outer training fold and predict its test fold; "inner" jobs (only
    with ``threshold_selection: inner``) train and predict inside the outer training fold.
    Members shared by methods (the single model = member 0 of the ensemble) are trained once.
    """
    ev = cfg.evaluation
    tcfg = training_config(cfg)
    methods = parse_methods(ev.methods, tcfg.ensemble_size)
    splits = repeated_grouped_splits(data.y, data.groups, ev.folds, ev.repeats, ev.seed)
    need = {a: max([m.members for m in methods if m.algorithm == a], default=0) for a in ALGORITHMS}
    jobs: list[MemberJob] = []
    inner: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for s in splits:
        phases = [("full", s.train, s.test)]
        if ev.threshold_selection == "inner":
            seed = inner_seed(ev.seed, s.repeat, s.fold)
            itr, iva = inner_split(s.train, data.y, data.groups, ev.inner_folds, seed)
            inner[(s.repeat, s.fold)] = (itr, iva)
            phases.append(("inner", itr, iva))
        for phase, tr, pr in phases:
            for a, n in need.items():
                for m in range(n):
                    jobs.append(MemberJob(f"r{s.repeat}/f{s.fold}/{phase}/{a}/m{m}", a,
                                          member_seed(ev.seed, s.repeat, s.fold, m), tr, pr))
    for j in jobs:
        j.digest = member_digest(j, tcfg, data.data_hash, data.unlab_hash)
    return GroupedCVPlan(tcfg, methods, splits, jobs, inner, members_dir(cfg, "grouped-cv"))


def evaluate_grouped_cv(cfg: Config, data: EvalData | None = None, log_fn: LogFn | None = None) -> dict[str, Any]:
    """Repeated stratified k-fold grouped by reduced formula; all labels in the training folds.

    Returns ``{"protocol": "grouped-cv", "results": [...], "folds": [...], "per_fold": [...],
    "predictions": {method: columns}, "machine": ..., "wall_time_s": ..., "config": ...}``.
    """
    log = log_fn or (lambda s: None)
    t_start = time.time()
    ev = cfg.evaluation
    tcfg = training_config(cfg)
    parse_methods(ev.methods, tcfg.ensemble_size)  # fail before any work
    data = data or load_eval_data(cfg, tcfg, log)
    plan = plan_grouped_cv(cfg, data)
    methods, splits, jobs, inner = plan.methods, plan.splits, plan.jobs, plan.inner
    probs = run_jobs(jobs, data.X, data.y, data.X_unlab, tcfg, plan.cache_dir, cfg, log)

    per_fold: list[dict[str, Any]] = []
    preds: dict[str, dict[str, list]] = {m.name: _empty_pred_cols() for m in methods}
    for s in splits:
        for m in methods:
            keys = [f"r{s.repeat}/f{s.fold}/full/{m.algorithm}/m{i}" for i in range(m.members)]
            thr = 0.5
            if ev.threshold_selection == "inner":
                ikeys = [k.replace("/full/", "/inner/") for k in keys]
                itr, iva = inner[(s.repeat, s.fold)]
                pi = combine(np.stack([probs[k] for k in ikeys]), ev.vote_fraction)
                # an ensemble's score for thresholding is its mean probability
                thr = best_threshold(data.y[iva], pi["p_mean"])
            c = combine(np.stack([probs[k] for k in keys]), ev.vote_fraction, threshold=thr)
            if m.members > 1 and ev.threshold_selection == "inner":
                c["pred"] = (c["p_mean"] > thr).astype(int)
            row = binary_metrics(data.y[s.test], c["pred"], c["p_mean"])
            row.update(method=m.name, repeat=s.repeat, fold=s.fold, threshold=thr)
            per_fold.append(row)
            _add_preds(preds[m.name], data, s.test, c, s.repeat, s.fold)

    results = []
    for m in methods:
        rows = [r for r in per_fold if r["method"] == m.name]
        res = {"method": m.name, "members": m.members, **summarise_repeats(rows)}
        results.append(res)
    folds = [
        {"repeat": s.repeat, "fold": s.fold, "n_train": int(len(s.train)), "n_test": int(len(s.test)),
         "n_superionic_train": int(data.y[s.train].sum()), "n_superionic_test": int(data.y[s.test].sum()),
         "prevalence_test": float(data.y[s.test].mean())}
        for s in splits
    ]
    return {
        "protocol": "grouped-cv",
        "results": results,
        "prevalence": float(data.y.mean()),
        "folds": folds,
        "per_fold": per_fold,
        "predictions": preds,
        **_meta(cfg, tcfg, data, t_start, len(jobs)),
    }


# ------------------------------------------------------------------ paper


def evaluate_paper(cfg: Config, data: EvalData | None = None, log_fn: LogFn | None = None) -> dict[str, Any]:
    """The authors' protocol: seed-0 shuffle, 19 + 74 pool, members of 10 + 10 labels, 5-of-10 vote.

    Reports the paper's headline (ensemble macro-F1 over all 112, which includes every
    member's training compounds), the members' macro-F1 on their own unseen compounds, and the
    ensemble on compounds no member trained on (``macro_f1`` / ``f1_superionic`` etc.; std by
    bootstrap over those compounds) and on formulas no member trained on.
    """
    log = log_fn or (lambda s: None)
    t_start = time.time()
    ev = cfg.evaluation
    tcfg = training_config(cfg)
    methods = parse_methods(ev.paper_methods, ev.paper_members)
    data = data or load_eval_data(cfg, tcfg, log)
    pool, hold = paper_pool(data.y, ev.paper_seed, *ev.paper_pool)
    n_all = len(data.y)
    everything = np.arange(n_all)
    n_members = max(m.members for m in methods)
    draws = paper_label_draws(data.y, pool, n_members, *ev.paper_draw, seed=ev.seed)

    jobs = []
    for a in sorted({m.algorithm for m in methods}):
        for i in range(n_members):
            jobs.append(MemberJob(f"paper/{a}/m{i}", a, member_seed(ev.seed, 0, 0, i), draws[i], everything))
    for j in jobs:
        j.digest = member_digest(j, tcfg, data.data_hash, data.unlab_hash)
    probs = run_jobs(jobs, data.X, data.y, data.X_unlab, tcfg, members_dir(cfg, "paper"), cfg, log)

    results, preds = [], {}
    for m in methods:
        P = np.stack([probs[f"paper/{m.algorithm}/m{i}"] for i in range(m.members)])
        used = draws[: m.members]
        seen = np.unique(np.concatenate(used))
        unseen = np.setdiff1d(everything, seen)
        seen_groups = set(data.groups[seen])
        unseen_groups = np.array([i for i in unseen if data.groups[i] not in seen_groups], dtype=int)
        c = combine(P, ev.vote_fraction)
        all112 = binary_metrics(data.y, c["pred"], c["p_mean"])
        un = binary_metrics(data.y[unseen], c["pred"][unseen], c["p_mean"][unseen])
        ung = binary_metrics(data.y[unseen_groups], c["pred"][unseen_groups], c["p_mean"][unseen_groups]) \
            if len(unseen_groups) else {}
        member_f1 = []
        for i, d in enumerate(used):
            rest = np.setdiff1d(everything, d)
            member_f1.append(binary_metrics(data.y[rest], calls(P[i, rest]))["macro_f1"])
        boot = _bootstrap_std(data.y[unseen], c["pred"][unseen], c["p_mean"][unseen], seed=ev.seed)
        res = {"method": m.name, "members": m.members}
        for k in METRICS:
            res[k] = un[k]
            res[f"{k}_std"] = boot[k]
        res.update(
            macro_f1_all112=all112["macro_f1"],
            f1_superionic_all112=all112["f1_superionic"],
            macro_f1_unseen=un["macro_f1"],
            f1_superionic_unseen=un["f1_superionic"],
            n_unseen=un["n"], n_superionic_unseen=un["n_superionic"],
            macro_f1_unseen_formulas=ung.get("macro_f1", math.nan),
            f1_superionic_unseen_formulas=ung.get("f1_superionic", math.nan),
            n_unseen_formulas=int(len(unseen_groups)),
            member_macro_f1_unseen=float(np.mean(member_f1)),
            member_macro_f1_unseen_std=float(np.std(member_f1)),
            votes_needed=vote_threshold(m.members, ev.vote_fraction),
        )
        results.append(res)
        cols = _empty_pred_cols()
        _add_preds(cols, data, everything, c, 0, 0)
        cols["trained_on"] = [int(n) for n in np.isin(everything, seen) * 1]
        preds[m.name] = cols
    return {
        "protocol": "paper",
        "results": results,
        "paper_reported": PAPER_REPORTED,
        "prevalence": float(data.y.mean()),
        "split": {
            "shuffle": f"np.random.seed({ev.paper_seed}); np.random.permutation({n_all})",
            "pool": [data.ids[i] for i in pool], "holdout": [data.ids[i] for i in hold],
            "draws": [[data.ids[i] for i in d] for d in draws],
        },
        "predictions": preds,
        **_meta(cfg, tcfg, data, t_start, len(jobs)),
    }


# ------------------------------------------------------------------ helpers


def members_dir(cfg: Config, protocol: str) -> Path:
    """Where a protocol caches its members' predictions under the run directory."""
    from xrdmatch.platform.paths import RunPaths

    return RunPaths.of(cfg.run_dir).root / "evaluation" / protocol / "members"


def _empty_pred_cols() -> dict[str, list]:
    return {k: [] for k in ("id", "formula", "group", "repeat", "fold", "y", "p", "p_std", "votes", "pred")}


def _add_preds(cols: dict[str, list], data: EvalData, idx: np.ndarray, c: dict, repeat: int, fold: int) -> None:
    for i in idx:
        cols["id"].append(data.ids[i])
        cols["formula"].append(data.formulas[i])
        cols["group"].append(str(data.groups[i]))
        cols["repeat"].append(int(repeat))
        cols["fold"].append(int(fold))
        cols["y"].append(int(data.y[i]))
    assert len(c["p_mean"]) == len(idx), "predictions must be aligned with the scored indices"
    cols["p"] += [float(v) for v in c["p_mean"]]
    cols["p_std"] += [float(v) for v in c["p_std"]]
    cols["votes"] += [int(v) for v in c["votes"]]
    cols["pred"] += [int(v) for v in c["pred"]]


def _bootstrap_std(y, pred, score, seed: int, n: int = 1000) -> dict[str, float]:
    """Std of each metric over bootstrap resamples of the scored compounds (a single run has no repeats)."""
    rng = np.random.default_rng(seed)
    y, pred, score = np.asarray(y), np.asarray(pred), np.asarray(score)
    rows = []
    for _ in range(n):
        b = rng.integers(0, len(y), len(y))
        rows.append(binary_metrics(y[b], pred[b], score[b]))
    out = {}
    for k in METRICS:
        v = np.array([r[k] for r in rows], float)
        v = v[np.isfinite(v)]
        out[k] = float(v.std()) if len(v) else math.nan
    return out


def _meta(cfg: Config, tcfg: TrainingConfig, data: EvalData, t_start: float, n_jobs: int) -> dict[str, Any]:
    import torch

    import xrdmatch
    from xrdmatch.platform.machine import cpu_model

    return {
        "wall_time_s": round(time.time() - t_start, 1),
        "machine": {
            "node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "ray_address": cfg.ray.address or os.environ.get("RAY_ADDRESS"),
        },
        "member_trainings": n_jobs,
        "data": {"labelled": cfg.labels.path, "labelled_hash": data.data_hash, "n_labelled": int(len(data.y)),
                 "unlabelled": data.unlab_source, "unlabelled_hash": data.unlab_hash},
        "config": {"evaluation": cfg.evaluation.model_dump(mode="json"), "training": tcfg.model_dump(mode="json"),
                   "seed": cfg.seed},
        "version": getattr(xrdmatch, "__version__", ""),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------ rendering


def _fmt(v: Any, std: Any = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    s = f"{v:.3f}"
    if isinstance(std, (int, float)) and not isinstance(std, bool) and not math.isnan(std):
        s += f" ± {std:.3f}"
    return s


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (shared by the rich and markdown renderings)."""
    if result["protocol"] == "paper":
        head = ["method", "macro-F1 all 112", "macro-F1 unseen", "F1 superionic unseen",
                "macro-F1 unseen formulas", "member macro-F1 (own unseen)", "PR-AUC unseen", "n unseen (sup.)"]
        rows = []
        for r in result["results"]:
            g = r.get  # the tool's own JSON has every key; a hand-made one in the shape may not
            votes = f" ({g('members')}, >= {g('votes_needed')} votes)" if "members" in r else ""
            unseen = f"{g('n_unseen')} ({g('n_superionic_unseen')})" if "n_unseen" in r else "-"
            rows.append([r["method"] + votes, _fmt(g("macro_f1_all112")),
                         _fmt(g("macro_f1_unseen", g("macro_f1")), g("macro_f1_std")),
                         _fmt(g("f1_superionic"), g("f1_superionic_std")),
                         _fmt(g("macro_f1_unseen_formulas")),
                         _fmt(g("member_macro_f1_unseen"), g("member_macro_f1_unseen_std")),
                         _fmt(g("pr_auc")), unseen])
        p = result.get("paper_reported", PAPER_REPORTED)
        rows.append(["paper (published, vgg16, GPU)", _fmt(p["macro_f1_all112"]), "not reported", "not reported",
                     "not reported", _fmt(p["member_macro_f1_unseen"], p["member_macro_f1_unseen_std"]),
                     "not reported", "-"])
        return head, rows
    head = ["method", "macro-F1", "F1 superionic", "precision", "recall", "PR-AUC"]
    rows = [
        [r["method"]] + [_fmt(r.get(k), r.get(f"{k}_std")) for k in METRICS] for r in result["results"]
    ]
    return head, rows


def results_markdown(result: dict[str, Any]) -> str:
    """A markdown table of one protocol's result (paste into the README; generated, never typed)."""
    head, rows = table_rows(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not {"config", "machine", "data", "member_trainings", "wall_time_s", "finished_utc"} <= set(result):
        return "\n".join(lines) + "\n"  # a result without the run's metadata: the table alone
    ev = result["config"]["evaluation"]
    t = result["config"]["training"]
    m = result["machine"]
    if result["protocol"] == "grouped-cv":
        note = (f"grouped-cv: {ev['folds']} folds x {ev['repeats']} repeats grouped by reduced formula, "
                f"mean ± std over {result['results'][0].get('std_over', 'repeats')}; superionic prevalence {result['prevalence']:.3f} "
                f"(= PR-AUC of a random ranking); threshold: {ev['threshold_selection']}.")
    else:
        note = (f"paper protocol: {result['split']['shuffle']}; pool {ev['paper_pool']}, "
                f"members draw {ev['paper_draw']}; 'unseen' = compounds no member trained on "
                f"(± = bootstrap std over them).")
    lines += ["", note,
              f"Network {t['network']}, {t['iterations']} iterations, unlabelled {result['data']['unlabelled']}; "
              f"{result['member_trainings']} member trainings, wall time {result['wall_time_s'] / 60:.1f} min on "
              f"{m['cpus']} CPUs{' of ' + m['cpu'] if m.get('cpu') else ''} ({m['platform']}, cuda={m['cuda']}), finished {result['finished_utc']}."]
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (NaN -> null so any JSON reader accepts it)."""

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        return o

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(result), indent=1, default=str))  # default: paths and the like as text
    os.replace(tmp, p)
    return p
