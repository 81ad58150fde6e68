"""Typed, validated configuration: the only place for numbers that users tune.

Every section is a pydantic model with ``extra="forbid"`` so that an unknown key or
a wrong type fails at load time, before any work starts, naming the key.
YAML files in ``configs/`` are read with ``yaml.safe_load``.
Each section belongs to one stage; keep the defaults here equal to
``configs/default.yaml`` (a test checks it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Where a label comes from (``xrdmatch.platform.labels``); ``labels.source_weights`` keys.
LABEL_SOURCES = ("mlip-md", "aimd", "experiment", "paper", "imported")


def _element_symbols(symbols: list[str]) -> list[str]:
    from ase.data import chemical_symbols

    unknown = [s for s in symbols if s not in chemical_symbols or s == "X"]
    if unknown:
        raise ValueError(f"not element symbols: {unknown}")
    return symbols


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatabaseConfig(StrictModel):
    """The unlabelled crystal database: shipped JSONL, a folder of CIF/POSCAR, or an ASE db."""

    path: str = "data/mp_li_structures.jsonl.xz"
    limit: int | None = Field(default=None, ge=1, description="use only the first N structures")


class LabelsConfig(StrictModel):
    path: str = "data/xrdmatch_lbs.csv"
    #: Weight of each label source in the supervised loss; 0 excludes the source.
    source_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"paper": 1.0, "experiment": 1.0, "aimd": 1.0, "mlip-md": 0.5, "imported": 1.0}
    )

    @field_validator("source_weights")
    @classmethod
    def _known_sources(cls, v: dict[str, float]) -> dict[str, float]:
        # a missing source is excluded from training: a misspelt one must not pass for that
        unknown = sorted(set(v) - set(LABEL_SOURCES))
        if unknown:
            raise ValueError(f"unknown label sources {unknown} (one of {list(LABEL_SOURCES)})")
        return v


class RayConfig(StrictModel):
    #: None: RAY_ADDRESS if set, else a local Ray started on demand.
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (None: all)")


class XRDConfig(StrictModel):
    workers: int | None = Field(default=None, ge=1, description="actors in the pool (None: one per CPU)")
    batch_size: int = Field(default=500, ge=1, description="structures per Ray task / Parquet shard")
    max_retries: int = Field(default=3, ge=0)


class AugmentConfig(StrictModel):
    """Weak and strong pattern augmentations (paper's defaults)."""

    threshold: float = Field(default=0.1, ge=0, lt=1, description="zero every normalised value below this")
    w_noise_prob: float = Field(default=0.5, ge=0, le=1)
    w_noise_peak: float = Field(default=0.1, gt=0, le=1, description="max height of weak noise peaks")
    w_noise_frac: float = Field(default=0.01, ge=0, le=1, description="fraction of empty bins that get noise")
    w_move_prob: float = Field(default=0.5, ge=0, le=1)
    w_move_min: int = Field(default=50, ge=0, lt=4501)
    w_move_gap: int = Field(default=200, ge=0, lt=4501, description="max shift in bins (paper: 150-250)")
    s_scale_prob: float = Field(default=0.5, ge=0, le=1)
    s_scale_frac: float = Field(default=0.16, ge=0, le=1)
    s_scale_max: float = Field(default=3.0, ge=1)
    s_delete_prob: float = Field(default=0.5, ge=0, le=1)
    s_delete_frac: float = Field(default=0.16, ge=0, le=1)
    s_gap_prob: float = Field(default=0.5, ge=0, le=1)
    s_gap_max: int = Field(default=550, ge=0, description="max cut/insert gap in bins (paper: 500-600)")
    s_noise_prob: float = Field(default=0.5, ge=0, le=1)
    s_noise_frac: float = Field(default=0.01, ge=0, le=1, description="fraction of empty bins that get strong noise")
    s_noise_peak: float = Field(default=0.15, gt=0, le=1, description="max height of strong noise peaks")

    @model_validator(mode="after")
    def _shift_range(self):
        if self.w_move_min > self.w_move_gap:
            raise ValueError(f"w_move_min ({self.w_move_min}) must not exceed w_move_gap ({self.w_move_gap})")
        return self


class TrainingConfig(StrictModel):
    network: Literal["fast", "vgg11", "vgg16_paper"] = "fast"
    algorithm: Literal["supervised", "fixmatch", "flexmatch"] = "flexmatch"
    iterations: int = Field(default=300, ge=1)
    batch_labelled: int = Field(default=32, ge=1)
    batch_unlabelled: int = Field(default=96, ge=0)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    alpha: float = Field(default=1.0, ge=0, description="weight of the unlabelled loss")
    threshold: float = Field(default=0.95, gt=0, le=1, description="(base) pseudo-label confidence")
    flexmatch_warmup: bool = True
    distribution_alignment: bool = Field(default=False, description=(
        "scale each unlabelled weak prediction by (labelled class frequencies / the model's running "
        "class frequencies on unlabelled batches) before pseudo-labelling (ReMixMatch's distribution "
        "alignment); off = the published FlexMatch"))
    da_momentum: float = Field(default=0.99, ge=0, lt=1, description=(
        "EMA momentum of the model's class frequencies for distribution_alignment"))
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    pseudo_label_rounds: int = Field(default=1, ge=1, description="iterative pseudo-label refinement rounds")
    ensemble_size: int = Field(default=5, ge=1)
    unlabelled_limit: int | None = Field(default=5000, ge=1, description="subsample the unlabelled set (None: all)")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per member")
    use_gpu: Literal["auto", "true", "false"] = "auto"

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_bool(cls, v):  # YAML reads an unquoted true/false as a boolean
        return str(v).lower() if isinstance(v, bool) else v
    gpus_per_worker: float = Field(default=1.0, gt=0, le=1, description=(
        "GPU share of one Ray Train worker when use_gpu: below 1, several members share one GPU "
        "(one member rarely fills a large GPU)"))
    cuda_graph_augment: bool = Field(default=True, description=(
        "on a GPU, replay the augmentation step from a CUDA graph (its ~300 kernel launches become "
        "one); falls back to op by op with a warning if capture fails. No effect on a CPU"))
    ray_poll_s: float = Field(default=0.1, gt=0, le=60, description=(
        "how often Ray Train's controller polls a member's workers (Ray's own default is 2 s): a "
        "worker holds one report at a time, so a checkpoint reported sooner than one poll after the "
        "previous one waits for it (~8 s of a 30-step member checkpointing every 5 steps at 2 s)"))
    seed: int = 0
    pseudo_label_weight: float = Field(default=0.5, ge=0, description="loss weight of round>1 pseudo-labels")
    balance_classes: bool = Field(default=True, description="class-balanced sampling of the labelled batch")
    checkpoint_every: int = Field(default=50, ge=1, description="Ray Train checkpoint interval (steps)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide what a member learns, for cache and reuse keys: all but
        ``gpus_per_worker``, which only packs members onto GPUs, ``ray_poll_s``, which only
        paces Ray Train's controller, ``checkpoint_every``, which only says how often a member
        is saved (a resumed run continues exactly), and ``use_gpu`` and ``cuda_graph_augment``,
        which change the random numbers a member draws as the device itself does (the device
        is not keyed: ``auto`` is one string on a CPU and on a GPU machine). So changing them,
        or a config written before they existed, reuses cached members and models."""
        return self.model_dump(mode="json", exclude={"gpus_per_worker", "ray_poll_s", "cuda_graph_augment",
                                                     "checkpoint_every", "use_gpu"})


class EvaluationConfig(StrictModel):
    """`xrdmatch evaluate` (xrdmatch.training.evaluation). Seeds are fixed here, before a run."""

    # --- grouped-cv (honest): repeated stratified k-fold grouped by reduced formula ---
    folds: int = Field(default=5, ge=2)
    repeats: int = Field(default=3, ge=1)
    seed: int = 0
    #: "<algorithm>" = one member; "<algorithm>-ensemble" = training.ensemble_size members, majority vote.
    methods: list[str] = Field(default_factory=lambda: ["supervised", "fixmatch", "flexmatch", "flexmatch-ensemble"],
                               min_length=1)
    #: "fixed": decision threshold 0.5 (nothing selected); "inner": threshold maximising macro-F1 on an
    #: inner grouped split of the training fold (never the test fold), applied to the full-fold model.
    threshold_selection: Literal["fixed", "inner"] = "fixed"
    inner_folds: int = Field(default=4, ge=2, description="inner split = 1 of this many folds of the training fold")
    #: An ensemble calls superionic when at least ceil(vote_fraction * members) members do (paper: 5 of 10).
    vote_fraction: float = Field(default=0.5, gt=0, le=1)
    # --- cost knobs (None: use the training section's value) ---
    iterations: int | None = Field(default=None, ge=1, description="training iterations per member")
    unlabelled_limit: int | None = Field(default=None, ge=1, description="unlabelled patterns per member")
    ensemble_size: int | None = Field(default=None, ge=1)
    # --- paper: the authors' protocol replayed ---
    paper_seed: int = Field(default=0, description="np.random.seed of the authors' shuffle of the 112")
    paper_pool: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (19, 74)
    paper_draw: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (10, 10)
    paper_members: int = Field(default=10, ge=1)
    paper_methods: list[str] = Field(default_factory=lambda: ["flexmatch-ensemble"])


class MeasuredConfig(StrictModel):
    """Measured powder patterns -> the stick grid the model knows (``xrdmatch predict``)."""

    min_points: int = Field(default=20, ge=3, description="fewest (2-theta, intensity) rows accepted")
    min_span_deg: float = Field(default=30.0, gt=0, le=90, description=(
        "narrowest 2-theta range (Cu K-alpha degrees, within the model's 0-90) a scan must cover: the model "
        "reads whole patterns; a narrower one is a partial scan, or not 2-theta in degrees (d, Q, radians)"))
    max_step_deg: float = Field(default=0.5, gt=0, description=(
        "widest step between two points (Cu K-alpha degrees): a wider gap hides the peaks inside it"))
    background_window_deg: float = Field(default=3.0, gt=0, description="rolling-minimum baseline window")
    smooth_points: int = Field(default=5, ge=0, description="Savitzky-Golay window in 0.02-deg bins (0: off)")
    peak_prominence: float = Field(default=0.02, gt=0, lt=1, description="min peak prominence / max intensity")
    peak_min_snr: float = Field(default=5.0, ge=0, description="min peak prominence / counting-noise sigma")
    peak_min_distance_deg: float = Field(default=0.1, gt=0, description="closest two peaks may be")
    kalpha2: Literal["auto", "strip", "none"] = Field(default="auto", description=(
        "Cu K-alpha scans: strip K-alpha2 (Rachinger); auto = unless the scan shows no K-alpha2"))
    kalpha2_ratio: float = Field(default=0.5, ge=0, lt=1, description="I(K-alpha2) / I(K-alpha1)")


class TrackingConfig(StrictModel):
    #: None: MLFLOW_TRACKING_URI if set, else SQLite in the run directory.
    tracking_uri: str | None = None
    experiment: str = "xrdmatch"
    registry_name: str = "xrdmatch-superionic"

    @field_validator("registry_name")
    @classmethod
    def _model_name(cls, v: str) -> str:  # MLflow's rule, checked at registration: after the whole training
        if not v.strip():
            raise ValueError("must not be empty")
        if "/" in v or ":" in v:
            raise ValueError(f"{v!r} is not an MLflow model name: it cannot contain '/' or ':'")
        if v == "." or v.startswith(".."):
            raise ValueError(f"{v!r} is not an MLflow model name: it cannot be '.' or start with '..'")
        return v
    #: A challenger becomes champion only if this metric beats the champion's.
    promotion_metric: str = "grouped_cv_macro_f1"

    @field_validator("promotion_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:  # a typo would silently never promote again
        known = [f"grouped_cv_{m}" for m in ("macro_f1", "f1_superionic", "precision", "recall", "pr_auc")]
        if v not in known:
            raise ValueError(f"{v!r} is not a champion metric; one of {known}")
        return v
    promotion_min_delta: float = 0.0
    promotion_greater_is_better: bool = True
    #: Promotion decisions are made one at a time per registry (platform/registry_lock.py); a
    #: registration waits this long for another one's decision (a few MLflow calls) to finish.
    registry_lock_timeout_s: float = Field(default=300.0, gt=0, description="s")
    #: A member calls superionic at p > this; the ensemble when ceil(evaluation.vote_fraction x members)
    #: members do (stored in the registered model's config).
    decision_threshold: float = Field(default=0.5, gt=0, lt=1)
    measured: MeasuredConfig = Field(default_factory=MeasuredConfig)


class StoreConfig(StrictModel):
    #: None: SQLite file in the run directory; or a SQLAlchemy URL (postgresql://...).
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _sqlalchemy_url(cls, v: str | None) -> str | None:
        # a typo would otherwise be a traceback from the first command that opens the store
        if not v:  # None or "": the default SQLite store in the run directory
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if _RAW_AT_IN_PASSWORD.match(v):  # parsed as part of the host; the error would show the password's tail
            raise ValueError(f"{redact(v)!r}: the password holds a raw '@'; percent-encode it as %40")
        if _PORT_LIKE_PASSWORD.match(v):
            raise ValueError("store.url: the password starts with digits and a raw '/', '?' or '#'; percent-encode "
                             "them (%2F, %3F, %23)")
        try:
            url = make_url(v)
        except ArgumentError:
            if "@" in v:  # not a URL, so redact() may miss the password: hide all before the host
                head, host = v.rsplit("@", 1)
                v = f"{head.split(':', 1)[0]}:***@{host}"
            raise ValueError(f"{redact(v)!r} is not a SQLAlchemy URL (e.g. postgresql://user@host:5432/db, "
                             "sqlite:////abs/path/store.db)") from None
        try:
            url.get_dialect()  # the dialect's module only, not its driver
        except ArgumentError:  # NoSuchModuleError: e.g. postgres:// for postgresql://
            raise ValueError(f"{redact(v)!r}: unknown database dialect {url.drivername!r} "
                             "(e.g. postgresql, sqlite)") from None
        return v


class ValidationConfig(StrictModel):
    """MD validation of one candidate (xrdmatch.simulation.validate); physics fields enter protocol_hash."""

    #: "chgnet" (MLIP, default), "gpaw" (ab initio MD), "vasp", or a dotted path to any ASE calculator class.
    calculator: str = "chgnet"
    #: Keyword arguments for the calculator (e.g. GPAW mode/xc/kpts, VASP INCAR tags).
    calculator_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Worker side: calculators this worker builds from a queued job's protocol with whatever
    #: arguments the job gives. Any other calculator runs only if the job names exactly this
    #: config's ``calculator`` and ``calculator_kwargs``: a job row is data from a shared store,
    #: and ASE calculators take shell commands (``command``) and file paths (``directory``, ``txt``).
    trusted_calculators: list[str] = Field(default_factory=lambda: ["chgnet"])
    #: Optional label override: "mlip-md" or "aimd" (None: chosen per calculator).
    method: Literal["mlip-md", "aimd"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(default=1, ge=1, description="torch threads of an MLIP calculator")
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [600.0, 800.0, 1000.0, 1200.0], min_length=1, description="kelvin"
    )
    timestep_fs: float = Field(default=2.0, gt=0)
    equilibration_steps: int = Field(default=500, ge=0)
    production_steps: int = Field(default=5000, ge=1)
    #: Trajectory frame (= checkpoint and analysis sampling) every this many MD steps.
    traj_interval: int = Field(default=10, ge=1)
    thermostat: Literal["langevin", "nose-hoover", "berendsen"] = "nose-hoover"
    #: Thermostat time constant in fs (Nose-Hoover tdamp, Berendsen taut); Langevin friction = 1/this.
    thermostat_time_fs: float = Field(default=100.0, gt=0)
    seed: int = 0
    min_atoms: int = Field(default=50, ge=1)
    min_length: float = Field(default=8.0, ge=0, description="minimum supercell lattice length (Angstrom)")
    max_atoms: int = Field(default=400, ge=1, description="refuse a structure whose supercell needs more atoms")
    min_distance: float = Field(default=0.6, gt=0, description="refuse input with atoms closer than this (A)")
    max_order_sites: int = Field(default=200, ge=1, description="largest supercell tried to order a disordered input")

    @model_validator(mode="after")
    def _supercell_bounds(self):
        if self.min_atoms > self.max_atoms:
            raise ValueError(f"min_atoms ({self.min_atoms}) exceeds max_atoms ({self.max_atoms}): every structure "
                             "would be refused")
        return self

    @field_validator("temperatures")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        # the runs go up in T and stop at the first failure; two equal T fit an Ea of 0
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"temperatures {v} must be distinct and increasing")
        return v
    relax: bool = False
    relax_optimizer: Literal["FIRE", "BFGS"] = "FIRE"
    relax_fmax: float = Field(default=0.1, gt=0, description="eV/A")
    relax_steps: int = Field(default=200, ge=1)
    # --- analysis (do not change the trajectories; not in protocol_hash) ---
    sigma_threshold: float = Field(default=5e-5, gt=0, description="S/cm at 300 K for 'superionic'")
    min_li_msd: float = Field(default=2.0, ge=0, description="A^2: Li MSD beyond its vibrational plateau below "
                              "this at a T = too few hops there")
    #: The plain MSD (runs too short for pymatgen's "max" smoothing, which starts at 1 ps) is
    #: fitted from here on: a Li rattling in its cage reaches its plateau within ~0.1 ps.
    msd_fit_start_fs: float = Field(default=200.0, ge=0, description="fs: first MSD lag of the plain D fit")
    max_framework_msd: float = Field(default=4.0, gt=0, description="A^2: framework MSD above this = melted")
    #: A label needs the threshold outside sigma(300 K) x exp(+-verdict_z x its standard error):
    #: a cell with 1-4 Li on a short run gives a D that scatters by tens of percent, and its
    #: 500 K extrapolation can land on either side of the threshold by chance.
    verdict_z: float = Field(default=1.0, ge=0, description="standard errors between sigma(300 K) and "
                             "sigma_threshold for a label; 0 = the point estimate decides")
    min_fit_temperatures: int = Field(default=2, ge=2)
    min_r2: float = Field(default=0.9, ge=0, le=1, description="minimum R^2 of the Arrhenius fit (3+ points)")
    #: No known Li solid electrolyte exceeds ~3e-2 S/cm at room temperature; a fit above this keeps
    #: its verdict (only the threshold is used) but its reason carries a caution on the magnitude.
    max_plausible_sigma: float = Field(default=0.1, gt=0, description="S/cm at 300 K: above this, flag the magnitude")

    @model_validator(mode="after")
    def _fit_window(self):  # else every analysis fails after all the MD
        frame_fs = self.traj_interval * self.timestep_fs
        first_lag = max(self.msd_fit_start_fs, frame_fs)  # the fit's first lag is one frame at least
        if self.production_steps * self.timestep_fs < first_lag + 2 * frame_fs:  # >= 3 lags to fit
            raise ValueError(f"production ({self.production_steps} steps x {self.timestep_fs:g} fs) must last at least "
                             f"{first_lag:g} fs (msd_fit_start_fs, or one frame) + 2 frame intervals "
                             f"({2 * frame_fs:g} fs): three MSD lags to fit")
        return self

    @model_validator(mode="after")
    def _fit_reachable(self):
        if self.min_fit_temperatures > len(self.temperatures):  # an MD check may want it; a campaign does not
            import warnings

            warnings.warn(f"validation: min_fit_temperatures ({self.min_fit_temperatures}) exceeds the "
                          f"{len(self.temperatures)} temperatures: every verdict will be inconclusive (no label), "
                          "after all the MD", stacklevel=2)
        return self
    explode_temperature_factor: float = Field(default=5.0, gt=1, description="abort MD if T > this x target")
    # --- queue (xrdmatch.platform.queue, xrdmatch.actors.validation_workers; not in protocol_hash) ---
    #: A running job whose worker stops renewing its lease for this long is taken by another worker.
    lease_s: float = Field(default=600.0, gt=0)
    #: Workers renew their lease (and store progress) at most this often during MD.
    heartbeat_s: float = Field(default=30.0, gt=0)
    workers: int = Field(default=1, ge=1, description="Ray validation actors of `xrdmatch validate work`")
    cpus_per_job: float = Field(default=1.0, gt=0, description="Ray num_cpus of each worker actor")
    gpus_per_job: float = Field(default=0.0, ge=0, description="Ray num_gpus of each worker actor")
    max_attempts: int = Field(default=3, ge=1, description="claims of a job before a lost worker fails it")
    max_restarts: int = Field(default=3, ge=0, description="replacements of a lost worker actor (per slot)")
    poll_s: float = Field(default=5.0, gt=0, description="idle workers look for claimable jobs this often")


class CampaignConfig(StrictModel):
    """The active-learning loop: rounds of train -> screen -> select -> validate -> relabel."""

    rounds: int = Field(default=2, ge=1)
    candidates_per_round: int = Field(default=2, ge=1)
    label_budget: int | None = Field(default=None, ge=1, description="max structures sent to MD over the campaign")
    acquisition: Literal["top", "uncertain", "ucb"] = "top"
    ucb_k: float = Field(default=1.0, ge=0, description="ucb = mean + k * spread")
    similarity_threshold: float = Field(default=0.95, gt=0, le=1, description="max cosine similarity of two picks' patterns")
    candidate_pool: int = Field(default=512, ge=1, description="best eligible structures compared for diversity")
    required_elements: list[str] = Field(default_factory=lambda: ["Li"])
    forbidden_elements: list[str] = Field(
        default_factory=lambda: ["Tc", "Pm", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu"]
    )
    symbols_are_elements = field_validator("required_elements", "forbidden_elements")(_element_symbols)

    @model_validator(mode="after")
    def _required_not_forbidden(self):
        both = sorted(set(self.required_elements) & set(self.forbidden_elements))
        if both:
            raise ValueError(f"{both} both required and forbidden: no structure could be picked")
        return self
    exclude_radioactive: bool = Field(default=True, description="also forbid every element pymatgen marks radioactive")
    max_sites_md: int = Field(default=60, ge=1, description="max sites of the unit cell sent to MD")
    screen_batch_size: int = Field(default=1000, ge=1, description="patterns per screening task")
    screen_actors: int | None = Field(default=None, ge=1, description="screening actors (None: one per CPU)")
    screen_gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs per screening actor (>0: score on CUDA)")
    #: Champion metric per round: a cheap fixed grouped CV on the labels (not the full evaluation).
    eval_folds: int = Field(default=3, ge=0, description="grouped-CV folds for the champion metric; 0 skips it")

    @field_validator("eval_folds")
    @classmethod
    def _zero_or_a_split(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 fold is no split: use 0 to skip the champion metric, or 2 or more")
        return v
    eval_iterations: int | None = Field(default=None, ge=1, description="training iterations per CV fold (None: training.iterations)")
    eval_ensemble_size: int = Field(default=1, ge=1, description="members per CV fold model")
    poll_s: float = Field(default=2.0, gt=0, description="how often to poll the validation queue")
    validation_timeout_s: float | None = Field(default=None, gt=0, description="give up waiting for verdicts after this")


class Config(StrictModel):
    run_dir: str = "runs/default"
    seed: int = 0
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    xrd: XRDConfig = Field(default_factory=XRDConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    campaign: CampaignConfig = Field(default_factory=CampaignConfig)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """Relative data paths in configs resolve against the current directory, then the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^${}]*))?\}")
_ESCAPED_DOLLAR = "\0"


