"""Li trajectories with a known answer, for checking the diffusion analysis and its verdicts.

Generated, not simulated: Li performs a Gaussian random walk of a chosen D (and optionally
rattles in a harmonic cage) on a fixed framework, so the right diffusivity, activation energy
and Nernst-Einstein conductivity are known. Used by tests/test_diffusion.py and by
benchmarks/verdict_reliability.py, which measures how often a protocol's verdicts are wrong.
"""

from __future__ import annotations

import math

import numpy as np

KB_EV = 8.617333262e-5  # eV/K


def host(n_li: int = 32):
    """``n_li`` (<= 32) Li + 32 S on a 10 A cubic cell (a simple-cubic grid of 64 sites)."""
    from pymatgen.core import Lattice, Structure

    if not 1 <= n_li <= 32:
        raise ValueError(f"n_li={n_li}: the host holds 1 to 32 Li")
    g = (np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.25) / 4
    return Structure(Lattice.cubic(10.0), ["Li"] * n_li + ["S"] * 32, np.vstack([g[::2][:n_li], g[1::2]]))


def arrhenius_d(ea_ev: float, d0: float, temperature: float) -> float:
    """D(T) = D0 exp(-Ea / kT), in D0's units."""
    return d0 * math.exp(-ea_ev / (KB_EV * temperature))


def _frames(structure, positions: np.ndarray) -> list:
    from ase import Atoms

    symbols = [sp.symbol for sp in structure.species]
    return [Atoms(symbols=symbols, positions=p, cell=structure.lattice.matrix, pbc=True) for p in positions]


def random_walk(structure, d_cm2s: float, n_frames: int, frame_fs: float, seed: int,
                framework_d: float = 0.0) -> list:
    """ASE frames of a Gaussian random walk: Li with diffusivity ``d_cm2s``, the framework with
    ``framework_d`` (cm^2/s; 1 cm^2/s = 10 A^2/fs)."""
    rng = np.random.default_rng(seed)
    n = len(structure)
    sd = np.array([math.sqrt(2 * 10 * (d_cm2s if sp.symbol == "Li" else framework_d) * frame_fs)
                   for sp in structure.species])
    steps = rng.normal(size=(n_frames - 1, n, 3)) * sd[None, :, None]
    pos = structure.cart_coords[None] + np.concatenate([np.zeros((1, n, 3)), np.cumsum(steps, axis=0)])
    return _frames(structure, pos)


def caged_walk(structure, temperature: float, n_frames: int, frame_fs: float, seed: int,
               d_cm2s: float = 0.0, plateau_1200: float = 1.8, correlation_fs: float = 40.0) -> list:
    """ASE frames of Li rattling in a harmonic cage (an Ornstein-Uhlenbeck process whose MSD
    plateau, ``plateau_1200`` A^2 at 1200 K, grows with T) plus a random walk of ``d_cm2s``:
    what MLIP-MD shows of Li on a sub-picosecond run. The framework stays put."""
    rng = np.random.default_rng(seed)
    li = np.array([sp.symbol == "Li" for sp in structure.species])
    sd = math.sqrt(plateau_1200 * temperature / 1200 / 6)  # per dimension; plateau = 6 sd^2
    a = math.exp(-frame_fs / correlation_fs)
    x = np.zeros((n_frames, len(structure), 3))
    x[0] = rng.normal(size=(len(structure), 3)) * sd
    for k in range(1, n_frames):
        x[k] = a * x[k - 1] + math.sqrt(1 - a * a) * sd * rng.normal(size=(len(structure), 3))
    step = math.sqrt(2 * 10 * d_cm2s * frame_fs)
    x[1:] += np.cumsum(rng.normal(size=(n_frames - 1, len(structure), 3)) * step, axis=0)
    return _frames(structure, structure.cart_coords[None] + x * li[None, :, None])
