"""Weak and strong augmentations of preprocessed XRD patterns, batched in torch.

Patterns are sparse (median ~120 non-zero bins of 4501), so every operation works on a
padded peak list per pattern -- positions ``pos`` (B, K), heights ``h`` (B, K), ``ok`` (B, K)
-- instead of the dense (B, 4501) array: one pass converts in, one scatter converts out, and
all the work in between is on (B, K) index tensors (no Python loop over samples). All
randomness comes from the ``torch.Generator`` passed in (deterministic for a seeded one).
A "peak" is a non-zero bin of the preprocessed pattern. Outputs are min-max renormalised
(max 1, or all zeros for an all-zero input, never NaN).

Weak (labelled and unlabelled): noise peaks into empty bins; shift by w_move_min..w_move_gap
bins left or right, zero-filled (the authors' code only ever shifts right; we use both
directions as the paper's text says).
Strong (unlabelled): scale up to s_scale_frac of the peaks by U[1, s_scale_max]; delete up to
s_delete_frac of the peaks; cut out or insert up to s_gap_max zero bins inside a random gap
between two consecutive peaks; noise peaks (the authors' code sets the strong noise ratio to 0;
ours is ``s_noise_frac``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xrdmatch.config import AugmentConfig


@dataclass
class Peaks:
    """Padded peak lists of a batch: row b holds peaks pos[b, ok[b]] with heights h[b, ok[b]]."""

    pos: torch.Tensor  # long (B, K)
    h: torch.Tensor  # float (B, K)
    ok: torch.Tensor  # bool (B, K)
    n_bins: int

    def count(self) -> torch.Tensor:
        return self.ok.sum(1, keepdim=True)

    def take(self, idx: torch.Tensor) -> "Peaks":
        """Rows ``idx`` (a batch drawn from a pool converted once with :func:`to_peaks`)."""
        return Peaks(self.pos[idx], self.h[idx], self.ok[idx], self.n_bins)

    def to(self, device) -> "Peaks":
        return Peaks(self.pos.to(device), self.h.to(device), self.ok.to(device), self.n_bins)


def to_peaks(x: torch.Tensor) -> Peaks:
    """Dense (B, L) -> padded peak lists, positions ascending within each row."""
    B, L = x.shape
    rows, cols = (x > 0).nonzero(as_tuple=True)  # row-major: sorted by row, then column
    counts = torch.bincount(rows, minlength=B)
    K = max(int(counts.max()) if B else 0, 1)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=x.device) - first[rows]
    pos = torch.full((B, K), L, dtype=torch.long, device=x.device)
    h = torch.zeros((B, K), dtype=x.dtype, device=x.device)
    pos[rows, slot] = cols
    h[rows, slot] = x[rows, cols]
    return Peaks(pos, h, pos < L, L)


def cat_peaks(a: Peaks, b: Peaks) -> Peaks:
    """Rows of ``a`` then rows of ``b`` in one batch (padded to the longer peak list), so that
    one augmentation call serves both: on a CPU the cost is per call, not per row."""
    K = max(a.pos.shape[1], b.pos.shape[1])

    def pad(p: Peaks) -> Peaks:
        extra = K - p.pos.shape[1]
        if extra == 0:
            return p
        f = torch.nn.functional.pad
        return Peaks(f(p.pos, (0, extra), value=p.n_bins), f(p.h, (0, extra)), f(p.ok, (0, extra)), p.n_bins)

    a, b = pad(a), pad(b)
    return Peaks(torch.cat([a.pos, b.pos]), torch.cat([a.h, b.h]), torch.cat([a.ok, b.ok]), a.n_bins)


def to_dense(p: Peaks, out: torch.Tensor | None = None, normalise: bool = True) -> torch.Tensor:
    """Padded peak lists -> dense (B, L), min-max renormalised per row (unless ``normalise=False``).

    ``out``: a (B, L) buffer to fill (the trainer reuses one per step: a fresh 4501-wide
    allocation page-faults on every step and would cost more than the augmentation itself).
    """
    B, K = p.pos.shape
    h = torch.where(p.ok, p.h, 0.0)  # heights are >= 0, so 0 is neutral for max and scatter-amax
    if normalise:
        hmax = h.amax(1, keepdim=True)
        if K >= p.n_bins:  # only a row without any empty bin has a non-zero minimum
            full = p.count() >= p.n_bins
            hmin = torch.where(full, torch.where(p.ok, p.h, math.inf).amin(1, keepdim=True), 0.0)
            h = torch.where(p.ok, (p.h - hmin) / (hmax - hmin).clamp_min(1e-12), 0.0)
        else:  # min is 0 in every row: one division (an all-zero row stays 0 / 1e-12 = 0)
            h = h / hmax.clamp_min(1e-12)
    out = torch.zeros((B, p.n_bins), dtype=p.h.dtype, device=p.h.device) if out is None else out.zero_()
    # one scatter for every slot: invalid slots write 0 into bin 0 (a no-op under amax)
    out.scatter_reduce_(1, torch.where(p.ok, p.pos, 0), h if h.dtype == out.dtype else h.to(out.dtype), "amax")
    return out


def _u(shape, ref: torch.Tensor, gen) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=ref.device, dtype=torch.float32)


def _coin(p: Peaks, prob: float, gen) -> torch.Tensor:
    """(B, 1) bool: which samples get an operation applied."""
    return _u((p.pos.shape[0], 1), p.h, gen) < prob


def _pick_fraction(p: Peaks, frac: float, gen, count: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly floor(n_b * U_b * frac) random peaks of each row (U_b ~ U[0, 1), as the paper)."""
    K = p.pos.shape[1]
    k = torch.floor((p.count() if count is None else count) * _u((p.pos.shape[0], 1), p.h, gen) * frac).long()
    keys = torch.where(p.ok, _u(p.pos.shape, p.h, gen), 2.0)
    # the k smallest keys of a row: below its (k+1)-th smallest key (one sort, no rank argsorts)
    ranked = keys.sort(1).values
    if frac * K > K - 1:  # k can reach K (all peaks): a sentinel above every key
        ranked = torch.nn.functional.pad(ranked, (0, 1), value=3.0)
    return p.ok & (keys < ranked.gather(1, k))


