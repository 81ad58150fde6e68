"""MD validation: input checks, calculators, thermostats and kill -9 resume (real CHGNet, tiny cells)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chgnet")

from pymatgen.core import Composition, Lattice, Structure  # noqa: E402
from pymatgen.io.ase import AseAtomsAdaptor  # noqa: E402

from xrdmatch.config import ValidationConfig  # noqa: E402
from xrdmatch.simulation.md import choose_supercell, read_frames, run_temperature  # noqa: E402
from xrdmatch.simulation.validate import (  # noqa: E402
    CalculatorUnavailable,
    ValidationInputError,
    protocol_hash,
    run_validation,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")


def li2o(a: float = 4.61) -> Structure:
    """Antifluorite Li2O, 12 atoms in the conventional cell."""
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])


def tiny_cfg(**kw) -> ValidationConfig:
    base = dict(
        temperatures=[1000.0, 1400.0],
        equilibration_steps=4,
        production_steps=20,
        traj_interval=2,
        min_atoms=1,
        min_length=4.0,
        torch_threads=1,
        msd_fit_start_fs=0.0,  # tens of fs of MD: machinery, not physics
    )
    base.update(kw)
    return ValidationConfig(**base)


# ------------------------------------------------------------------ supercell and input


def test_choose_supercell_smallest_diagonal():
    # 4 x 4 x 8 A cell with 6 sites: lengths >= 8 needs 2x2x1 (24 atoms); 50 atoms needs more.
    assert choose_supercell((4.0, 4.0, 8.0), 6, 1, 8.0, 1000) == (2, 2, 1)
    m = choose_supercell((4.0, 4.0, 8.0), 6, 50, 8.0, 1000)
    assert 6 * np.prod(m) >= 50 and all(L * k >= 8.0 for L, k in zip((4, 4, 8), m))
    assert m == (3, 3, 1)  # 54 atoms: the smallest count reaching 50 (3x2x2 would be 72)
    with pytest.raises(ValidationInputError, match="max_atoms"):
        choose_supercell((4.0, 4.0, 4.0), 6, 50, 8.0, 40)


def test_bad_inputs_are_refused_with_reason(tmp_path):
    cfg = tiny_cfg()
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValidationInputError, match="no Li"):
        run_validation(nacl, cfg, tmp_path / "a", "nacl")
    li_metal = Structure(Lattice.cubic(3.5), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValidationInputError, match="Li only: no host framework"):
        run_validation(li_metal, cfg, tmp_path / "m", "li-bcc")
    close = Structure(Lattice.cubic(5.0), ["Li", "O"], [[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(ValidationInputError, match="too close.*0.250"):
        run_validation(close, cfg, tmp_path / "b", "close")
    assert not list((tmp_path / "b").glob("*K"))  # refused before any MD


def test_disordered_input_is_ordered_or_refused(tmp_path):
    from xrdmatch.simulation.md import order_structure

    # Rock-salt (Li0.5Na0.5)Cl: orderable in a 2-formula cell.
    dis = Structure(Lattice.cubic(5.4), [{"Li": 0.5, "Na": 0.5}] * 4 + ["Cl"] * 4,
                    [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.5, 0.5, 0.5], [0, 0, 0.5], [0, 0.5, 0], [0.5, 0, 0]])
    ordered, note = order_structure(dis, 64)
    assert ordered.is_ordered and "ordered" in note
    assert ordered.composition.reduced_formula == dis.composition.reduced_formula
    # Occupancy 1/7 needs >= 7 copies of the site: refused under a small site limit.
    odd = Structure(Lattice.cubic(4.0), [{"Li": 1 / 7, "Na": 6 / 7}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValidationInputError, match="cannot be ordered within max_order_sites=8"):
        order_structure(odd, 8)
    # ... and ordered once the limit allows 7 copies: a factor of 7 along one axis (not capped at 4)
    seven, note = order_structure(odd, 14)
    assert seven.composition == Composition("LiNa6Cl7") and "1x1x7" in note
    # Li0.4Na0.6Cl needs a factor 5, found without enumerating the cells whose composition is fractional
    fifths, note = order_structure(Structure(Lattice.cubic(4.0), [{"Li": 0.4, "Na": 0.6}, "Cl"],
                                             [[0, 0, 0], [0.5, 0.5, 0.5]]), 200)
    assert fifths.composition == Composition("Li2Na3Cl5") and "1x1x5" in note


# ------------------------------------------------------------------ calculators


def test_a_worker_builds_only_calculators_it_trusts():
    """A queued protocol is data: its calculator is built if the worker trusts that name (any
    arguments), or if it is the worker's own calculator with the worker's own arguments."""
    from xrdmatch.simulation.calculators import CalculatorUnavailable, check_trusted

    worker = ValidationConfig(calculator="gpaw", calculator_kwargs={"mode": 300})
    ok = [ValidationConfig(calculator="chgnet", calculator_kwargs={"stress_weight": 0.1}),
          ValidationConfig(calculator="chgnet.model.dynamics.CHGNetCalculator"),  # 'chgnet' by class path
          ValidationConfig(calculator="GPAW", calculator_kwargs={"mode": 300})]
    for job in ok:
        check_trusted(job, worker)
    for job, why in ((ValidationConfig(calculator="gpaw", calculator_kwargs={"mode": 300, "txt": "/etc/x"}),
                      "the worker's own calculator is 'gpaw' with other calculator_kwargs"),
                     (ValidationConfig(calculator="ase.calculators.vasp.Vasp", calculator_kwargs={"command": "id"}),
                      "calculator 'ase.calculators.vasp.Vasp' of the job's protocol is not trusted")):
        with pytest.raises(CalculatorUnavailable, match=why):
            check_trusted(job, worker)
    check_trusted(ok[2], ValidationConfig(trusted_calculators=["chgnet", "gpaw"]))  # trusted: any arguments
    # the job's protocol came through JSON: a tuple in the worker's own arguments is the same list
    tupled = ValidationConfig(calculator="gpaw", calculator_kwargs={"kpts": (2, 2, 2)})
    check_trusted(ValidationConfig.model_validate_json(tupled.model_dump_json()), tupled)


def test_unavailable_calculators_say_how_to_install(tmp_path, monkeypatch):
    from xrdmatch.simulation.calculators import get_calculator

    for v in ("ASE_VASP_COMMAND", "VASP_COMMAND", "VASP_SCRIPT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(CalculatorUnavailable, match="ASE_VASP_COMMAND"):
        get_calculator("vasp")
    with pytest.raises(CalculatorUnavailable, match="ASE_VASP_COMMAND"):  # by its class path: the same checks
        get_calculator("ase.calculators.vasp.Vasp", method="aimd")
    with pytest.raises(CalculatorUnavailable, match="pip install notapackage"):
        get_calculator("notapackage.Calc")
    with pytest.raises(CalculatorUnavailable, match="unknown calculator"):
        get_calculator("nonsense")
    # Any ASE calculator by dotted path (a real one: ASE's EMT); the label source of one that is
    # neither a known DFT code nor a known MLIP (EMT is empirical) must be given, never guessed
    with pytest.raises(CalculatorUnavailable, match="set validation.method to 'aimd' or 'mlip-md'"):
        get_calculator("ase.calculators.emt.EMT")
    calc, info = get_calculator("ase.calculators.emt.EMT", method="mlip-md")
    assert type(calc).__name__ == "EMT" and info.method == "mlip-md"
    # a protocol (it can come from a queue row) names a calculator class, never any callable
    with pytest.raises(CalculatorUnavailable, match="not an ASE calculator class"):
        get_calculator("subprocess.Popen", {"args": ["true"]}, method="aimd")
    from xrdmatch.simulation.calculators import label_method

    assert label_method("ase.calculators.vasp") == label_method("gpaw.calculator") == "aimd"
    assert label_method("mace.calculators") == "mlip-md"
    assert label_method("ase.calculators.emt") is label_method("ase.calculators.vasp_like") is None
    with pytest.raises(ValueError, match="method"):
        tiny_cfg(method="mlip")  # a source no weight knows would drop its labels silently
    if not HAVE_GPAW:
        with pytest.raises(CalculatorUnavailable, match=r"pip install .xrdmatch\[gpaw\]"):
            run_validation(li2o(), tiny_cfg(calculator="gpaw"), tmp_path / "g", "li2o")


# GPAW switches numpy to raise on every floating-point error (and wraps np.empty) when it finds
# pytest imported (its debug mode); it runs in a process of its own, as it does in a worker.
HAVE_GPAW = importlib.util.find_spec("gpaw") is not None
GPAW_RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from pymatgen.core import Lattice, Structure
    from xrdmatch.config import ValidationConfig
    from xrdmatch.simulation.md import read_frames
    from xrdmatch.simulation.validate import run_validation
    li2o = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])
    r = run_validation(li2o.get_primitive_structure(), ValidationConfig.model_validate_json(sys.argv[2]),
                       sys.argv[1], "li2o")
    frames = read_frames(Path(sys.argv[1]) / "1000K" / "md.traj")
    last = frames[-1]
    print(json.dumps({**r.to_dict(), "frames": len(frames),
                      "energy": float(last.get_potential_energy()), "fmax": float(np.abs(last.get_forces()).max())}))
    """
)


