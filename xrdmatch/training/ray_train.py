"""Members as Ray Train jobs: TorchTrainer + DDP, safetensors checkpoints, resume on failure.

Each member is one ``TorchTrainer`` run named ``<run_name>-member<k>-<identity>`` under
``<run dir>/ray_results``, ``<identity>`` a digest of everything that decides the member (see
:func:`member_identity`); its workers call :func:`xrdmatch.training.trainer.train_member` with
``prepare_model`` (DDP when num_workers > 1) and report a checkpoint (a folder holding
``state.safetensors``) every ``cfg.checkpoint_every`` steps. After a worker failure Ray restarts
the group (``FailureConfig(max_failures=2)``) and the loop resumes from
``ray.train.get_checkpoint()``. Re-running the same member (same settings, seed and data) with
the same run dir and run name also resumes (Ray Train restores a run from its storage folder); a
member that differs in any of them gets another name, so it starts fresh instead of restoring
another member's checkpoint. A finished member is read from its final checkpoint (named in
``finished.json`` beside its checkpoints) without starting Ray Train again: a resumed campaign
round or ``xrdmatch train`` pays no controller and worker group (~10 s) per member done before.
Members run concurrently, as many at once as the cluster has CPUs (or GPUs, ``gpus_per_worker``
of one each) for their workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from xrdmatch.config import TrainingConfig
from xrdmatch.training.trainer import Member

STATE_FILE = "state.safetensors"
FINISHED_FILE = "finished.json"  # in a member's Ray Train folder: its final checkpoint's folder name
# the controller's poll interval (Ray Train v2, ``DEFAULT_HEALTH_CHECK_INTERVAL_S`` = 2 s): a worker's
# result queue holds one report, drained by a poll, so close checkpoints wait; ``training.ray_poll_s``
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def resolve_use_gpu(cfg: TrainingConfig, resources: dict | None = None) -> bool:
    """``training.use_gpu`` against what the Ray cluster offers (``ray.cluster_resources()``
    unless given): a GPU Ray does not list cannot be scheduled, so "auto" means the cluster has
    one (a local Ray lists the visible GPUs), and "true" on a cluster without one is an error
    rather than a job that waits forever."""
    if cfg.use_gpu == "false":
        return False
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    has_gpu = resources.get("GPU", 0) > 0
    if cfg.use_gpu == "true" and not has_gpu:
        raise RuntimeError("training.use_gpu is 'true' but the Ray cluster has no GPU "
                           f"(resources: {', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()) if '_' not in k)})")
    return has_gpu


def member_task_options(cfg: TrainingConfig, resources: dict | None = None) -> tuple[dict, str]:
    """Ray resources of one member trained as a Ray task (the evaluation's CV members) and the
    device it trains on: ``gpus_per_worker`` of a GPU when the cluster has GPUs, so members
    pack onto GPUs as Ray Train workers do instead of all landing on one unasked."""
    if resolve_use_gpu(cfg, resources):
        return {"num_cpus": 1, "num_gpus": cfg.gpus_per_worker}, "cuda"
    return {"num_cpus": 1}, "cpu"


def array_digest(a) -> str:
    """Content hash of an array (dtype, shape and bytes); "none" for None."""
    if a is None:
        return "none"
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def member_identity(cfg: TrainingConfig, seed: int, X_lab, y_lab, w, unlab_digest: str) -> str:
    """12 hex digits over what decides a member: the training settings (``result_settings``,
    seed included; not ``ensemble_size``: member k is the same in an ensemble of 4 or of 10), the
    member's seed, its labelled patterns, labels and sample weights, the unlabelled pool
    (``array_digest`` of it) and the trainer's code. Part of the Ray run's name, so a resumed run
    is always the same member, and a finished one is reused."""
    from xrdmatch.training.fingerprint import code_fingerprint

    settings = {k: v for k, v in cfg.result_settings().items() if k != "ensemble_size"}
    key = {"settings": settings, "seed": int(seed), "X_lab": array_digest(X_lab),
           "y_lab": array_digest(y_lab), "w": array_digest(w), "X_unlab": unlab_digest,
           "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def state_file(rank: int = 0) -> str:
    """Rank 0's state is the member (``state.safetensors``); every other data-parallel rank keeps
    its own beside it (random streams, FlexMatch counts, BN statistics), so a resume with the
    same number of workers continues exactly where each rank stopped."""
    return STATE_FILE if rank == 0 else f"state.rank{rank}.safetensors"


def save_state(directory: str, state: dict, rank: int = 0) -> None:
    from safetensors.torch import save_file

    from xrdmatch.training.trainer import state_to_tensors

    tensors, meta = state_to_tensors(state)
    save_file(tensors, os.path.join(directory, state_file(rank)), metadata=meta)


def load_state(directory: str, rank: int = 0) -> dict:
    """Rank ``rank``'s state; rank 0's where that rank has none (a checkpoint written with fewer
    workers, or before per-rank states), and that rank then starts a fresh random stream."""
    from safetensors import safe_open

    from xrdmatch.training.trainer import tensors_to_state

    own = os.path.join(directory, state_file(rank))
    path = own if os.path.isfile(own) else os.path.join(directory, STATE_FILE)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    state = tensors_to_state(tensors, meta)
    state["own_rank_state"] = path == own
    return state


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: resume if there is a checkpoint, train, report."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from xrdmatch.training.trainer import train_member

    # Ray Train logs each report at INFO through a logger named after its file, which
    # LoggingConfig does not reach: quiet this worker process's root logger instead
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg = TrainingConfig.model_validate(config["cfg"])
    data = ray.get(config["data"])
    X_unlab = ray.get(data["X_unlab"])  # one object shared by every member
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d, rank)
    resumed = resume is not None
    fault_at = config.get("fault_after_step")

    def checkpoint_fn(step: int, state: dict) -> None:
        last = state["history"][-1] if state["history"] else {}
        metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        # every rank reports its own file; Ray Train gathers them into one checkpoint folder
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state, rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        if fault_at is not None and not resumed and step == fault_at:
            raise RuntimeError(f"injected fault after the checkpoint at step {step} (test only)")

    train_member(
        data["X_lab"], data["y_lab"], X_unlab, cfg, config["seed"], data["w"],
        device=ray.train.torch.get_device(), resume=resume, checkpoint_fn=checkpoint_fn,
        wrap_model=ray.train.torch.prepare_model, rank=rank,
    )


def fit_member(data_ref, cfg: TrainingConfig, seed: int, storage: Path, name: str, use_gpu: bool,
               fault_after_step: int | None = None) -> Member:
    """One member as one TorchTrainer run; the Member comes from its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    total = cfg.iterations * cfg.pseudo_label_rounds
    done = finished_state(storage / name, total)
    if done is not None:
        return Member(network=cfg.network, state_dict=done["ema"], history=done["history"], seed=seed)
    make_trainer = lambda: TorchTrainer(  # noqa: E731 - a fresh trainer per start (_fit)
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "seed": seed, "data": data_ref,
                           "fault_after_step": fault_after_step},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, "GPU": cfg.gpus_per_worker} if use_gpu else None),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (one per checkpoint and report, per member) drown the
            # campaign's own progress; warnings and errors (worker failures, restarts) still show
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = _fit(make_trainer, name)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    if state["step"] != total:
        raise RuntimeError(f"Ray Train run {name}: last checkpoint at step {state['step']}, expected {total}")
    final = Path(result.checkpoint.path)
    if final.parent == storage / name:  # local storage (the run dir): remember which one is final
        tmp = final.parent / f".{FINISHED_FILE}.tmp"
        tmp.write_text(json.dumps({"checkpoint": final.name, "step": total}))
        os.replace(tmp, final.parent / FINISHED_FILE)
    return Member(network=cfg.network, state_dict=state["ema"], history=state["history"], seed=seed)


