"""Model registry: one registered model (``tracking.registry_name``), versions = ensembles.

Aliases, not stages: every new version gets ``challenger``; it also gets ``champion`` when
it beats the current champion on ``tracking.promotion_metric`` by more than
``tracking.promotion_min_delta`` (or when there is no champion yet). The rule and the
decision are written as tags on the version and on the run. Version tags carry the metrics
(``metric.<name>``) and the lineage tags (``lineage.*``) so versions can be searched:
``MlflowClient().search_model_versions("name='xrdmatch-superionic' and tags.`lineage.source.aimd` != '0'")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from xrdmatch.config import Config
from xrdmatch.platform.registry_lock import registry_lock
from xrdmatch.platform.tracking import configure, mlflow_run

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME_IN_RUN = "model"
PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"
#: Shipped with every version as ``code_paths`` (MLflow puts it on sys.path at load), so a
#: registered model loads where xrdmatch is not installed.
PACKAGE_DIR = PYFUNC_FILE.parent.parent
#: Distributions the model imports at load and predict: the model file (mlflow, numpy, pandas),
#: xrdmatch.training.ensemble and what it pulls in (torch, safetensors, xrdmatch.config:
#: pydantic, pyyaml).
#: sqlalchemy: the shipped config checks a store URL with it (mlflow needs it anyway).
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "pyyaml", "sqlalchemy")


@dataclass
class RegisteredVersion:
    name: str
    version: str
    aliases: list[str]
    promoted: bool
    run_id: str | None = None
    model_uri: str | None = None
    resumed: bool = False  # the run had registered it already (a crash came before its tags)


@dataclass
class VersionInfo:
    """One registered version as ``xrdmatch models`` shows it."""

    name: str
    version: str
    aliases: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    created_ms: int = 0


def _pip_requirements() -> list[str]:
    """Pinned runtime deps of the pyfunc (explicit, so MLflow does not load the model to infer them).

    Local version labels are dropped (``torch 2.13.0+cpu`` -> ``torch==2.13.0``): PyPI hosts no
    such builds, so a pin with one cannot be installed from it.
    """
    reqs = []
    for pkg in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg).split('+', 1)[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


@functools.cache
def example_pattern() -> np.ndarray:
    """A real input example: the simulated pattern of antifluorite Li2O (1, 4501), read-only.

    Computed once per process: it took 0.3 s of each ~1 s registration.
    """
    from pymatgen.core import Lattice, Structure

    from xrdmatch.simulation.xrd import xrd_pattern

    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])
    pattern = np.asarray(xrd_pattern(s), dtype=np.float64)[None, :]
    pattern.flags.writeable = False
    return pattern


def _signature():
    """One float64 tensor of shape (-1, 4501) in, four columns out.

    A tensor, not 4501 named columns: that schema put ~250 KB of YAML in every MLmodel, and
    MLflow's per-column parsing and checks cost seconds per registration and ~1 s per load
    (``benchmarks/registry_signature.py``). MLflow still takes a DataFrame of 4501 columns
    (``dataframe_split``, ``patterns_frame``), read by position; float32 input is refused.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from xrdmatch.platform.pyfunc_model import N_BINS

    inputs = Schema([TensorSpec(np.dtype(np.float64), (-1, N_BINS))])
    outputs = Schema([ColSpec("double", "p_superionic", required=False), ColSpec("double", "p_std", required=False),
                      ColSpec("long", "superionic", required=False), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def not_found(e: Exception) -> bool:
    """Whether an MLflow error says the model or alias does not exist (as opposed to a store
    that cannot be reached or read, which must fail the caller, not read as "none")."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and (e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)))


def _metric_tag(name: str) -> str:
    return f"metric.{name}"


def _as_float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def beats(new: float | None, old: float | None, min_delta: float, greater_is_better: bool = True) -> bool:
    """The promotion rule: a missing old value loses to any value; a missing new value never wins."""
    if new is None:
        return False
    if old is None:
        return True
    return new > old + min_delta if greater_is_better else new < old - min_delta


def promotion_rule(cfg: Config) -> str:
    t = cfg.tracking
    op, sign = (">", "+") if t.promotion_greater_is_better else ("<", "-")
    return f"{t.promotion_metric} {op} champion {sign} {t.promotion_min_delta:g}"


@contextlib.contextmanager
def _run_for(cfg: Config, run_id: str | None, lineage: dict[str, str]):
    import mlflow

    active = mlflow.active_run()
    if run_id is None and active is not None:
        yield active
    elif run_id is not None and active is not None and active.info.run_id == run_id:
        yield active
    elif run_id is not None:
        configure(cfg)
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run
    else:
        with mlflow_run(cfg, "register", tags=lineage) as run:
            yield run


def register_ensemble(cfg: Config, ensemble_dir: str | os.PathLike[str], metrics: dict[str, float],
                      lineage: dict[str, str], run_id: str | None = None,
                      input_example: np.ndarray | None = None) -> RegisteredVersion:
    """Log the ensemble directory as ONE pyfunc model, register it, tag it, maybe promote it.

    ``run_id``: log into that run (e.g. the training run); None: the active run, else a new
    ``register`` run. Returns the new version with its aliases and whether it became champion.
    Once per run: a run that registered a version already (a resumed stage) gets that version
    settled, never a second one.
    """
    prev = version_of_run(cfg, run_id) if run_id else None
    if prev is not None:
        return dataclasses.replace(settle_version(cfg, str(prev.version), metrics, lineage, run_id), resumed=True)
    version, this_run = log_version(cfg, ensemble_dir, lineage, run_id, input_example)
    return settle_version(cfg, version, metrics, lineage, this_run)


def log_version(cfg: Config, ensemble_dir: str | os.PathLike[str], lineage: dict[str, str],
                run_id: str | None = None, input_example: np.ndarray | None = None) -> tuple[str, str]:
    """Log the ensemble as a pyfunc model and register it: a new, still untagged version.

    Returns (version, run id). ``settle_version`` does the rest; alone, this is the state a
    crash between the two leaves behind.
    """
    import mlflow

    ens = Path(ensemble_dir)
    if not ens.is_dir():
        raise FileNotFoundError(f"ensemble directory not found: {ens}")
    configure(cfg)
    example = example_pattern() if input_example is None else np.atleast_2d(np.asarray(input_example, np.float64))
    with _run_for(cfg, run_id, lineage) as run:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_FILE),
            artifacts={"ensemble": str(ens.resolve())},
            code_paths=[str(PACKAGE_DIR)],
            signature=_signature(),
            input_example=example,  # MLflow checks that it serves: {"inputs": [[...4501 values]]}
            pip_requirements=_pip_requirements(),
            model_config={"threshold": cfg.tracking.decision_threshold,
                          "vote_fraction": cfg.evaluation.vote_fraction},
            registered_model_name=cfg.tracking.registry_name,
        )
        return str(info.registered_model_version), run.info.run_id


def settle_version(cfg: Config, version: str, metrics: dict[str, float], lineage: dict[str, str],
                   run_id: str) -> RegisteredVersion:
    """Tag a registered version, decide its promotion and set its aliases; safe to run again.

    ``log_model`` creates the version before any of this, so a crash in between leaves a bare
    version; a resumed campaign calls this on it. The decision is made once: its tag
    (``promotion.promoted``, written last of the tags) is reused on a rerun, never re-decided
    against a champion that may by then be this very version. ``challenger`` never goes back to
    an older version; a rerun moves ``champion`` only from the champion its decision was made
    against. Decisions are made one at a time per registry (``registry_lock``), so registrations
    settling at once cannot all win against the same old champion.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure(cfg)
    client = MlflowClient()
    name = cfg.tracking.registry_name
    clean_metrics = {k: f for k, v in metrics.items() if (f := _as_float(v)) is not None}
    rule = promotion_rule(cfg)
    with registry_lock(cfg):  # read the champion, decide, move the aliases: one step (registry_lock.py)
        existing = client.get_model_version(name, version).tags or {}
        resumed = "promotion.promoted" in existing
        if resumed:
            promoted = existing["promotion.promoted"] == "true"
        else:
            tags = {**{k: str(v) for k, v in lineage.items()},
                    **{_metric_tag(k): repr(v) for k, v in clean_metrics.items()},
                    "promotion.rule": rule, "promotion.metric": cfg.tracking.promotion_metric}
            try:
                champ = client.get_model_version_by_alias(name, CHAMPION)
            except MlflowException as e:
                if not not_found(e):  # an unreachable store is not "no champion": never promote on it
                    raise
                champ = None
            old = _as_float(champ.tags.get(_metric_tag(cfg.tracking.promotion_metric))) if champ is not None else None
            new = clean_metrics.get(cfg.tracking.promotion_metric)
            promoted = champ is None or beats(new, old, cfg.tracking.promotion_min_delta,
                                              cfg.tracking.promotion_greater_is_better)
            tags["promotion.previous_champion"] = str(champ.version) if champ is not None else "none"
            tags["promotion.promoted"] = str(promoted).lower()  # last: its presence means all are written
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
        # challenger: the newest settled version (versions logged together may settle out of order)
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is None or int(challenger) <= int(version):
            client.set_registered_model_alias(name, CHALLENGER, version)
        # champion: decided just now against the champion of this moment, or, on a rerun, only
        # where no later registration has moved it since the decision
        champion = _alias_version(client, name, CHAMPION)
        if promoted and (not resumed or champion in (None, version, existing.get("promotion.previous_champion"))):
            client.set_registered_model_alias(name, CHAMPION, version)
    client.set_tag(run_id, "registry.model", name)
    client.set_tag(run_id, "registry.promotion_rule", rule)
    client.set_tag(run_id, "registry.version", version)
    client.set_tag(run_id, "registry.promoted", str(promoted).lower())
    aliases = list(client.get_model_version(name, version).aliases)
    return RegisteredVersion(name=name, version=version, aliases=sorted(aliases), promoted=promoted,
                             run_id=run_id, model_uri=f"models:/{name}/{version}")


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points at, or None if it is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if not not_found(e):
            raise
        return None


def version_of_run(cfg: Config, run_id: str):
    """The registered version logged by MLflow run ``run_id`` (None: none): a resumed stage
    settles it instead of registering the same model twice. An unreachable registry raises
    (read as "none", it would register the model again)."""
    from mlflow import MlflowClient

    configure(cfg)
    found = MlflowClient().search_model_versions(f"name='{cfg.tracking.registry_name}' and run_id='{run_id}'")
    return found[0] if found else None


class UnknownVersion(LookupError):
    """The version asked for is not registered; the message lists those that are."""


def promote(cfg: Config, version: str | int, alias: str = CHAMPION, reason: str = "") -> str | None:
    """Move an alias by hand (roll back the champion); returns the version that held it
    (``version`` itself: it held the alias already, and nothing was changed).

    The move is a tag of the version (``promotion.by_hand.<alias>``: previous holder, time,
    reason), as the automatic decisions are. The next registration is compared with the
    champion set here, as with any other."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure(cfg)
    client = MlflowClient()
    name, version = cfg.tracking.registry_name, str(version)
    with registry_lock(cfg):  # not in the middle of a registration's decision
        try:
            client.get_model_version(name, version)
        except MlflowException as e:
            if not not_found(e):
                raise
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise UnknownVersion(f"{name} has no version {version!r} (registered: "
                                 f"{', '.join(map(str, known)) or 'none'})") from None
        before = _alias_version(client, name, alias)
        if before == version:  # nothing moves, nothing to record
            return before
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        note = f"was {'v' + before if before else 'unset'}, at {at}" + (f": {reason}" if reason else "")
        # the record first: a crash in between leaves a record whose alias is elsewhere (shown
        # nowhere), never a moved alias without its record
        client.set_model_version_tag(name, version, f"promotion.by_hand.{alias}", note)
        client.set_registered_model_alias(name, alias, version)
    return before


def list_versions(cfg: Config, filter_tags: dict[str, str] | None = None) -> list[VersionInfo]:
    """Registered versions (newest first) with aliases, metrics and lineage; optional exact tag filter."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure(cfg)
    client = MlflowClient()
    name = cfg.tracking.registry_name
    query = f"name = '{name}'"
    for k, v in (filter_tags or {}).items():
        query += f" and tags.`{k}` = '{v}'"
    try:
        versions = client.search_model_versions(query)
        by_version: dict[str, list[str]] = {}
        for alias, v in (client.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
    except MlflowException as e:
        if not_found(e):
            return []  # nothing registered yet
        raise
    out = []
    for mv in versions:
        tags = dict(mv.tags)
        metrics = {k[len("metric."):]: f for k, v in tags.items()
                   if k.startswith("metric.") and (f := _as_float(v)) is not None}
        lineage = {k: v for k, v in tags.items() if k.startswith("lineage.")}
        out.append(VersionInfo(name=mv.name, version=str(mv.version), aliases=sorted(by_version.get(str(mv.version), [])),
                               metrics=metrics, lineage=lineage, tags=tags, run_id=mv.run_id,
                               created_ms=int(mv.creation_timestamp or 0)))
    out.sort(key=lambda v: int(v.version), reverse=True)
    return out


def ensemble_dir_of(model_uri: str) -> Path:
    """Local folder of the ensemble inside a logged pyfunc model (downloaded if remote): its
    weights, read without running anything the model folder ships (``screen``, ``predict``)."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = sorted(p.parent for p in local.rglob("ensemble.json"))
    if not found:
        raise FileNotFoundError(f"{model_uri}: no xrdmatch ensemble inside the model (no ensemble.json)")
    return found[0]


def decision_rule(ensemble_dir: Path, cfg) -> tuple[float, float, str]:
    """(threshold, vote_fraction, where from) of the served model: its MLmodel's model config
    (what ``pyfunc_model.decide`` applies), else the config's (a bare ensemble folder)."""
    from mlflow.models import Model

    for d in (ensemble_dir.parent, ensemble_dir.parent.parent):  # a pyfunc keeps it in artifacts/<name>
        if (d / "MLmodel").is_file():
            conf = Model.load(d / "MLmodel").flavors.get("python_function", {}).get("config") or {}
            if "threshold" in conf and "vote_fraction" in conf:
                return float(conf["threshold"]), float(conf["vote_fraction"]), "model"
            break
    return cfg.tracking.decision_threshold, cfg.evaluation.vote_fraction, "config"


def default_model_uri(cfg: Config) -> str:
    return f"models:/{cfg.tracking.registry_name}@{CHAMPION}"