@pytest.mark.skipif(not HAVE_GPAW, reason="GPAW not installed (optional extra: pip install 'xrdmatch[gpaw]')")
def test_gpaw_tiny_aimd(tmp_path):
    # DFT-MD of primitive Li2O (3 atoms, PW 200 eV, Gamma): a few SCF cycles, not physics
    cfg = tiny_cfg(calculator="gpaw", temperatures=[1000.0], equilibration_steps=0, production_steps=3,
                   traj_interval=1, min_length=0.0, calculator_kwargs={"mode": 200, "kpts": [1, 1, 1]})
    out = subprocess.run([sys.executable, "-c", GPAW_RUNNER, str(tmp_path), cfg.model_dump_json()],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["method"] == "aimd" and r["calculator"] == "gpaw" and r["n_atoms"] == 3
    assert r["temperatures_done"] == [1000.0]
    assert r["frames"] == 4  # steps 0-3 (three MSD lags to analyse), each with its DFT energy and forces stored
    assert np.isfinite(r["energy"]) and r["fmax"] > 0


# ------------------------------------------------------------------ MD


@pytest.mark.parametrize("thermostat", ["langevin", "berendsen"])
def test_thermostats_run_and_label(tmp_path, thermostat):
    relax = thermostat == "berendsen"  # also exercise the fixed-cell pre-relaxation once
    cfg = tiny_cfg(thermostat=thermostat, temperatures=[1200.0], equilibration_steps=0, production_steps=6,
                   relax=relax, relax_steps=3)
    r = run_validation(li2o(), cfg, tmp_path, "li2o")
    assert (tmp_path / f"relaxed-{protocol_hash(cfg)}.traj").exists() == relax
    assert r.calculator == "chgnet" and r.method == "mlip-md" and r.n_atoms == 12
    assert r.temperatures_done == [1200.0]
    assert len(read_frames(tmp_path / "1200K" / "md.traj")) == 4  # frames at steps 0, 2, 4, 6
    json.dumps(r.to_dict())


def test_exploding_cell_is_inconclusive(tmp_path):
    # One Li pushed to 1.28 A from an O passes the input check (> min_distance) but the repulsion
    # heats the 12-atom cell to > 3x the target within two steps: the verdict must say so.
    s = li2o()
    s.translate_sites([4], [-0.09, -0.09, -0.09])
    cfg = tiny_cfg(temperatures=[300.0, 600.0], explode_temperature_factor=3.0)
    r = run_validation(s, cfg, tmp_path, "pushed")
    assert r.verdict == "inconclusive"
    assert "exploded at 300 K" in r.reason
    assert r.temperatures_done == [] and not (tmp_path / "600K").exists()
    state = json.loads((tmp_path / "300K" / "state.json").read_text())
    assert state["status"] == "failed" and "exploded" in state["reason"]
    # Idempotent: the recorded failure is returned again without recomputing.
    r2 = run_validation(s, cfg, tmp_path, "pushed", progress=lambda *a: pytest.fail("recomputed"))
    assert r2.reason == r.reason


class _Stop(Exception):
    pass


def _same_frames(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.positions, y.positions)
                                    and np.array_equal(x.get_momenta(), y.get_momenta()) for x, y in zip(a, b))


