"""The paper's input transform: min-max normalise each pattern, zero every value below 0.1.

Used for training, augmentation input and prediction alike, so a pattern is seen the same way
everywhere. All-zero (or constant) patterns map to all zeros instead of NaN.
"""

from __future__ import annotations

import numpy as np
import torch


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row of (B, L) to [0, 1]; rows without range become zeros."""
    lo = x.amin(dim=-1, keepdim=True)
    rng = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(rng > 0, (x - lo) / rng.clamp_min(1e-12), torch.zeros_like(x))


def preprocess(X: np.ndarray | torch.Tensor, threshold: float = 0.1):
    """Min-max per pattern, then zero values < ``threshold``. Same type out as in (float32)."""
    is_np = not isinstance(X, torch.Tensor)
    t = torch.from_numpy(np.array(X, dtype=np.float32)) if is_np else X.float()
    if t.ndim == 1:
        t = t[None]
    if not torch.isfinite(t).all():
        raise ValueError("preprocess: patterns contain NaN or inf values")
    out = minmax(t)
    out = torch.where(out < threshold, torch.zeros_like(out), out)
    if is_np:
        res = out.numpy()
        return res[0] if np.asarray(X).ndim == 1 else res
    return out[0] if X.ndim == 1 else out
