"""The fixed evaluation behind the registry's promotion rule (``tracking.promotion_metric``).

Every version registered by ``xrdmatch train`` or a campaign round is scored on the same test
compounds with the same folds, so that "beats the champion" compares like with like: the
labels file (``labels.path``, the paper's 112) split once into ``campaign.eval_folds`` grouped
(by reduced formula), stratified folds from ``seed``. Each fold's
``campaign.eval_ensemble_size``-member model, trained for ``campaign.eval_iterations`` (default:
``training.iterations``), learns from the labels the version was trained on, less every label
whose composition group is in the fold's test part (validated structures included); it is
scored on the file's labels of that test part. Predictions are pooled over folds and called by
the served rule (``evaluation.vote_fraction`` of the members at ``tracking.decision_threshold``);
nothing is chosen on a test fold. New labels therefore change what the models learn, never what
they are scored on. It is a cheap proxy of ``xrdmatch evaluate --protocol grouped-cv``, not a
replacement for it. The fold members are Ray tasks (one CPU each, in parallel) whose
predictions are cached under ``cache_dir``, so a killed stage does not train them again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrdmatch.config import Config
from xrdmatch.platform.data import LabelledSet


class UnscorableVersion(ValueError):
    """A fold of the fixed test leaves the version no label to train on (``labels.source_weights``
    gives the file's labels weight 0 and no validated label falls outside the fold): the version
    has no promotion metric, so it never beats a champion (``registry.beats``)."""


@dataclass
class ChampionPlan:
    """The promotion metric's member jobs, fixed before any training: ``X``/``y`` hold the
    version's training labels, then the test compounds (the labels file) from row ``n_train``."""

    X: np.ndarray
    y: np.ndarray
    n_train: int
    test: LabelledSet
    splits: list  # (train rows of the labels file, test rows of the labels file) per fold
    jobs: list


def plan_champion(cfg: Config, ls: LabelledSet, weights: np.ndarray, U: np.ndarray, tcfg) -> ChampionPlan:
    from xrdmatch.platform.data import load_labelled
    from xrdmatch.training.ensemble import member_seeds
    from xrdmatch.training.evaluation import MemberJob, member_digest
    from xrdmatch.training.splits import grouped_stratified_kfold

    test = load_labelled(cfg.labels.path)  # the fixed test compounds, with the file's labels
    n = len(ls)
    X = np.concatenate([np.asarray(ls.X, np.float32), np.asarray(test.X, np.float32)])
    y = np.concatenate([np.asarray(ls.y), np.asarray(test.y)]).astype(np.int64)
    w = np.asarray(weights, np.float64)
    data_hash = hashlib.sha256(X.tobytes() + y.tobytes() + w.tobytes()).hexdigest()[:16]
    unlab_hash = hashlib.sha256(np.ascontiguousarray(U).tobytes()).hexdigest()[:16]
    splits = grouped_stratified_kfold(test.y, test.groups, cfg.campaign.eval_folds, seed=cfg.seed)
    train_groups = np.asarray(ls.groups, dtype=object)
    jobs = []
    for k, (_, te) in enumerate(splits):
        # every label of the version outside the fold's test groups: file compounds and validated ones
        tr = np.flatnonzero(~np.isin(train_groups, np.asarray(test.groups, dtype=object)[te]))
        if not w[tr].sum() > 0:
            raise UnscorableVersion(
                f"no promotion metric: fold {k + 1} of {len(splits)} of the labels file leaves this version no label "
                f"of weight > 0 to train on ({len(tr)} of its {n} labels lie outside the fold's compositions"
                f"{', all weighted 0 by labels.source_weights' if len(tr) else ''}); it is registered without the "
                "metric and does not replace a champion")
        for m, seed in enumerate(member_seeds(tcfg)):
            j = MemberJob(f"champion/f{k}/m{m}", tcfg.algorithm, seed + 101 * k, tr, n + te, sample_weight=w[tr])
            j.digest = member_digest(j, tcfg, data_hash, unlab_hash)
            jobs.append(j)
    return ChampionPlan(X, y, n, test, splits, jobs)


def champion_metrics(cfg: Config, ls: LabelledSet, weights: np.ndarray, X_unlab: np.ndarray,
                     cache_dir: str | Path | None = None, log=None) -> dict[str, float]:
    """``grouped_cv_<metric>`` of a version trained on ``ls`` (with ``weights``), scored on the
    labels file's compounds (empty when ``eval_folds`` < 2)."""
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.training.ensemble import unlabelled_subset
    from xrdmatch.training.evaluation import combine, run_jobs
    from xrdmatch.training.metrics import binary_metrics

    if cfg.campaign.eval_folds < 2:
        return {}
    tcfg = cfg.training.model_copy(update={
        "iterations": cfg.campaign.eval_iterations or cfg.training.iterations,
        "ensemble_size": cfg.campaign.eval_ensemble_size,
    })
    U = np.zeros((0, np.asarray(ls.X).shape[1]), np.float32) if X_unlab is None else np.asarray(X_unlab, np.float32)
    U = unlabelled_subset(U, tcfg)
    plan = plan_champion(cfg, ls, weights, U, tcfg)
    cache = Path(cache_dir) if cache_dir is not None else RunPaths.of(cfg.run_dir).root / "champion" / "members"
    probs = run_jobs(plan.jobs, plan.X, plan.y, U, tcfg, cache, cfg, log or (lambda s: None))
    test = plan.test
    p, pred = np.full(len(test), np.nan), np.zeros(len(test), np.int64)
    for k, (_, te) in enumerate(plan.splits):
        c = combine(np.stack([probs[f"champion/f{k}/m{m}"] for m in range(tcfg.ensemble_size)]),
                    cfg.evaluation.vote_fraction, cfg.tracking.decision_threshold)
        p[te], pred[te] = c["p_mean"], c["pred"]
    ok = np.isfinite(p)
    if not ok.all():  # a diverged member: never silently score a subset (promotion compares these)
        raise ValueError(f"promotion metric: {int((~ok).sum())} of {len(p)} compounds got no finite probability "
                         f"from their fold's members (a member diverged?); cached in {cache}")
    m = binary_metrics(test.y.astype(np.int64), pred, p)
    return {f"grouped_cv_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))}