@pytest.mark.parametrize("thermostat", ["nose-hoover", "langevin", "berendsen"])
def test_a_resumed_md_makes_the_frames_of_an_uninterrupted_one(tmp_path, thermostat):
    """The thermostat's state is checkpointed with each frame: a run stopped after a frame, and
    one killed between writing a frame and its state (that frame is then computed again),
    continue to the very trajectory of a run never stopped. (CHGNet, which builds its graph
    anew for each call; a calculator that keeps a neighbour list between calls, such as EMT,
    differs in the last bits after a restart however the MD is checkpointed.)"""
    from xrdmatch.simulation.calculators import get_calculator

    atoms = AseAtomsAdaptor.get_atoms(li2o())
    calc, _ = get_calculator("chgnet")
    cfg = tiny_cfg(thermostat=thermostat, equilibration_steps=4, production_steps=12)

    def run(d: Path, stop_at: int | None = None) -> None:
        def progress(T, step, n):
            if step == stop_at:
                raise _Stop
        try:
            run_temperature(atoms, calc, 1200.0, cfg, d, "p", progress=progress)
        except _Stop:
            pass

    run(tmp_path / "ref")
    ref = read_frames(tmp_path / "ref" / "md.traj")
    assert len(ref) == 9 and not _same_frames(ref[:2], ref[1:3])  # it moves

    run(tmp_path / "a", stop_at=6)  # stopped after frame 3 and its state
    assert len(read_frames(tmp_path / "a" / "md.traj")) == 4
    run(tmp_path / "a")
    assert _same_frames(read_frames(tmp_path / "a" / "md.traj"), ref)

    # killed after writing frame 5 but before its state: the state of frame 4 is on disk
    b = tmp_path / "b"
    run(b, stop_at=8)
    state4 = (b / "state.json").read_text()
    run(b, stop_at=10)
    (b / "state.json").write_text(state4)
    assert len(read_frames(b / "md.traj")) == 6 and json.loads(state4)["frames"] == 5
    run(b)
    assert _same_frames(read_frames(b / "md.traj"), ref)


