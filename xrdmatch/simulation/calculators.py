"""ASE calculators by name: CHGNet (MLIP, default), GPAW / VASP (ab initio), or any dotted path.

Every name resolves to a real ``ase.calculators.calculator.Calculator``. A missing package or a
missing external setting raises :class:`CalculatorUnavailable` naming the calculator and how to
get it, before any MD starts, so the queue records a clear reason instead of a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

#: Calculators whose forces come from a learned potential (label source "mlip-md").
MLIP_PACKAGES = ("chgnet", "mace", "matgl", "sevenn", "fairchem", "orb_models", "mattersim")
#: Modules of ab initio (DFT) codes (label source "aimd"). Anything else by dotted path (EMT, a
#: classical force field, an MLIP not listed above) must say what it is with ``validation.method``.
AB_INITIO_MODULES = ("gpaw", "pyscf", *(f"ase.calculators.{m}" for m in (
    "vasp", "espresso", "cp2k", "castep", "abinit", "aims", "siesta", "nwchem", "gaussian", "orca", "psi4",
    "qchem", "onetep", "exciting", "openmx", "elk", "gpaw")))
#: PyPI names of the modules whose distribution is named otherwise (for the install hint).
PIP_NAMES = {"mace": "mace-torch", "fairchem": "fairchem-core", "orb_models": "orb-models"}

_CHGNET_MODEL = None  # loaded once per process: ~1-2 s and ~2 MB, shipped inside the wheel


class CalculatorUnavailable(RuntimeError):
    """The requested calculator is not installed or not configured; the message says how to fix it."""


@dataclass(frozen=True)
class CalculatorInfo:
    name: str
    method: str  # "mlip-md" | "aimd"
    version: str


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CalculatorUnavailable("device 'cuda' requested for the MLIP calculator but torch sees no GPU")
    return device


def _chgnet(kwargs: dict[str, Any], device: str, threads: int):
    global _CHGNET_MODEL
    try:
        import torch
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as err:  # pragma: no cover - chgnet is a core dependency
        raise CalculatorUnavailable(f"calculator 'chgnet' is not installed ({err}); pip install chgnet") from None
    torch.set_num_threads(threads)
    # chgnet converts a tensor that requires grad to a float when it computes stress (its own
    # code, harmless, once per worker): torch's UserWarning about it is not the user's business
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar",
                            category=UserWarning)
    # CHGNet prints its banner ("initialized with ...", "will run on cpu") on stdout, which Ray
    # forwards from every worker into the campaign's output, once per job.
    with contextlib.redirect_stdout(io.StringIO()):
        if _CHGNET_MODEL is None:
            # CHGNet.load() reads the pretrained weights shipped in the wheel; it never downloads.
            _CHGNET_MODEL = CHGNet.load(verbose=False)
        calc = CHGNetCalculator(model=_CHGNET_MODEL, use_device=_torch_device(device), **kwargs)
    return calc, CalculatorInfo("chgnet", "mlip-md", _version("chgnet"))


def _gpaw(kwargs: dict[str, Any]):
    try:
        from gpaw import GPAW, PW
    except ImportError:
        raise CalculatorUnavailable(
            "calculator 'gpaw' is not installed: pip install 'xrdmatch[gpaw]' (builds against libxc and "
            "BLAS: Debian packages libxc-dev libopenblas-dev; the PAW datasets come with gpaw-data), "
            "or conda install -c conda-forge gpaw"
        ) from None
    # symmetry off: MD breaks the symmetry of the starting cell, which GPAW refuses ("Broken symmetry!")
    params: dict[str, Any] = {"mode": PW(300), "xc": "PBE", "kpts": (1, 1, 1), "symmetry": "off", "txt": None}
    params.update(kwargs)
    if isinstance(params.get("mode"), (int, float)):
        params["mode"] = PW(float(params["mode"]))  # a plane-wave cutoff in eV from YAML
    return GPAW(**params), CalculatorInfo("gpaw", "aimd", _version("gpaw"))


def _vasp(kwargs: dict[str, Any]):
    from ase.calculators.vasp import Vasp

    if not any(os.environ.get(v) for v in ("ASE_VASP_COMMAND", "VASP_COMMAND", "VASP_SCRIPT")):
        raise CalculatorUnavailable(
            "calculator 'vasp' is not configured: set ASE_VASP_COMMAND (e.g. 'mpirun vasp_std') and "
            "VASP_PP_PATH (folder with potpaw_PBE); VASP itself needs a licence"
        )
    if not os.environ.get("VASP_PP_PATH"):
        raise CalculatorUnavailable("calculator 'vasp' needs VASP_PP_PATH (folder holding potpaw_PBE)")
    params: dict[str, Any] = {"xc": "PBE", "encut": 400, "kpts": (1, 1, 1), "ediff": 1e-5, "lwave": False, "lcharg": False}
    params.update(kwargs)
    return Vasp(**params), CalculatorInfo("vasp", "aimd", _version("ase"))


def label_method(module_name: str) -> str | None:
    """Label source of a calculator module: "mlip-md", "aimd", or None when it cannot be told."""
    if module_name.split(".")[0] in MLIP_PACKAGES:
        return "mlip-md"
    if any(module_name == m or module_name.startswith(m + ".") for m in AB_INITIO_MODULES):
        return "aimd"
    return None


def _dotted(name: str, kwargs: dict[str, Any], method: str | None = None):
    module_name, _, cls_name = name.rpartition(".")
    if not module_name:
        raise CalculatorUnavailable(
            f"unknown calculator {name!r}: use 'chgnet', 'gpaw', 'vasp' or a dotted class path "
            "such as 'ase.calculators.vasp.Vasp'"
        )
    top = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CalculatorUnavailable(
            f"calculator {name!r}: cannot import {module_name} ({err}); pip install {PIP_NAMES.get(top, top)}"
        ) from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise CalculatorUnavailable(f"calculator {name!r}: {module_name} has no attribute {cls_name!r}")
    from ase.calculators.calculator import BaseCalculator

    if not (isinstance(cls, type) and issubclass(cls, BaseCalculator)):  # a queued protocol names it: only calculators
        raise CalculatorUnavailable(f"calculator {name!r} is not an ASE calculator class "
                                    "(a subclass of ase.calculators.calculator.BaseCalculator)")
    method = method or label_method(module_name)
    if method is None:  # its labels would be weighted as some source they are not
        raise CalculatorUnavailable(
            f"calculator {name!r} is neither a known ab initio code nor a known ML potential, so its labels' "
            "source cannot be told: set validation.method to 'aimd' or 'mlip-md'"
        )
    try:
        calc = cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - any constructor failure means "not usable here"
        raise CalculatorUnavailable(f"calculator {name!r} could not be created: {type(err).__name__}: {err}") from None
    return calc, CalculatorInfo(name, method, _version(top))


#: The class paths of the named calculators: 'ase.calculators.vasp.Vasp' is 'vasp', with its
#: checks (ASE_VASP_COMMAND, VASP_PP_PATH) before any MD, not a failure inside it.
_BY_CLASS_PATH = {"ase.calculators.vasp.vasp": "vasp", "ase.calculators.vasp.vasp.vasp": "vasp",
                  "gpaw.gpaw": "gpaw", "gpaw.calculator.gpaw": "gpaw",
                  "chgnet.model.dynamics.chgnetcalculator": "chgnet"}


def canonical_name(name: str) -> str:
    """'chgnet', 'gpaw', 'vasp' (also by class path, any case), else the dotted path as given."""
    key = name.strip().lower()
    key = _BY_CLASS_PATH.get(key, key)
    return key if key in ("chgnet", "gpaw", "vasp") else name.strip()


def check_trusted(job, worker) -> None:
    """Refuse a queued job's calculator this worker was not told to trust (``job`` and ``worker``
    are ValidationConfigs: the job's protocol, the worker's own). Before anything is imported or
    built: a protocol is data from a shared store, and a calculator's constructor arguments can be
    a shell command."""
    name = canonical_name(job.calculator)
    if name in {canonical_name(t) for t in worker.trusted_calculators}:
        return
    # compared as stored: a job's protocol went through JSON (tuples came back as lists)
    if (name == canonical_name(worker.calculator)
            and job.model_dump(mode="json")["calculator_kwargs"] == worker.model_dump(mode="json")["calculator_kwargs"]):
        return
    raise CalculatorUnavailable(
        f"calculator {job.calculator!r} of the job's protocol is not trusted by this worker: it is not in "
        f"validation.trusted_calculators {worker.trusted_calculators}, and the worker's own calculator is "
        f"{worker.calculator!r}" + (" with other calculator_kwargs" if name == canonical_name(worker.calculator) else "")
        + "; run workers with a config that names it")


def get_calculator(
    name: str,
    kwargs: dict[str, Any] | None = None,
    *,
    device: str = "auto",
    threads: int = 1,
    method: str | None = None,
):
    """Return ``(ase_calculator, CalculatorInfo)`` for a calculator name (see module docstring)."""
    kwargs = dict(kwargs or {})
    key = canonical_name(name)  # a known code by its class path gets the same checks
    if key == "chgnet":
        calc, info = _chgnet(kwargs, device, threads)
    elif key == "gpaw":
        calc, info = _gpaw(kwargs)
    elif key == "vasp":
        calc, info = _vasp(kwargs)
    else:
        calc, info = _dotted(name.strip(), kwargs, method)
    if method is not None:
        info = CalculatorInfo(info.name, method, info.version)
    return calc, info