def scale_peaks(p: Peaks, apply: torch.Tensor, frac: float, max_factor: float, gen,
                count: torch.Tensor | None = None) -> Peaks:
    sel = apply & _pick_fraction(p, frac, gen, count)
    factor = 1.0 + (max_factor - 1.0) * _u(p.h.shape, p.h, gen)
    return Peaks(p.pos, torch.where(sel, p.h * factor, p.h), p.ok, p.n_bins)


def delete_peaks(p: Peaks, apply: torch.Tensor, frac: float, gen, count: torch.Tensor | None = None) -> Peaks:
    sel = apply & _pick_fraction(p, frac, gen, count)  # a subset of ok: xor removes it
    return Peaks(p.pos, p.h, p.ok ^ sel, p.n_bins)


def shift(p: Peaks, apply: torch.Tensor, lo: int, hi: int, gen) -> Peaks:
    """Shift each selected row by s in [lo, hi] bins (random sign); peaks leaving the range drop."""
    B = p.pos.shape[0]
    s = torch.randint(lo, max(hi, lo) + 1, (B, 1), generator=gen, device=p.pos.device)
    s = torch.where(apply, torch.where(_u((B, 1), p.h, gen) < 0.5, -s, s), 0)
    pos = p.pos + s
    return Peaks(pos, p.h, p.ok & (pos >= 0) & (pos < p.n_bins), p.n_bins)


