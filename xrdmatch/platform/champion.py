"""The fixed evaluation behind the registry's promotion rule (``tracking.promotion_metric``).

Every version registered by ``xrdmatch train`` or a campaign round is scored the same way, so
that "beats the champion" compares like with like: a grouped (by reduced formula),
stratified ``campaign.eval_folds``-fold CV of a ``campaign.eval_ensemble_size``-member model
trained for ``campaign.eval_iterations`` (default: ``training.iterations``) on the labels the
version was trained on, predictions pooled over folds, threshold 0.5 (nothing is chosen on a
test fold). It is a cheap proxy of ``xrdmatch evaluate --protocol grouped-cv``, not a
replacement for it. The fold members are Ray tasks (one CPU each, in parallel) whose
predictions are cached under ``cache_dir``, so a killed stage does not train them again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from xrdmatch.config import Config


def champion_metrics(cfg: Config, ls, weights: np.ndarray, X_unlab: np.ndarray,
                     cache_dir: str | Path | None = None, log=None) -> dict[str, float]:
    """``grouped_cv_<metric>`` for the labelled set ``ls`` (empty when ``eval_folds`` < 2)."""
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.training.ensemble import member_seeds, unlabelled_subset
    from xrdmatch.training.evaluation import MemberJob, combine, member_digest, run_jobs
    from xrdmatch.training.metrics import binary_metrics, calls
    from xrdmatch.training.splits import grouped_stratified_kfold

    folds = cfg.campaign.eval_folds
    if folds < 2:
        return {}
    tcfg = cfg.training.model_copy(update={
        "iterations": cfg.campaign.eval_iterations or cfg.training.iterations,
        "ensemble_size": cfg.campaign.eval_ensemble_size,
    })
    X = np.asarray(ls.X, np.float32)
    y = np.asarray(ls.y).astype(np.int64)
    w = np.asarray(weights, np.float64)
    U = np.zeros((0, X.shape[1]), np.float32) if X_unlab is None else np.asarray(X_unlab, np.float32)
    U = unlabelled_subset(U, tcfg)
    data_hash = hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()[:16]
    unlab_hash = hashlib.sha256(U.tobytes()).hexdigest()[:16]
    splits = grouped_stratified_kfold(y, ls.groups, folds, seed=cfg.seed)
    jobs = []
    for k, (tr, te) in enumerate(splits):
        for m, seed in enumerate(member_seeds(tcfg)):
            j = MemberJob(f"champion/f{k}/m{m}", tcfg.algorithm, seed + 101 * k, tr, te, sample_weight=w[tr])
            j.digest = member_digest(j, tcfg, data_hash, unlab_hash)
            jobs.append(j)
    cache = Path(cache_dir) if cache_dir is not None else RunPaths.of(cfg.run_dir).root / "champion" / "members"
    probs = run_jobs(jobs, X, y, U, tcfg, cache, cfg, log or (lambda s: None))
    p = np.full(len(y), np.nan)
    for k, (_, te) in enumerate(splits):
        p[te] = combine(np.stack([probs[f"champion/f{k}/m{m}"] for m in range(tcfg.ensemble_size)]), 0.5)["p_mean"]
    ok = np.isfinite(p)
    if not ok.all():  # a diverged member: never silently score a subset (promotion compares these)
        raise ValueError(f"promotion metric: {int((~ok).sum())} of {len(p)} compounds got no finite probability "
                         f"from their fold's members (a member diverged?); cached in {cache}")
    m = binary_metrics(y, calls(p), p)
    return {f"grouped_cv_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))}