def _expand_env(obj: Any, source: str, key: str = "") -> Any:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` in string values (cluster
    endpoints, no secrets in files); ``$$`` is a literal ``$``. Any other form (nested, ``${VAR-x}``)
    is an error naming the key, never left in the value."""
    if isinstance(obj, dict):
        return {k: _expand_env(v, source, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_env(v, source, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str) and "$" in obj:
        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1)) or None  # set but empty counts as unset, as ${VAR:-...} in a shell
            if val is not None:
                return val
            if m.group(2) == ":-":
                return m.group(3)
            why = f": {m.group(3)}" if m.group(2) == ":?" and m.group(3) else ""
            raise ConfigError(f"invalid config {source}: {key}: environment variable {m.group(1)} "
                              f"is not set (or empty){why}")

        out = _ENV_REF.sub(sub, obj.replace("$$", _ESCAPED_DOLLAR))
        if "${" in out:
            raise ConfigError(f"invalid config {source}: {key}: {obj!r} has a ${{...}} form this loader does not "
                              "expand: use ${VAR}, ${VAR:-default} or ${VAR:?message}, not nested; $$ for a literal $")
        return out.replace(_ESCAPED_DOLLAR, "$")
    return obj


class _SafeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, reading floats as YAML 1.2 does: ``1e-2`` is 0.01, not the string
    '1e-2' (YAML 1.1 wants ``1.0e-2``), also where no field type converts it (``calculator_kwargs``)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (safe loader), expand ${ENV} references, apply nested overrides, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(p, encoding="utf-8") as fh:
                loaded = yaml.load(fh, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader: no objects built
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"invalid config {source}: not valid YAML{at}: {problem}") from None
        except (UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"invalid config {source}: cannot be read as UTF-8 text ({err})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(loaded).__name__}")
        data = _expand_env(loaded, source)
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


# user may be empty (postgresql://:pw@host) or hold an '@' (user@server); the password runs to the
# LAST '@' on the line (a raw '@' or space in it must not leave its tail shown), never into another
# URL; ':5000/' is a port, not a password (a password like that is refused in store.url)
_URL_PASSWORD = re.compile(r"(://[^:/\s]*):(?!\d{1,5}(?:[/?#:\s]|$))(?:(?!://)[^\r\n])*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:[\w.-]*(?:password|passwd|pwd|secret)[\w.-]*|pass)=)[^&\s]*", re.IGNORECASE)
# scheme://user:pass@word@host...: SQLAlchemy ends the password at the first '@'
_RAW_AT_IN_PASSWORD = re.compile(r"[\w+]+://[^:/]*:[^@]*@[^/?]*@")
# scheme://user:1234/x@host: read as a port by the eye, and by redact (which would then show it)
_PORT_LIKE_PASSWORD = re.compile(r"[\w+]+://[^:/@]*:\d{1,5}[/?#][^@]*@")


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, ``?sslpassword=x`` ->
    ``?sslpassword=***`` (any key holding pass/pwd/secret; URLs from ${ENV} in logs and params)."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))


def redacted_dump(cfg: Config) -> dict[str, Any]:
    """The resolved config as JSON data with passwords in URLs masked: what is logged or stored."""
    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return redact(obj) if isinstance(obj, str) else obj

    return walk(cfg.model_dump(mode="json"))


def config_to_flat_params(cfg: Config) -> dict[str, str]:
    """Flatten the resolved config into dotted keys (for MLflow params; passwords masked)."""
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(obj)

    walk("", redacted_dump(cfg))
    return out
