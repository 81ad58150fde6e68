"""The fixed evaluation behind the registry's promotion rule (``tracking.promotion_metric``).

Every version registered by ``xrdmatch train`` or a campaign round is scored the same way, so
that "beats the champion" compares like with like: a grouped (by reduced formula),
stratified ``campaign.eval_folds``-fold CV of a ``campaign.eval_ensemble_size``-member model
trained for ``campaign.eval_iterations`` on the labels the version was trained on, predictions
pooled over folds, threshold 0.5 (nothing is chosen on a test fold). It is a cheap proxy of
``xrdmatch evaluate --protocol grouped-cv``, not a replacement for it.
"""

from __future__ import annotations

import numpy as np

from xrdmatch.config import Config


def champion_metrics(cfg: Config, ls, weights: np.ndarray, X_unlab: np.ndarray) -> dict[str, float]:
    """``grouped_cv_<metric>`` for the labelled set ``ls`` (empty when ``eval_folds`` < 2)."""
    from xrdmatch.training.ensemble import train_ensemble
    from xrdmatch.training.metrics import binary_metrics
    from xrdmatch.training.splits import grouped_stratified_kfold

    folds = cfg.campaign.eval_folds
    if folds < 2:
        return {}
    tcfg = cfg.training.model_copy(update={
        "iterations": cfg.campaign.eval_iterations or cfg.training.iterations,
        "ensemble_size": cfg.campaign.eval_ensemble_size,
    })
    y = np.asarray(ls.y)
    p = np.full(len(y), np.nan)
    for tr, te in grouped_stratified_kfold(y, ls.groups, folds, seed=cfg.seed):
        ens = train_ensemble(ls.X[tr], y[tr], X_unlab, tcfg, sample_weight=np.asarray(weights)[tr])
        p[te] = np.asarray(ens.predict_proba(ls.X[te])["p_mean"], dtype=float)
    ok = np.isfinite(p)
    m = binary_metrics(y[ok], (p[ok] >= 0.5).astype(int), p[ok])
    return {f"grouped_cv_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))}