def gap(p: Peaks, apply: torch.Tensor, max_gap: int, gen) -> Peaks:
    """Cut out or insert n <= max_gap zero bins inside one random gap between consecutive peaks.

    Cut: n = min(draw, zeros in the gap); the peaks after it move left by n. Insert: n =
    min(draw, trailing zeros) so no peak falls off the end; the peaks after it move right.
    Rows without a gap between two peaks are unchanged.
    """
    L = p.n_bins
    # compact: valid peaks first, ascending (their positions are distinct), empty slots at L
    pos, order = torch.where(p.ok, p.pos, L).sort(1)
    h, ok = p.h.gather(1, order), pos < L
    B, K = pos.shape
    if K < 2:
        return Peaks(pos, h, ok, L)
    zeros_between = torch.diff(pos, dim=1) - 1  # (B, K-1)
    cand = ok[:, 1:] & (zeros_between > 0)  # ok is a prefix of each row: ok[:, 1:] implies ok[:, :-1]
    keys = torch.where(cand, _u(cand.shape, h, gen), -1.0)
    best, j = keys.max(1, keepdim=True)
    do = apply & (best >= 0)
    start = pos.gather(1, j) + 1  # first zero bin of the chosen gap
    z = zeros_between.gather(1, j)
    last = torch.where(ok, pos, -1).amax(1, keepdim=True)
    draw = torch.randint(1, max(max_gap, 1) + 1, (B, 1), generator=gen, device=pos.device)
    insert = _u((B, 1), h, gen) < 0.5
    n = torch.where(do, torch.where(insert, torch.minimum(draw, L - 1 - last), -torch.minimum(draw, z)), 0)
    return Peaks(torch.where(pos >= start, pos + n, pos), h, ok, L)


def add_noise(p: Peaks, apply: torch.Tensor, frac: float, peak: float, gen) -> Peaks:
    """Noise of height U(0, peak] into floor(U * frac * empty bins) random empty bins per row.

    Needs positions non-decreasing along each row (every operation here keeps them so, except
    this one, which is why it comes first in the weak and last in the strong augmentation).
    """
    B, K = p.pos.shape
    L = p.n_bins
    kmax = math.ceil(frac * L)
    if kmax == 0:
        return p
    count = p.count()
    n = torch.floor((L - count) * _u((B, 1), p.h, gen) * frac)
    live = apply & (count > 0)  # an all-zero (padding) row stays all zero
    cand = torch.randint(0, L, (B, kmax), generator=gen, device=p.pos.device)
    heights = (1.0 - _u((B, kmax), p.h, gen)) * peak
    # never on an existing peak: look each candidate up in the row's sorted positions
    at = torch.searchsorted(p.pos, cand).clamp_max_(K - 1)
    taken = (p.pos.gather(1, at) == cand) & p.ok.gather(1, at)
    new_ok = (torch.arange(kmax, device=p.pos.device) < n) & live & ~taken
    return Peaks(torch.cat([p.pos, cand], 1), torch.cat([p.h, heights.to(p.h.dtype)], 1),
                 torch.cat([p.ok, new_ok], 1), L)


def _as_peaks(x: torch.Tensor | Peaks) -> Peaks:
    return x if isinstance(x, Peaks) else to_peaks(x.float())


def weak_augment(x: torch.Tensor | Peaks, cfg: AugmentConfig, gen: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Noise peaks (p=w_noise_prob) then a zero-filled shift (p=w_move_prob); renormalised.

    ``x``: dense (B, L) patterns or their :class:`Peaks` (the trainer converts its pools once).
    """
    p = _as_peaks(x)
    p = add_noise(p, _coin(p, cfg.w_noise_prob, gen), cfg.w_noise_frac, cfg.w_noise_peak, gen)
    p = shift(p, _coin(p, cfg.w_move_prob, gen), cfg.w_move_min, cfg.w_move_gap, gen)
    return to_dense(p, out)


def strong_augment(x: torch.Tensor | Peaks, cfg: AugmentConfig, gen: torch.Generator | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Scale peaks, delete peaks, cut/insert a gap, noise peaks (each with its p); renormalised."""
    p = _as_peaks(x)
    count = p.count()  # scaling keeps every peak: both picks draw from the same count
    p = scale_peaks(p, _coin(p, cfg.s_scale_prob, gen), cfg.s_scale_frac, cfg.s_scale_max, gen, count)
    p = delete_peaks(p, _coin(p, cfg.s_delete_prob, gen), cfg.s_delete_frac, gen, count)
    p = gap(p, _coin(p, cfg.s_gap_prob, gen), cfg.s_gap_max, gen)
    p = add_noise(p, _coin(p, cfg.s_noise_prob, gen), cfg.s_noise_frac, cfg.s_noise_peak, gen)
    return to_dense(p, out)
