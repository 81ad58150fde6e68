"""PNG figures logged with every evaluation/training run (matplotlib Agg: no display needed).

Label convention: 1 = superionic, the positive class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(figsize=(5.0, 4.0)):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    plt.close(fig)
    return p


def confusion_matrix_png(y_true: Sequence[int], y_pred: Sequence[int], path: str | os.PathLike[str],
                         title: str = "Confusion matrix") -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt, fig, ax = _figure()
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(y_true, int), np.asarray(y_pred, int), labels=[0, 1],
        display_labels=["not superionic", "superionic"], ax=ax, colorbar=False,
    )
    ax.set_title(title)
    return _save(plt, fig, path)


def pr_curve_png(y_true: Sequence[int], p: Sequence[float], path: str | os.PathLike[str],
                 title: str = "Precision-recall (superionic = positive)") -> Path:
    from sklearn.metrics import PrecisionRecallDisplay

    plt, fig, ax = _figure()
    y = np.asarray(y_true, int)
    if len(np.unique(y)) > 1:
        PrecisionRecallDisplay.from_predictions(y, np.asarray(p, float), ax=ax, plot_chance_level=True)
    else:
        ax.text(0.5, 0.5, "one class only: no PR curve", ha="center", va="center")
    ax.set_title(title)
    return _save(plt, fig, path)


def calibration_png(y_true: Sequence[int], p: Sequence[float], path: str | os.PathLike[str],
                    n_bins: int = 5, title: str = "Calibration") -> Path:
    from sklearn.calibration import CalibrationDisplay

    plt, fig, ax = _figure()
    y = np.asarray(y_true, int)
    if len(np.unique(y)) > 1:
        CalibrationDisplay.from_predictions(y, np.asarray(p, float), n_bins=n_bins, ax=ax, name="ensemble")
    else:
        ax.text(0.5, 0.5, "one class only: no calibration curve", ha="center", va="center")
    ax.set_title(title)
    return _save(plt, fig, path)


def learning_curves_png(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike[str],
                        title: str = "Learning curves") -> Path:
    """``curves``: metric name -> [(step, value), ...] (one line each)."""
    plt, fig, ax = _figure((6.0, 4.0))
    for name, pts in sorted(curves.items()):
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax.plot(steps, vals, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=6, loc="best")
    return _save(plt, fig, path)


def score_histogram_png(p: Sequence[float], path: str | os.PathLike[str], threshold: float = 0.5,
                        title: str = "Screening scores over the database") -> Path:
    plt, fig, ax = _figure((6.0, 3.6))
    ax.hist(np.asarray(p, float), bins=np.linspace(0, 1, 41), histtype="step", linewidth=1.6)
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("mean P(superionic) over the ensemble")
    ax.set_ylabel("structures")
    ax.set_title(title)
    return _save(plt, fig, path)
