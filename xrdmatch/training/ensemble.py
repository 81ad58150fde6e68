"""An ensemble of members (different seeds / label draws): mean probability, spread, votes.

Saved as one folder: ``ensemble.json`` (network, preprocessing threshold, members, format) plus
``member_<k>.safetensors`` (EMA weights) and ``member_<k>.history.json``. Never pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xrdmatch.config import TrainingConfig
from xrdmatch.training.metrics import calls, vote
from xrdmatch.training.trainer import Member, train_member

FORMAT = "xrdmatch-ensemble/1"


@dataclass
class Ensemble:
    members: list[Member]
    network: str
    threshold: float = 0.1  # preprocessing threshold the members were trained with
    info: dict = field(default_factory=dict)  # free-form lineage (data hash, config...)

    def _models(self, device: torch.device) -> list[torch.nn.Module]:
        from xrdmatch.training.networks import build_network

        cache = self.__dict__.setdefault("_cache", {})
        if str(device) not in cache:
            nets = []
            for m in self.members:
                net = build_network(m.network)
                net.load_state_dict(m.state_dict)
                nets.append(net.to(device).eval())
            cache[str(device)] = nets
        return cache[str(device)]

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray, batch_size: int = 1024, device: str = "cpu",
                      vote_fraction: float = 0.5, decision_threshold: float = 0.5) -> dict:
        """P(superionic) per member -> {"p_mean", "p_std", "votes" (members with p > decision_threshold),
        "majority" (at least ceil(vote_fraction x members) votes: the evaluated and served rule,
        ``metrics.vote``, as ``pyfunc_model.decide``), "p_members" (members x n)}."""
        from xrdmatch.training.preprocess import preprocess

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"predict_proba: expected patterns of shape (n, bins), got {X.shape}")
        dev = torch.device(device)
        x = torch.as_tensor(preprocess(X, self.threshold)) if len(X) else torch.zeros(X.shape)
        probs = np.zeros((len(self.members), len(X)), dtype=np.float64)
        for k, net in enumerate(self._models(dev)):
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(dev)
                probs[k, i : i + len(xb)] = net(xb).softmax(-1)[:, 1].double().cpu().numpy()
        return {"p_mean": probs.mean(0), "p_std": probs.std(0), "votes": calls(probs, decision_threshold).sum(0),
                "majority": vote(probs, vote_fraction, decision_threshold).astype(np.int64), "p_members": probs}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the ensemble folder (atomically: a temp folder renamed into place)."""
        import shutil

        from safetensors.torch import save_file

        d = Path(directory)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        entries = []
        for k, m in enumerate(self.members):
            save_file({n: t.detach().cpu().contiguous() for n, t in m.state_dict.items()},
                      str(tmp / f"member_{k}.safetensors"))
            (tmp / f"member_{k}.history.json").write_text(json.dumps(m.history))
            entries.append({"weights": f"member_{k}.safetensors", "history": f"member_{k}.history.json",
                            "seed": m.seed, "network": m.network})
        meta = {"format": FORMAT, "network": self.network, "threshold": self.threshold,
                "members": entries, "info": self.info}
        (tmp / "ensemble.json").write_text(json.dumps(meta, indent=1, default=str))
        # never a moment without a complete folder on disk: the old one is moved aside, not
        # deleted, until the new one is in place
        old = d.with_name(d.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if d.exists():
            d.rename(old)
        tmp.rename(d)
        shutil.rmtree(old, ignore_errors=True)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Ensemble":
        from safetensors.torch import load_file

        d = Path(directory)
        meta_path = d / "ensemble.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not an ensemble folder (no ensemble.json): {d}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {FORMAT}")
        members = []
        for e in meta["members"]:
            hist_path = d / e["history"]
            history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
            members.append(Member(network=e["network"], state_dict=load_file(str(d / e["weights"])),
                                  history=history, seed=int(e["seed"])))
        return cls(members=members, network=meta["network"], threshold=float(meta["threshold"]),
                   info=meta.get("info", {}))


def member_seeds(cfg: TrainingConfig) -> list[int]:
    return [cfg.seed * 1000 + k for k in range(cfg.ensemble_size)]


def unlabelled_subset(X_unlab, cfg: TrainingConfig):
    """The unlabelled patterns every member trains on: ``cfg.unlabelled_limit`` of them, drawn once
    with ``cfg.seed`` (in their order), or all. What the lineage tags of a model describe."""
    if X_unlab is None or cfg.unlabelled_limit is None or len(X_unlab) <= cfg.unlabelled_limit:
        return X_unlab
    pick = np.random.default_rng(cfg.seed).choice(len(X_unlab), cfg.unlabelled_limit, replace=False)
    return np.asarray(X_unlab)[np.sort(pick)]


def train_ensemble(
    X_lab,
    y_lab,
    X_unlab,
    cfg: TrainingConfig,
    sample_weight=None,
    label_draws=None,
    use_ray: bool = True,
    log_fn=None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    run_name: str | None = None,
    fault_after_step: int | None = None,
    ray_cfg=None,
) -> Ensemble:
    """Train ``cfg.ensemble_size`` members (seed k; labels ``label_draws[k]`` or all of them).

    ``use_ray``: every member is a Ray Train TorchTrainer job (see ray_train.py), run
    concurrently when the cluster has room. Otherwise members train one after the other here.
    ``log_fn(step, metrics)`` receives every member's per-step metrics with a ``member`` key.
    ``fault_after_step`` exists only for the resume test (Ray path). ``ray_cfg``: the config's
    ``ray`` section (address / num_cpus), used when Ray is not running yet.
    """
    X_lab = np.asarray(X_lab, dtype=np.float32)
    y_lab = np.asarray(y_lab)
    X_unlab = unlabelled_subset(X_unlab, cfg)
    seeds = member_seeds(cfg)
    draws = label_draws if label_draws is not None else [np.arange(len(y_lab))] * len(seeds)
    if len(draws) != len(seeds):
        raise ValueError(f"label_draws has {len(draws)} entries, ensemble_size is {len(seeds)}")
    if use_ray:
        from xrdmatch.training.ray_train import fit_members

        members = fit_members(X_lab, y_lab, X_unlab, cfg, seeds, draws, sample_weight,
                              run_dir=run_dir, run_name=run_name, fault_after_step=fault_after_step,
                              ray_cfg=ray_cfg)
    else:
        device = "cuda" if cfg.use_gpu != "false" and torch.cuda.is_available() else "cpu"
        members = []
        # one torch thread, as in a Ray Train CPU worker: the thread count changes how sums are
        # split, so only this way are the weights the same as through Ray (and across machines)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for k, (seed, draw) in enumerate(zip(seeds, draws)):
                draw = np.asarray(draw, dtype=int)
                w = None if sample_weight is None else np.asarray(sample_weight)[draw]
                members.append(train_member(X_lab[draw], y_lab[draw], X_unlab, cfg, seed, w, device=device))
        finally:
            torch.set_num_threads(threads)
    if log_fn is not None:
        for k, m in enumerate(members):
            for row in m.history:
                log_fn(int(row["step"]), {"member": k, **row})
    return Ensemble(members=members, network=cfg.network, threshold=cfg.augment.threshold)