#: Times a member's Ray Train run is started again after a controller error (not a training error).
CONTROLLER_RETRIES = 2


def _fit(make_trainer, name: str):
    """``make_trainer().fit()``, started again after a controller error: on a loaded machine Ray Train's
    placement-group cleaner can take a slow state query for a dead controller and remove a live
    run's workers. The new start resumes from the run's last checkpoint (same name and storage);
    a failure of the training itself (``WorkerGroupError``, after ``max_failures``) is raised."""
    from ray.train import ControllerError

    for attempt in range(CONTROLLER_RETRIES + 1):
        try:
            return make_trainer().fit()
        except ControllerError as err:
            if attempt == CONTROLLER_RETRIES:
                raise
            logging.getLogger(__name__).warning("Ray Train run %s: controller error (%s); starting it again "
                                                "from its last checkpoint", name, str(err).splitlines()[0])


def finished_state(run_folder: Path, total: int) -> dict | None:
    """The final state of a member whose Ray Train run finished (None: not finished, or its
    record is unreadable, and Ray Train restores the run instead)."""
    marker = run_folder / FINISHED_FILE
    if not marker.is_file():
        return None
    try:
        folder = json.loads(marker.read_text())["checkpoint"]
        if not isinstance(folder, str) or Path(folder).name != folder:
            raise ValueError(f"not a checkpoint folder name: {folder!r}")
        state = load_state(str(run_folder / folder))
    except Exception as e:  # noqa: BLE001 - any unreadable record: fall back to Ray Train's restore
        logging.getLogger(__name__).warning("ignoring %s (%s: %s): Ray Train restores the run", marker,
                                            type(e).__name__, e)
        return None
    return state if state["step"] == total else None


