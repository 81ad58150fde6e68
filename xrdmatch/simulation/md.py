"""Input checks, supercell, optional pre-relaxation and checkpointed NVT MD through ASE.

One temperature = one folder ``<workdir>/<T>K/`` holding ``md.traj`` (an ``ase.io.Trajectory``,
one frame every ``traj_interval`` steps, frame 0 = the start) and ``state.json`` (written
atomically). A killed run resumes from the last frame of the trajectory (positions, momenta;
the step is the frame count) and appends; a finished temperature is skipped. The thermostat's
own state (Nose-Hoover chain variables, Langevin generator) is saved in ``state.json`` with every
frame and restored, so a resumed run continues the trajectory an uninterrupted one makes (the
same frames and verdict, with a calculator that keeps no state between calls, such as CHGNet).
A frame written without its state (a kill between the two) is computed again. A checkpoint
without a state for its last frame (a run by an older version, a trajectory that lost frames)
restarts the thermostat: still a valid NVT sample, not the same one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from xrdmatch.config import ValidationConfig

log = logging.getLogger(__name__)

Progress = Callable[[float, int, int], None]
Heartbeat = Callable[[], None]


class ValidationInputError(ValueError):
    """A structure that cannot be validated (no Li, atoms too close, cannot be ordered, too big)."""


class MDFailure(RuntimeError):
    """The MD itself went wrong (cell exploded, NaN energies): an inconclusive verdict, not a crash."""


# ---------------------------------------------------------------- input


def _guess_charges(structure) -> bool:
    """Decorate ``structure`` with pymatgen's guessed oxidation states (for the Ewald ranking of
    orderings); False, and left undecorated, when there is no charge-balanced guess."""
    try:
        structure.add_oxidation_state_by_guess(max_sites=-1)  # -1: guess on the reduced composition
    except Exception:  # noqa: BLE001 - fractional amounts, or no balanced guess
        return False
    if any(getattr(sp, "oxi_state", None) is None for sp in structure.composition):
        structure.remove_oxidation_states()
        return False
    return True


def order_structure(structure, max_sites: int):
    """Return an ordered structure; order a disordered one with pymatgen (Ewald ranking).

    Partial occupancies need a supercell in which every site count is an integer, so diagonal
    supercells of growing size (any factor per axis) are tried until the transformation succeeds
    or ``max_sites`` is hit; a cell whose composition cannot be integral is skipped before
    pymatgen enumerates its orderings.
    """
    if structure.is_ordered:
        return structure, None
    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation

    s = structure.copy()
    charged = _guess_charges(s)  # a fractional unit-cell composition has no guess; its supercells may
    amounts = list(s.composition.element_composition.values())
    k = max_sites // len(s)  # the largest cell volume (in unit cells) within max_sites
    scalings = sorted(
        ((a, b, c) for a in range(1, k + 1) for b in range(1, k // a + 1) for c in range(1, k // (a * b) + 1)),
        key=lambda m: (m[0] * m[1] * m[2], max(m) - min(m)),
    )
    last_err = "no supercell small enough"
    for m in scalings:
        n = m[0] * m[1] * m[2]
        if any(abs(x * n - round(x * n)) > 1e-3 for x in amounts):  # its composition cannot be integral:
            last_err = f"occupancies not integral in a {m[0]}x{m[1]}x{m[2]} cell"  # skip the enumeration
            continue
        big = s * m
        trans = OrderDisorderedStructureTransformation(no_oxi_states=not (charged or _guess_charges(big)))
        try:
            ordered = trans.apply_transformation(big)
        except Exception as err:  # noqa: BLE001 - non-integral occupancies in this supercell: try a bigger one
            last_err = f"{type(err).__name__}: {err}"
            continue
        # The transformation rounds occupancies (occ_tol); a rounded composition is not the input.
        if any(abs(ordered.composition[el] - amt) > 1e-3 for el, amt in big.composition.element_composition.items()):
            last_err = f"occupancies not integral in a {m[0]}x{m[1]}x{m[2]} cell"
            continue
        ordered.remove_oxidation_states()
        return ordered, f"ordered with OrderDisorderedStructureTransformation in a {m[0]}x{m[1]}x{m[2]} cell"
    raise ValidationInputError(
        f"disordered structure {structure.composition.reduced_formula} cannot be ordered within "
        f"max_order_sites={max_sites} sites ({last_err})"
    )


def check_structure(structure, min_distance: float) -> None:
    """Refuse a structure before MD: no Li, Li only, or two atoms (periodic images included) too close."""
    check_composition(structure)
    check_distances(structure, min_distance)


def check_composition(structure) -> None:
    """Refuse a structure without Li, or of Li only (the drift correction and the melting check
    need host atoms)."""
    elements = {el.symbol for el in structure.composition.elements}
    if "Li" not in elements:
        raise ValidationInputError(f"structure {structure.composition.reduced_formula} contains no Li")
    if elements == {"Li"}:
        raise ValidationInputError(f"structure {structure.composition.reduced_formula} is Li only: "
                                   "no host framework to measure Li diffusion against")


def check_distances(structure, min_distance: float, name: str | None = None) -> None:
    """Refuse two sites (periodic images included) closer than ``min_distance``."""
    centers, _points, _images, dists = structure.get_neighbor_list(r=min_distance, exclude_self=True)
    if len(dists):
        k = int(np.argmin(dists))
        i = int(centers[k])
        raise ValidationInputError(
            f"atoms too close in {name or structure.composition.reduced_formula}: {structure[i].species_string} "
            f"site {i} has a neighbour at {float(dists[k]):.3f} A < min_distance={min_distance} A"
        )


def choose_supercell(abc, n_sites: int, min_atoms: int, min_length: float, max_atoms: int) -> tuple[int, int, int]:
    """Smallest diagonal scaling with every length >= min_length and >= min_atoms atoms, among
    those that repeat each axis at most 5 times beyond what min_length needs.

    The bound keeps needles out: (7, 1, 1) of a 9 A cell is a 63 A rod whose image distance is
    still 9 A. Ties (same atom count) go to the most isotropic cell (largest shortest length).
    """
    base = [max(1, math.ceil(min_length / L - 1e-9)) if min_length > 0 else 1 for L in abc]
    best = None
    for extra in product(range(0, 6), repeat=3):
        m = tuple(b + e for b, e in zip(base, extra, strict=True))
        n = n_sites * m[0] * m[1] * m[2]
        if n < min_atoms:
            continue
        key = (n, -min(L * k for L, k in zip(abc, m, strict=True)))
        if best is None or key < best[0]:
            best = (key, m)
    if best is None or best[0][0] > max_atoms:
        need = best[0][0] if best else "too many"
        raise ValidationInputError(
            f"supercell would need {need} atoms (> max_atoms={max_atoms}) for min_atoms={min_atoms}, "
            f"min_length={min_length} A from a {n_sites}-site cell"
        )
    return best[1]


@dataclass
class PreparedInput:
    atoms: Any  # ase.Atoms of the supercell
    structure: Any  # pymatgen Structure of the supercell
    scaling: tuple[int, int, int]
    note: str | None


@contextlib.contextmanager
def beating(heartbeat: Heartbeat | None, every_s: float = 1.0):
    """Call ``heartbeat`` from a thread while one long call blocks (ordering a disordered cell
    can take minutes), so the job's lease is renewed meanwhile. What the heartbeat raises (a
    lost lease) is raised here when the call returns."""
    if heartbeat is None:
        yield
        return
    stop, raised = threading.Event(), []

    def beat():
        while not stop.wait(every_s):
            try:
                heartbeat()
            except BaseException as err:  # noqa: BLE001 - handed to the calling thread
                raised.append(err)
                return

    t = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    if raised:
        raise raised[0]


def prepare(structure, cfg: ValidationConfig) -> PreparedInput:
    """Order, check, build the supercell; raise ValidationInputError with the reason."""
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if not isinstance(structure, Structure):
        try:
            structure = AseAtomsAdaptor.get_structure(structure)
        except Exception as err:  # noqa: BLE001
            raise ValidationInputError(f"not a structure: {type(structure).__name__} ({err})") from None
    if len(structure) == 0:
        raise ValidationInputError("empty structure")
    if "Li" not in {el.symbol for el in structure.composition.elements}:
        raise ValidationInputError(f"structure {structure.composition.reduced_formula} contains no Li")
    ordered, note = order_structure(structure, cfg.max_order_sites)
    check_structure(ordered, cfg.min_distance)
    m = choose_supercell(ordered.lattice.abc, len(ordered), cfg.min_atoms, cfg.min_length, cfg.max_atoms)
    sc = ordered * m
    atoms = AseAtomsAdaptor.get_atoms(sc)
    atoms.set_initial_charges(None)
    atoms.set_initial_magnetic_moments(None)
    return PreparedInput(atoms=atoms, structure=sc, scaling=m, note=note)


# ---------------------------------------------------------------- files


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_frames(path: Path) -> list:
    """All readable frames of a trajectory (a frame cut by a kill -9 is not readable and is dropped)."""
    from ase.io import Trajectory

    if not path.exists() or path.stat().st_size == 0:
        return []
    frames = []
    try:
        with Trajectory(str(path), "r") as traj:
            for i in range(len(traj)):
                try:
                    frames.append(traj[i])
                except Exception:  # noqa: BLE001 - truncated tail
                    break
    except Exception:  # noqa: BLE001 - unreadable header: nothing to resume from
        return []
    return frames


def temperature_dir(workdir: Path, temperature: float) -> Path:
    return Path(workdir) / f"{temperature:g}K"


# ---------------------------------------------------------------- relax


def relax(atoms, calc, cfg: ValidationConfig, workdir: Path, protocol: str = "", heartbeat=None):
    """Fixed-cell pre-relaxation (ase.optimize), checkpointed as workdir/relaxed-<protocol>.traj.

    The checkpoint is named by the protocol so that a workdir used by another protocol is
    relaxed again, never reused; ``heartbeat`` is called after every optimizer step, since a
    relaxation of a large cell can outlast a queue lease.
    """
    from ase.io import read, write
    from ase.optimize import BFGS, FIRE

    out = Path(workdir) / (f"relaxed-{protocol}.traj" if protocol else "relaxed.traj")
    if out.exists():
        relaxed = read(str(out))
        relaxed.calc = calc
        return relaxed
    atoms = atoms.copy()
    atoms.calc = calc
    opt = (FIRE if cfg.relax_optimizer == "FIRE" else BFGS)(atoms, logfile=None)
    if heartbeat is not None:
        heartbeat()
        opt.attach(heartbeat, interval=1)
    opt.run(fmax=cfg.relax_fmax, steps=cfg.relax_steps)
    tmp = out.with_name(f"{out.stem}.tmp.traj")
    write(str(tmp), atoms)
    os.replace(tmp, out)
    return atoms


# ---------------------------------------------------------------- MD


def _thermostat(atoms, cfg: ValidationConfig, temperature: float, seed_key: tuple[int, ...]):
    from ase import units

    dt = cfg.timestep_fs * units.fs
    tau = cfg.thermostat_time_fs * units.fs
    if cfg.thermostat == "nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature, tdamp=tau)
    if cfg.thermostat == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(
            atoms, timestep=dt, temperature_K=temperature, friction=1.0 / tau, fixcm=False,
            rng=np.random.default_rng(seed_key)
        )
    from ase.md.nvtberendsen import NVTBerendsen

    return NVTBerendsen(atoms, timestep=dt, temperature_K=temperature, taut=tau)


def thermostat_state(dyn) -> dict[str, Any]:
    """What the thermostat carries besides positions and momenta: the Nose-Hoover chain's
    variables or the Langevin generator's state (ASE keeps the chain's private: a version that
    renames them gives only the kind, and resumes restart the chain)."""
    nhc = getattr(dyn, "_thermostat", None)
    eta, p_eta = getattr(nhc, "_eta", None), getattr(nhc, "_p_eta", None)
    if isinstance(eta, np.ndarray) and isinstance(p_eta, np.ndarray):
        return {"kind": "nose-hoover", "eta": eta.tolist(), "p_eta": p_eta.tolist()}
    rng = getattr(dyn, "rng", None)
    if isinstance(rng, np.random.Generator):
        return {"kind": "langevin", "rng": rng.bit_generator.state}
    return {"kind": type(dyn).__name__}


_STATELESS = ("NVTBerendsen",)  # thermostats with nothing to carry between steps


def restore_thermostat(dyn, saved: dict[str, Any]) -> bool:
    """Put a ``thermostat_state`` back; False when it does not fit this thermostat."""
    kind = thermostat_state(dyn)["kind"]
    if saved.get("kind") != kind:
        return False
    if kind == "nose-hoover":
        nhc = dyn._thermostat
        eta, p_eta = np.asarray(saved["eta"], float), np.asarray(saved["p_eta"], float)
        if eta.shape != nhc._eta.shape or p_eta.shape != nhc._p_eta.shape:
            return False
        nhc._eta, nhc._p_eta = eta, p_eta
        return True
    if kind == "langevin":
        dyn.rng.bit_generator.state = saved["rng"]
        return True
    return kind in _STATELESS


def frame_counts(cfg: ValidationConfig) -> tuple[int, int]:
    """(equilibration frames, production frames); step counts are rounded up to traj_interval."""
    k = cfg.traj_interval
    return math.ceil(cfg.equilibration_steps / k), math.ceil(cfg.production_steps / k)


@dataclass
class TemperatureRun:
    temperature: float
    traj_path: Path
    done: bool
    failed: str | None  # reason the MD was aborted (exploded / NaN), None if fine
    n_frames: int
    md_seconds: float
    steps_computed: int  # MD steps computed by this call (0 if skipped)


def check_frame(atoms, temperature: float, cfg: ValidationConfig, step: int) -> None:
    """Raise MDFailure for a frame no physical run makes: non-finite, exploded or collapsed."""
    from ase.neighborlist import neighbor_list

    if not np.all(np.isfinite(atoms.positions)):  # before the calculator: some raise on them
        raise MDFailure(f"non-finite positions at step {step} ({temperature:g} K)")
    e = atoms.get_potential_energy()
    t_inst = atoms.get_temperature()
    if not (np.isfinite(e) and np.isfinite(t_inst)):
        raise MDFailure(f"non-finite energy/velocities at step {step} ({temperature:g} K)")
    if t_inst > cfg.explode_temperature_factor * temperature:
        raise MDFailure(f"cell exploded at {temperature:g} K: instantaneous T {t_inst:.0f} K at step {step}")
    d = neighbor_list("d", atoms, 0.5 * cfg.min_distance)
    if len(d):
        raise MDFailure(f"atoms collapsed at {temperature:g} K: distance {float(d.min()):.2f} A at step {step}")


def run_temperature(
    atoms0,
    calc,
    temperature: float,
    cfg: ValidationConfig,
    tdir: Path,
    protocol: str,
    progress: Progress | None = None,
    heartbeat: Heartbeat | None = None,
) -> TemperatureRun:
    """NVT MD at one temperature, resuming from ``tdir/md.traj``; idempotent once done."""
    from ase.io import Trajectory
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    tdir = Path(tdir)
    tdir.mkdir(parents=True, exist_ok=True)
    state_path, traj_path = tdir / "state.json", tdir / "md.traj"
    eq_f, prod_f = frame_counts(cfg)
    k = cfg.traj_interval
    total_steps = (eq_f + prod_f) * k
    state = read_json(state_path)
    held = _first_symbols(traj_path)
    if (state is not None and state.get("protocol") != protocol) or held not in (None, atoms0.get_chemical_symbols()):
        # Another protocol's trajectory, or another structure's: its frames are not this run's; start over.
        for p in (traj_path, state_path):
            p.unlink(missing_ok=True)
        state = None
    if state is not None and state.get("status") in ("done", "failed"):
        n = len(read_frames(traj_path)) if state["status"] == "done" else int(state.get("frames", 0))
        if state["status"] == "failed" or n == eq_f + prod_f + 1:
            return TemperatureRun(
                temperature, traj_path, state["status"] == "done", state.get("reason"), n, float(state.get("md_seconds", 0.0)), 0
            )

    frames = read_frames(traj_path)
    saved = (state or {}).get("thermostat")
    saved_at = int(state.get("frames", -1)) if saved is not None else -1  # frames written when it was saved
    if frames and saved_at == len(frames) - 1:
        frames = frames[:-1]  # killed between a frame and its state: recompute that frame, identically
    md_seconds = float(state.get("md_seconds", 0.0)) if state else 0.0
    if frames:
        atoms = frames[-1].copy()
        atoms.set_momenta(frames[-1].get_momenta())
        start = (len(frames) - 1) * k
        _rewrite_if_tail_bad(traj_path, frames)
    else:
        traj_path.unlink(missing_ok=True)
        atoms = atoms0.copy()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng([cfg.seed, int(temperature)]))
        Stationary(atoms)
        start = 0
    atoms.calc = calc
    n_frames = len(frames)
    dyn = _thermostat(atoms, cfg, temperature, (cfg.seed, int(temperature), start))
    dyn.nsteps = start  # observers fire on nsteps % interval == 0, and not again for the resumed frame
    if frames and not (saved_at == n_frames and restore_thermostat(dyn, saved)):
        log.warning("%s: the thermostat restarts at frame %d (no saved state for that frame): the run "
                    "goes on as a valid NVT sample, not the one an uninterrupted run makes", tdir, n_frames - 1)

    def save_state(status: str, reason: str | None = None) -> None:
        write_json_atomic(
            state_path,
            {
                "protocol": protocol,
                "temperature": temperature,
                "status": status,
                "reason": reason,
                "frames": n_frames,
                "step": (n_frames - 1) * k if n_frames else 0,
                "total_steps": total_steps,
                "equilibration_frames": eq_f,
                "production_frames": prod_f,
                "traj_interval": k,
                "timestep_fs": cfg.timestep_fs,
                "md_seconds": md_seconds,
                "thermostat": thermostat_state(dyn),  # of the last frame: a resume continues from both
            },
        )

    save_state("running")
    if start >= total_steps:
        save_state("done")
        return TemperatureRun(temperature, traj_path, True, None, n_frames, md_seconds, 0)

    t0 = time.monotonic()
    last_beat = [t0]

    traj = Trajectory(str(traj_path), "a" if n_frames else "w", atoms)

    def check_and_write() -> None:
        nonlocal n_frames, md_seconds
        check_frame(atoms, temperature, cfg, dyn.nsteps)
        traj.write(atoms)
        n_frames += 1
        md_seconds += time.monotonic() - last_frame[0]
        last_frame[0] = time.monotonic()
        save_state("running")
        if progress is not None:
            progress(temperature, dyn.nsteps, total_steps)

    def beat() -> None:
        now = time.monotonic()
        if heartbeat is not None and now - last_beat[0] >= cfg.heartbeat_s / 2:
            last_beat[0] = now
            heartbeat()

    last_frame = [t0]
    if heartbeat is not None:
        heartbeat()
    try:
        # A fresh run (nsteps == 0) writes frame 0, the starting configuration, through the observer.
        dyn.attach(check_and_write, interval=k)
        dyn.attach(beat, interval=1)
        dyn.run(total_steps - start)
    except Exception as err:
        if not isinstance(err, MDFailure):
            if np.all(np.isfinite(atoms.positions)):
                raise  # an error of the calculator or of ours: the worker records it and retries the job
            # NaN forces moved the atoms to NaN, and the calculator raised on them inside step nsteps + 1
            err = MDFailure(f"non-finite positions at step {dyn.nsteps + 1} ({temperature:g} K); the "
                            f"calculator said: {type(err).__name__}: {err}")
        traj.close()
        save_state("failed", str(err))
        return TemperatureRun(temperature, traj_path, False, str(err), n_frames, md_seconds, dyn.nsteps - start)
    traj.close()
    save_state("done")
    return TemperatureRun(temperature, traj_path, True, None, n_frames, md_seconds, total_steps - start)


def _first_symbols(path: Path) -> list[str] | None:
    """The atoms of a trajectory's first frame (None: no readable frame)."""
    from ase.io import Trajectory

    try:
        with Trajectory(str(path), "r") as t:
            return t[0].get_chemical_symbols() if len(t) else None
    except Exception:  # noqa: BLE001 - missing or unreadable: nothing to compare
        return None


def _stored_len(path: Path) -> int:
    from ase.io import Trajectory

    try:
        with Trajectory(str(path), "r") as t:
            return len(t)
    except Exception:  # noqa: BLE001
        return 0


def _rewrite_if_tail_bad(path: Path, frames: list) -> None:
    """If the file lists frames that cannot be read (cut by a kill), rewrite it with the good ones."""
    from ase.io import Trajectory

    if _stored_len(path) == len(frames):
        return
    tmp = path.with_name("md.tmp.traj")
    with Trajectory(str(tmp), "w") as t:
        for f in frames:
            t.write(f)
    os.replace(tmp, path)


def production_frames(traj_path: Path, cfg: ValidationConfig) -> list:
    """Frames of the production part (after equilibration), in order."""
    eq_f, _ = frame_counts(cfg)
    return read_frames(traj_path)[eq_f:]
