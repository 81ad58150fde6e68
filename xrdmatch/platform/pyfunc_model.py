"""The registered model: the whole XRDMatch ensemble as ONE MLflow pyfunc.

Logged as *models from code*: MLflow stores this file's source and runs it on load (it ends
with ``mlflow.models.set_model``), so loading unpickles nothing. The ensemble's weights travel
as the artifact ``ensemble`` (the directory written by ``Ensemble.save``: safetensors + JSON)
and are read with ``Ensemble.load`` in ``load_context``. The ``xrdmatch`` package travels with
the model (``code_paths``: ``code/xrdmatch``, put on sys.path by MLflow at load), and its
requirements list what ``load_context``/``predict`` import, so the model loads where xrdmatch
is not installed; where it is already imported, that copy is used.

Input: float64 patterns, one per row, 4501 values each (Cu K-alpha, 2-theta 0-90 deg in
0.02 deg bins, maximum 1): the signature is one tensor of shape (-1, 4501). A numpy array
(served: ``{"inputs": [[...], ...]}``) or a DataFrame of 4501 columns (``patterns_frame``,
whose names ``v1`` .. ``v4501`` are the labelled CSV's; served: ``dataframe_split``) are both
taken; MLflow hands the frame over as an array, so its columns are read by position.
Output: a DataFrame with ``p_superionic`` (ensemble mean), ``p_std`` (spread across members),
``superionic`` (1 when at least ceil(``vote_fraction`` x members) members give
p > ``threshold``: the rule the evaluation scored; both in the model config, from
``evaluation.vote_fraction`` and ``tracking.decision_threshold``) and ``error``. A row that
cannot be scored (NaN or infinite values, a flat pattern) gets its reason in ``error`` and
empty predictions; the other rows of the batch are predicted (a served batch is not lost to
one bad row). Input of another shape or dtype is refused whole, by MLflow's schema check.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

N_BINS = 4501
COLUMNS = [f"v{i}" for i in range(1, N_BINS + 1)]
OUTPUT_COLUMNS = ["p_superionic", "p_std", "superionic", "error"]


def patterns_frame(X: np.ndarray) -> pd.DataFrame:
    """(n, 4501) patterns -> the model's input DataFrame."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != N_BINS:
        raise ValueError(f"patterns must have shape (n, {N_BINS}), got {X.shape}")
    return pd.DataFrame(X, columns=COLUMNS)


def frame_patterns(df: pd.DataFrame | np.ndarray) -> np.ndarray:
    """The model's input (DataFrame with v1..v4501, or a bare (n, 4501) array) -> float32 patterns."""
    if isinstance(df, pd.DataFrame):
        if all(c in df.columns for c in COLUMNS):
            X = df[COLUMNS].to_numpy(dtype=np.float32)
        elif df.shape[1] == N_BINS:
            X = df.to_numpy(dtype=np.float32)
        else:
            raise ValueError(f"input needs columns v1..v{N_BINS} (got {df.shape[1]} columns)")
    else:
        X = np.asarray(df, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
    if X.ndim != 2 or X.shape[1] != N_BINS:
        raise ValueError(f"patterns must have {N_BINS} values per row, got shape {X.shape}")
    return X


def row_errors(X: np.ndarray) -> list[str]:
    """Why each row cannot be scored ("" when it can): the model min-max normalises every
    pattern, so only non-finite values and a pattern without range (no peak) are unusable."""
    finite = np.isfinite(X).all(axis=1)
    with np.errstate(invalid="ignore"):
        flat = finite & (np.ptp(X, axis=1) == 0)
    return ["pattern has NaN or infinite values" if not f else
            "pattern is flat (all values equal): no peaks to score" if fl else ""
            for f, fl in zip(finite, flat)]


def decide(proba: dict[str, np.ndarray], threshold: float, vote_fraction: float) -> np.ndarray:
    """The evaluated decision rule: superionic when at least ceil(vote_fraction x members)
    members give p > threshold (without members: mean p > threshold), as ``evaluation.combine``."""
    from xrdmatch.training.metrics import calls, vote

    members = proba.get("p_members")
    if members is None:
        return calls(proba["p_mean"], threshold).astype(np.int64)
    return vote(members, vote_fraction, threshold).astype(np.int64)


class XRDMatchPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the ensemble from the ``ensemble`` artifact; predicts in batches."""

    @classmethod
    def from_ensemble(cls, ensemble_dir, threshold: float, vote_fraction: float, batch_size: int = 512):
        """The same model from an ensemble folder and its decision rule, without MLflow's loader
        (which runs the code shipped in the model folder): what ``xrdmatch predict`` uses."""
        self = cls()
        self._load(ensemble_dir, threshold, vote_fraction, batch_size)
        return self

    def load_context(self, context) -> None:
        cfg = dict(getattr(context, "model_config", None) or {})
        self._load(context.artifacts["ensemble"], cfg.get("threshold", 0.5), cfg.get("vote_fraction", 0.5),
                   cfg.get("batch_size", 512))

    def _load(self, ensemble_dir, threshold, vote_fraction, batch_size) -> None:
        from xrdmatch.training.ensemble import Ensemble

        self.threshold, self.vote_fraction, self.batch_size = float(threshold), float(vote_fraction), int(batch_size)
        self.ensemble = Ensemble.load(ensemble_dir)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        X = frame_patterns(model_input)
        errors = row_errors(X)
        n = len(X)
        p, s = np.full(n, np.nan), np.full(n, np.nan)
        called = pd.array([pd.NA] * n, dtype="Int64")
        ok = np.flatnonzero([not e for e in errors])
        for i in range(0, len(ok), self.batch_size):
            idx = ok[i : i + self.batch_size]
            proba = self.ensemble.predict_proba(X[idx])
            p[idx], s[idx] = proba["p_mean"], proba["p_std"]
            called[idx] = decide(proba, self.threshold, self.vote_fraction)
        # nullable floats: an unscored row is null, not NaN, which MLflow's server writes as a bare
        # NaN token that strict JSON parsers refuse
        return pd.DataFrame({"p_superionic": pd.array(p, dtype="Float64"), "p_std": pd.array(s, dtype="Float64"),
                             "superionic": called, "error": errors})


# Models from code: when MLflow executes this file as the model (module name code_model_<uuid>),
# hand it the model object. Importing it as xrdmatch.platform.pyfunc_model sets nothing.
if __name__ != "xrdmatch.platform.pyfunc_model":
    mlflow.models.set_model(XRDMatchPyfunc())