def concurrent_members(resources: dict, cfg: TrainingConfig, use_gpu: bool, n_members: int) -> int:
    """How many members train at once: the workers that fit on the cluster's GPUs (at
    ``gpus_per_worker`` each) or CPUs (one each), at least one, at most ``n_members``."""
    if use_gpu:  # round first: 1.0 / 0.1 is 9.999... in floating point
        workers = math.floor(round(resources.get("GPU", 0) / cfg.gpus_per_worker, 6))
    else:
        workers = int(resources.get("CPU", 1))
    return max(1, min(n_members, workers // cfg.num_workers))


def fit_members(X_lab, y_lab, X_unlab, cfg: TrainingConfig, seeds, draws, sample_weight=None, *,
                run_dir=None, run_name=None, fault_after_step=None, ray_cfg=None) -> list[Member]:
    """All members, concurrently as far as the cluster's CPUs/GPUs allow. ``ray_cfg`` (the
    config's ``ray`` section) says which Ray to connect to or start when none is running."""
    import ray

    from xrdmatch.platform.ray_utils import init_ray

    init_ray(getattr(ray_cfg, "address", None), getattr(ray_cfg, "num_cpus", None))
    # Ray Train passes this variable from the driver to each run's controller (and only this way)
    os.environ[POLL_ENV] = str(cfg.ray_poll_s)
    use_gpu = resolve_use_gpu(cfg)
    storage = Path(run_dir if run_dir is not None else tempfile.mkdtemp(prefix="xrdmatch-")) / "ray_results"
    storage = storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    run_name = run_name or "train"
    X_unlab = np.zeros((0, X_lab.shape[1]), np.float32) if X_unlab is None else np.asarray(X_unlab, np.float32)
    unlab_ref = ray.put(X_unlab)  # once: every member reads the same unlabelled pool
    unlab_digest = array_digest(X_unlab)
    refs, names = [], []
    for k, (draw, seed) in enumerate(zip(draws, seeds)):
        draw = np.asarray(draw, dtype=int)
        w = None if sample_weight is None else np.asarray(sample_weight, np.float32)[draw]
        refs.append(ray.put({"X_lab": X_lab[draw], "y_lab": y_lab[draw], "X_unlab": unlab_ref, "w": w}))
        ident = member_identity(cfg, seed, X_lab[draw], y_lab[draw], w, unlab_digest)
        names.append(f"{run_name}-member{k}-{ident}")
    concurrent = concurrent_members(ray.cluster_resources(), cfg, use_gpu, len(seeds))
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        futures = [
            pool.submit(fit_member, ref, cfg, seed, storage, name, use_gpu, fault_after_step)
            for ref, seed, name in zip(refs, seeds, names)
        ]
        return [f.result() for f in futures]