RUNNER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from pymatgen.core import Lattice, Structure
    from xrdmatch.config import ValidationConfig
    from xrdmatch.simulation.validate import run_validation
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])
    cfg = ValidationConfig.model_validate_json(sys.argv[2])
    def progress(T, step, n):
        print(f"P {T} {step}", flush=True)
    run_validation(s, cfg, sys.argv[1], "li2o", progress=progress)
    print("DONE", flush=True)
    """
)


@pytest.mark.timeout(900)
def test_kill9_resumes_from_last_frame(tmp_path):
    cfg = tiny_cfg(production_steps=12)  # 4 + 12 steps per temperature, a frame every 2 steps
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(work), cfg.model_dump_json()],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in proc.stdout:
            parts = line.split()
            if parts and parts[0] == "P" and float(parts[1]) == 1400.0 and int(parts[2]) >= 6:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    hot = work / "1400K" / "md.traj"
    before = read_frames(hot)
    assert 4 <= len(before) < 9
    assert json.loads((work / "1000K" / "state.json").read_text())["status"] == "done"

    calls: list[tuple[float, int]] = []
    beats: list[float] = []
    r = run_validation(li2o(), cfg, work, "li2o", progress=lambda T, s, n: calls.append((T, s)),
                       heartbeat=lambda: beats.append(time.time()))
    # 1000 K was finished: not touched. 1400 K continued after the last saved frame, nothing redone.
    assert all(T == 1400.0 for T, _ in calls)
    assert calls[0][1] == 2 * len(before)  # first new frame = step after the last saved one
    after = read_frames(hot)
    assert len(after) == 9  # frames at steps 0, 2, ..., 16 (4 equilibration + 12 production)
    for a, b in zip(before, after[: len(before)]):
        assert np.array_equal(a.positions, b.positions)
    assert beats  # the queue's lease is renewed
    # ... and continued to the very trajectory and result of a run never killed
    ref = run_validation(li2o(), cfg, tmp_path / "ref", "li2o")
    for T in ("1000K", "1400K"):
        assert _same_frames(read_frames(work / T / "md.traj"), read_frames(tmp_path / "ref" / T / "md.traj")), T
    assert r.diffusivity == ref.diffusivity and r.verdict == ref.verdict
    assert r.temperatures_done == [1000.0, 1400.0]
    assert set(r.diffusivity) == {1000.0, 1400.0} and all(d > 0 for d in r.diffusivity.values())
    assert r.verdict in {"superionic", "not_superionic", "inconclusive"} and r.reason
    assert Path(r.arrhenius_png).is_file()
    saved = json.loads((work / "result.json").read_text())
    assert saved["verdict"] == r.verdict and saved["protocol"] == protocol_hash(cfg)
    # Idempotent: a third call computes nothing.
    calls.clear()
    run_validation(li2o(), cfg, work, "li2o", progress=lambda T, s, n: calls.append((T, s)))
    assert calls == []


def test_protocol_hash_tracks_physics_only():
    a = tiny_cfg()
    assert protocol_hash(a) == protocol_hash(tiny_cfg(sigma_threshold=1e-3, heartbeat_s=5, workers=3))
    assert protocol_hash(a) != protocol_hash(tiny_cfg(timestep_fs=1.0))
    assert protocol_hash(a) != protocol_hash(tiny_cfg(thermostat="langevin"))
    assert protocol_hash(a) != protocol_hash(tiny_cfg(temperatures=[1000.0, 1300.0]))
    # the limits that stop a trajectory: a run stopped by one is not reused under another
    assert protocol_hash(a) != protocol_hash(tiny_cfg(explode_temperature_factor=20.0))
    assert protocol_hash(a) != protocol_hash(tiny_cfg(min_distance=0.3))


def test_relaxation_renews_the_lease_every_step_and_stops_when_it_is_lost(tmp_path):
    """A relaxation can outlast a lease: it beats on every optimizer step, and a lost lease
    (the worker's heartbeat raises) stops it without leaving a relaxed checkpoint."""
    from xrdmatch.simulation.calculators import get_calculator
    from xrdmatch.simulation.md import relax

    cfg = tiny_cfg(relax=True, relax_steps=4, relax_fmax=1e-6)
    calc, _ = get_calculator(cfg.calculator, cfg.calculator_kwargs, device="cpu", threads=1, method=cfg.method)
    atoms = AseAtomsAdaptor.get_atoms(li2o(4.5))
    atoms.rattle(0.05, seed=0)  # off the symmetric minimum, so the optimizer takes every step
    beats = []
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    relax(atoms, calc, cfg, tmp_path / "a", "p1", heartbeat=lambda: beats.append(1))
    assert len(beats) >= cfg.relax_steps and (tmp_path / "a" / "relaxed-p1.traj").exists()

    class LeaseLost(RuntimeError):
        pass

    def lost_after_two():
        beats.append(1)
        if len(beats) > 2:
            raise LeaseLost("taken over")

    beats.clear()
    with pytest.raises(LeaseLost):
        relax(atoms, calc, cfg, tmp_path / "b", "p1", heartbeat=lost_after_two)
    assert not list((tmp_path / "b").glob("relaxed*"))


def test_check_frame_names_what_no_physical_run_makes():
    # Each check on its own, with ASE's EMT (a real, cheap potential) on Cu atoms at rest.
    from ase import Atoms
    from ase.calculators.emt import EMT

    from xrdmatch.simulation.md import MDFailure, check_frame

    cfg = tiny_cfg()
    ok = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    ok.calc = EMT()
    check_frame(ok, 300.0, cfg, step=4)  # a sane frame passes
    close = Atoms("Cu2", positions=[[0, 0, 0], [0.4 * cfg.min_distance, 0, 0]], cell=[8, 8, 8], pbc=True)
    close.calc = EMT()
    with pytest.raises(MDFailure, match=r"atoms collapsed at 300 K: distance .* at step 4"):
        check_frame(close, 300.0, cfg, step=4)
    hot = ok.copy()
    hot.calc = EMT()
    hot.set_momenta([[40.0, 0, 0], [-40.0, 0, 0]])  # ~1e5 K for two Cu atoms
    with pytest.raises(MDFailure, match=r"cell exploded at 300 K: instantaneous T \d+ K at step 7"):
        check_frame(hot, 300.0, cfg, step=7)
    bad = ok.copy()
    bad.calc = EMT()
    bad.positions[1, 0] = np.nan
    with pytest.raises(MDFailure, match=r"non-finite positions at step 2 \(300 K\)"):
        check_frame(bad, 300.0, cfg, step=2)  # named before EMT, which raises on NaN positions


def test_nan_forces_end_the_temperature_as_failed_not_as_a_crash(tmp_path):
    # A potential that returns NaN forces once moves the atoms to NaN, and some calculators
    # (GPAW; ASE's EMT when it rebuilds its neighbour list) raise on such positions inside the
    # integrator step, before any frame check. The run must end as a recorded MD failure
    # (verdict inconclusive), not crash. The fault is injected: no real potential does it on demand.
    from ase.build import bulk
    from ase.calculators.emt import EMT

    class NaNForcesOnce(EMT):
        calls = 0

        def calculate(self, atoms=None, *a, **kw):
            if not np.all(np.isfinite(atoms.positions)):
                raise ValueError("data must be finite, check for nan or inf values")
            super().calculate(atoms, *a, **kw)
            NaNForcesOnce.calls += 1
            if NaNForcesOnce.calls == 1:
                self.results["forces"] = np.full_like(self.results["forces"], np.nan)

    cfg = tiny_cfg(temperatures=[300.0], equilibration_steps=0, production_steps=8)
    r = run_temperature(bulk("Cu", cubic=True), NaNForcesOnce(), 300.0, cfg, tmp_path / "300K", "p")
    assert not r.done and r.failed.startswith("non-finite positions at step 1 (300 K); the calculator said")
    assert "ValueError: data must be finite" in r.failed  # what the calculator said is kept
    state = json.loads((tmp_path / "300K" / "state.json").read_text())
    assert state["status"] == "failed" and state["reason"] == r.failed
    assert len(read_frames(tmp_path / "300K" / "md.traj")) == state["frames"] >= 1  # frames before it kept


def test_a_fractional_unit_cell_is_ordered_with_charges_guessed_on_its_supercell():
    """Li0.25Mg0.375F has no charge-balanced guess as a unit cell (fractional amounts) but does as
    the 2x2x2 cell where its occupancies become integers: the ordering is ranked by Ewald energy
    with those charges, not picked uncharged (which here is 4.5 eV higher)."""
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation

    from xrdmatch.simulation.md import order_structure

    def ewald(s):
        s = s.copy()
        s.add_oxidation_state_by_guess()
        return EwaldSummation(s).total_energy

    s = Structure(Lattice.cubic(4.0), [{"Li": 0.25, "Mg": 0.375}, "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ordered, note = order_structure(s, 200)
    assert "2x2x2" in note and ordered.composition.reduced_formula == (s * (2, 2, 2)).composition.reduced_formula
    uncharged = OrderDisorderedStructureTransformation(no_oxi_states=True)
    others = [r["structure"] for r in uncharged.apply_transformation(s * (2, 2, 2), return_ranked_list=100)]
    assert ewald(ordered) <= min(ewald(o) for o in others) + 1e-9
    assert ewald(ordered) < ewald(uncharged.apply_transformation(s * (2, 2, 2))) - 1.0


def test_a_folder_holding_another_structures_trajectory_starts_over(tmp_path):
    """Under one protocol, a trajectory of other atoms in the folder (two ids that once mapped to
    one folder) is never resumed or returned as this structure's run."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    cfg = tiny_cfg(temperatures=[300.0], equilibration_steps=0, production_steps=4, traj_interval=1)
    first = run_temperature(bulk("Cu", cubic=True), EMT(), 300.0, cfg, tmp_path / "300K", "p")
    assert first.done and set(read_frames(first.traj_path)[0].get_chemical_symbols()) == {"Cu"}
    other = run_temperature(bulk("Ag", cubic=True), EMT(), 300.0, cfg, tmp_path / "300K", "p")
    assert other.done and other.steps_computed == 4
    assert {s for f in read_frames(other.traj_path) for s in f.get_chemical_symbols()} == {"Ag"}
