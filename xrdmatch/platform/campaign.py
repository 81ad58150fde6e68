"""The active-learning campaign: a resumable state machine over rounds of stages.

Each round runs, in order::

    patterns -> train -> register -> screen -> select -> validate -> label

and every stage writes its result to the campaign store before the next one starts. On a
restart (e.g. after kill -9) the same command skips every stage recorded ``done`` and
re-enters the first unfinished one; stages are written so that re-entering is safe:
patterns are a resumable cache, the ensemble is saved atomically, registration looks up the
round's MLflow run first, scores are written tmp + rename, candidates are stored with the
``select`` result in one transaction, queue submission is idempotent per (structure,
protocol) and labels are unique per (structure, protocol).

A round that brings no new label (same labelled and unlabelled data, same settings: the same
:func:`training_key`) takes the earlier round's ensemble, registered version and scores
instead of training the same model again.

The campaign is one MLflow parent run with one child run per round; their ids live in the
store so a resumed campaign logs into the same runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdmatch.config import Config, redacted_dump
from xrdmatch.platform.campaign_store import DONE, FAILED, RUNNING, CampaignStore, campaign_id_for
from xrdmatch.platform.paths import RunPaths, database_key

log = logging.getLogger(__name__)

STAGES = ("patterns", "train", "register", "screen", "select", "validate", "label")


class CampaignError(RuntimeError):
    """A campaign that cannot go on; the message says why and where to look."""


# --------------------------------------------------------------------------------------
# context: lazily loaded shared data of one campaign process
# --------------------------------------------------------------------------------------
@dataclass
class Context:
    cfg: Config
    paths: RunPaths
    store: CampaignStore
    url: str
    echo: Callable[[str], None] = print
    progress: bool = True
    _patterns: Any = None
    _meta: Any = None
    _md_atoms: Any = None  # (settings it was computed for, array)
    round_run_ids: dict[int, str] = field(default_factory=dict)

    # patterns of the whole database (the XRD stage's resumable cache)
    def patterns(self):
        if self._patterns is None:
            from xrdmatch.platform.patterns import ensure_patterns

            self._patterns = ensure_patterns(self.cfg, progress=self.progress)
        return self._patterns

    def db_key(self) -> str:
        from xrdmatch.config import resolve_path

        return database_key(resolve_path(self.cfg.database.path), self.cfg.database.limit)

    def meta(self):
        """Per-structure facts for the filters (reduced formula, elements, sites), aligned
        with the pattern table's ids; cached as Parquet in the run directory."""
        if self._meta is None:
            cache = self.paths.root / "structures" / f"{self.db_key()}-{STRUCTURE_META_VERSION}.parquet"
            self._meta = structure_meta(self.cfg, cache, list(self.patterns().ids))
        return self._meta

    def md_atoms(self) -> np.ndarray:
        """``md_cell_atoms`` of every structure, computed once per process (seconds on the whole
        database; every round's patterns and select stages need it)."""
        v = self.cfg.validation
        key = (v.min_atoms, v.min_length, v.max_atoms, v.verdict_z > 0, self.cfg.campaign.max_sites_md)
        if self._md_atoms is None or self._md_atoms[0] != key:
            self._md_atoms = (key, md_cell_atoms(self.cfg, self.meta()))
        return self._md_atoms[1]

    def scores_path(self, rnd: int) -> Path:
        return self.paths.root / "scores" / f"round-{rnd:03d}.parquet"

    def model_dir(self, rnd: int) -> Path:
        return self.paths.models_dir / f"round-{rnd:03d}"

    def result(self, rnd: int, stage: str) -> dict[str, Any]:
        rec = self.store.stage(rnd, stage)
        if rec is None or rec.status != DONE:
            raise CampaignError(f"round {rnd}: stage {stage} has no result yet")
        return rec.result or {}


#: In the name of structure_meta's cache: v2 reads elements, not species strings ('Li+', dict sites).
STRUCTURE_META_VERSION = "v2"


def structure_meta(cfg: Config, cache: Path, ids: list[str]):
    """DataFrame indexed like ``ids``: group (reduced formula), elements, n_sites, lattice lengths a, b, c."""
    import pandas as pd
    from pymatgen.core import Composition

    from xrdmatch.platform.databases import BadEntry, iter_entries, record_composition

    df = pd.read_parquet(cache) if cache.exists() else None
    if df is None or not {"a", "b", "c", "n_li"} <= set(df.columns):  # (older caches lack a, b, c or n_li)
        rows = []
        # every format the XRD stage reads, entry by entry as it did (a bad entry has no pattern)
        for entry in iter_entries(cfg.database.path, cfg.database.limit):
            if isinstance(entry, BadEntry):
                continue
            rec = {"id": entry.id, "formula": entry.formula, "lattice": entry.lattice, "species": entry.species}
            species = rec.get("species") or []
            try:  # elements, not species strings: 'Li+' is Li, a {'Li': 0.5, 'U': 0.5} site is Li and U
                comp = record_composition(species)
                els, group, n_li = sorted(comp), Composition(comp).reduced_formula, float(comp.get("Li", 0.0))
            except Exception:  # a broken record: never selectable (no elements)
                group, els, n_li = str(rec.get("formula", "")), [], 0.0
            try:
                a, b, c = (float(x) for x in np.linalg.norm(np.asarray(rec.get("lattice"), float), axis=1))
            except Exception:  # a broken lattice: never selectable (infinite cell)
                a = b = c = float("inf")
            rows.append({"id": str(rec.get("id")), "formula": str(rec.get("formula") or group), "group": group,
                         "elements": " ".join(els), "n_sites": len(species), "n_li": n_li, "a": a, "b": b, "c": c})
        df = pd.DataFrame(rows).drop_duplicates("id")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(cache)
    df = df.set_index("id").reindex(ids)
    df["group"] = df["group"].fillna("")
    df["elements"] = df["elements"].fillna("")
    df["n_sites"] = df["n_sites"].fillna(10**9).astype(np.int64)
    df["n_li"] = df["n_li"].fillna(0.0)
    for k in "abc":
        df[k] = df[k].fillna(np.inf)
    return df


def md_cell_atoms(cfg: Config, meta) -> np.ndarray:
    """Atoms of the MD supercell each structure would get (``validation`` section), or a huge
    number where the unit cell is above ``campaign.max_sites_md``, no supercell fits in
    ``validation.max_atoms``, or the cell would hold one Li while verdicts need an error band
    (``verdict_z`` > 0: one ion has no scatter, so its MD is inconclusive whatever it shows):
    the campaign only picks what its MD can take and label."""
    from xrdmatch.simulation.md import ValidationInputError, choose_supercell

    v = cfg.validation
    out = np.full(len(meta), 10**9, dtype=np.int64)
    n_sites = meta["n_sites"].to_numpy()
    n_li = meta["n_li"].to_numpy(float)
    abc = meta[["a", "b", "c"]].to_numpy(float)
    for i in np.flatnonzero(n_sites <= cfg.campaign.max_sites_md):
        if not np.isfinite(abc[i]).all() or (abc[i] <= 0).any():
            continue
        try:
            m = choose_supercell(tuple(abc[i]), int(n_sites[i]), v.min_atoms, v.min_length, v.max_atoms)
        except ValidationInputError:
            continue
        if v.verdict_z > 0 and n_li[i] * m[0] * m[1] * m[2] < 1.5:
            continue
        out[i] = int(n_sites[i]) * m[0] * m[1] * m[2]
    return out


def records_for(cfg: Config, ids: set[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """(records, problems) of a few structures: one streaming pass over the database, in any
    format the XRD stage reads; a bad entry elsewhere in it does not stop the search."""
    from xrdmatch.platform.data import find_records

    return find_records(cfg.database.path, ids, cfg.database.limit)


def labelled_groups(cfg: Config, url: str) -> set[str]:
    """Reduced formulas already labelled: the paper's labels plus every label in the store."""
    from xrdmatch.platform.data import formula_group, load_labelled
    from xrdmatch.platform.labels import list_labels

    return set(load_labelled(cfg.labels.path).groups) | {formula_group(lab.formula) for lab in list_labels(url)}


# --------------------------------------------------------------------------------------
# stages: each returns (result dict, extra rows for the same transaction)
# --------------------------------------------------------------------------------------
def stage_patterns(ctx: Context, rnd: int):
    from xrdmatch.platform.patterns import ERRORS, patterns_dir_for, read_manifest

    t = ctx.patterns()
    ctx.meta()  # builds the structure facts cache the select stage reads
    out = patterns_dir_for(ctx.cfg)
    n_failed = int(read_manifest(out)["totals"]["errors"])  # entries without a pattern: say where they are
    return {"n_patterns": int(len(t.ids)), "db_key": ctx.db_key(),
            "n_md_sized": int((ctx.md_atoms() <= ctx.cfg.validation.max_atoms).sum()),
            "n_failed": n_failed, **({"errors_file": str(out / ERRORS)} if n_failed else {})}, {}


def training_key(cfg: Config, lineage: dict[str, str]) -> str:
    """What decides a round's model: the training code, its labelled and unlabelled data and
    every setting that trains it or scores its champion metric. Members' seeds do not change
    between rounds, so two rounds with the same key would train the same ensemble."""
    import hashlib

    from xrdmatch.training.fingerprint import code_fingerprint

    blob = json.dumps({"code": code_fingerprint(),
                       "labelled": lineage["lineage.labelled_hash"], "unlabelled": lineage["lineage.unlabelled_hash"],
                       "seed": cfg.seed, "training": cfg.training.result_settings(),
                       "labels": cfg.labels.model_dump(mode="json"),
                       "eval": [cfg.campaign.eval_folds, cfg.campaign.eval_iterations, cfg.campaign.eval_ensemble_size],
                       # the served and scored decision rule (the pyfunc's config, the champion metric's calls)
                       "rule": [cfg.tracking.decision_threshold, cfg.evaluation.vote_fraction]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _round_trained_on(ctx: Context, rnd: int, key: str) -> int | None:
    """The earlier round whose ensemble was trained with ``key`` (None: none was)."""
    for r in range(rnd - 1, 0, -1):
        rec = ctx.store.stage(r, "train")
        if rec is not None and rec.status == DONE and (rec.result or {}).get("train_key") == key:
            return int(rec.result.get("reused_from") or r)
    return None


def stage_train(ctx: Context, rnd: int):
    import mlflow

    from xrdmatch.platform.champion import UnscorableVersion, champion_metrics
    from xrdmatch.platform.tracking import lineage_tags
    from xrdmatch.training.dataset import build_training_set, unlabelled_pool
    from xrdmatch.training.ensemble import train_ensemble, unlabelled_subset

    cfg = ctx.cfg
    pt = ctx.patterns()
    ls, weights = build_training_set(cfg, pt)
    weights = np.asarray(weights, dtype=np.float32)
    by_source = dict(Counter(ls.sources))
    pool = unlabelled_pool(pt, ls)  # a structure validated in an earlier round is a label now, not unlabelled
    lineage = {**lineage_tags(ls, unlabelled_subset(pool, cfg.training)), "campaign.id": ctx.store.cid,
               "campaign.round": str(rnd)}
    key = training_key(cfg, lineage)
    src = _round_trained_on(ctx, rnd, key)
    if src is not None:  # no new label since round `src`: retraining would give the same ensemble
        tr = ctx.result(src, "train")
        mlflow.log_metrics({**tr.get("metrics", {}), "n_labelled": len(ls), "n_superionic": int(np.sum(ls.y))})
        mlflow.set_tags({**lineage, "xrdmatch.model_from_round": str(src)})
        return {**tr, "lineage": lineage, "reused_from": src, "train_s": 0.0, "eval_s": 0.0}, {}
    t0 = time.perf_counter()
    # Ray Train keeps its checkpoints under the run dir: a killed round resumes its members
    ens = train_ensemble(ls.X, ls.y, pool, cfg.training, sample_weight=weights,
                         run_dir=ctx.paths.root / "train" / f"round-{rnd:03d}", run_name=f"round{rnd}")
    train_s = time.perf_counter() - t0
    ens.save(ctx.model_dir(rnd))  # atomic (temp folder renamed into place)
    t1 = time.perf_counter()
    try:
        metrics, note = champion_metrics(cfg, ls, weights, pool), None
    except UnscorableVersion as e:
        metrics, note = {}, str(e)
        mlflow.set_tag("xrdmatch.champion_metric", note)
    eval_s = time.perf_counter() - t1
    mlflow.log_metrics({**metrics, "n_labelled": len(ls), "n_superionic": int(np.sum(ls.y)),
                        "train_s": train_s, "champion_eval_s": eval_s})
    mlflow.set_tags(lineage)
    return {"model_dir": str(ctx.model_dir(rnd)), "n_labelled": len(ls), "n_superionic": int(np.sum(ls.y)),
            "by_source": by_source, "labelled_hash": lineage["lineage.labelled_hash"], "train_key": key, "metrics": metrics,
            "lineage": lineage, "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
            **({"metrics_note": note} if note else {})}, {}


def stage_register(ctx: Context, rnd: int):
    from xrdmatch.platform.registry import register_ensemble

    cfg = ctx.cfg
    tr = ctx.result(rnd, "train")
    if tr.get("reused_from"):  # the same ensemble as that round's: its version, not a new one
        import mlflow

        reg = ctx.result(tr["reused_from"], "register")
        mlflow.set_tag("xrdmatch.model_version", str(reg.get("version")))
        return {**reg, "promoted": False, "resumed": False, "reused_from": tr["reused_from"]}, {}
    # registered before a crash (same round run): that version is settled, never a second one
    rv = register_ensemble(cfg, tr["model_dir"], tr.get("metrics", {}), tr.get("lineage", {}),
                           run_id=ctx.round_run_ids.get(rnd))
    return {"name": rv.name, "version": str(rv.version), "aliases": list(rv.aliases), "promoted": bool(rv.promoted),
            "metrics": tr.get("metrics", {}), **({"resumed": True} if rv.resumed else {})}, {}


def _champion(cfg: Config) -> dict[str, Any] | None:
    """The registry's champion: version and the metrics it was registered with (``metric.*`` tags)."""
    from mlflow import MlflowClient

    try:
        mv = MlflowClient().get_model_version_by_alias(cfg.tracking.registry_name, "champion")
    except Exception:
        return None
    metrics: dict[str, float] = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                metrics[k.removeprefix("metric.")] = float(v)
            except ValueError:
                pass
    return {"version": str(mv.version), "run_id": mv.run_id, "metrics": metrics,
            "by_hand": (mv.tags or {}).get("promotion.by_hand.champion")}  # set by `xrdmatch promote`


def stage_screen(ctx: Context, rnd: int):

    from xrdmatch.actors.screening import blocks_of, pool_size, screen, write_scores
    from xrdmatch.platform.progress import progress_bar
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.metrics import vote_threshold

    cfg = ctx.cfg
    pt = ctx.patterns()
    reg, tr = ctx.result(rnd, "register"), ctx.result(rnd, "train")
    src = tr.get("reused_from")
    prev = ctx.store.scores(src) if src else None
    if prev is not None and Path(prev.path).is_file():
        # same model, same patterns: that round's scores, copied (each round owns its file)
        path = ctx.scores_path(rnd)
        tmp = path.with_suffix(".tmp")
        shutil.copyfile(prev.path, tmp)
        tmp.replace(path)
        return ({**ctx.result(src, "screen"), "path": str(path), "reused_from": src},
                {"scores": {"path": str(path), "n": prev.n, "sha256": prev.sha256, "model_version": reg.get("version")}})
    ens = Ensemble.load(tr["model_dir"])
    n = len(pt.ids)
    actors = pool_size(n, cfg.campaign.screen_batch_size, cfg.campaign.screen_actors,
                       cfg.campaign.screen_gpus_per_actor)
    with progress_bar(total=n, desc=f"round {rnd} screen", unit="pattern", disable=not ctx.progress) as bar:
        res = screen(ens, blocks_of(pt.X, cfg.campaign.screen_batch_size), n, actors=actors,
                     gpus_per_actor=cfg.campaign.screen_gpus_per_actor, progress=bar.update,
                     threshold=cfg.tracking.decision_threshold)
    path = ctx.scores_path(rnd)
    sha = write_scores(path, list(pt.ids), list(pt.formulas), res)
    hist, edges = np.histogram(res.p_mean, bins=20, range=(0, 1))
    # the registered model's call (pyfunc_model.decide), not mean p: >= need members with p > threshold
    need = vote_threshold(len(ens.members), cfg.evaluation.vote_fraction)
    result = {"path": str(path), "n": n, "actors": actors, "n_positive": int((res.votes >= need).sum()),
              "votes_needed": need, "members": len(ens.members), "threshold": cfg.tracking.decision_threshold,
              "mean_p": float(res.p_mean.mean()), "mean_spread": float(res.p_std.mean()),
              "histogram": hist.tolist()}
    return result, {"scores": {"path": str(path), "n": n, "sha256": sha, "model_version": reg.get("version")}}


def max_candidate_id() -> int:
    """Characters of the longest id the candidate and job tables hold."""
    from xrdmatch.platform.campaign_store import CandidateRow
    from xrdmatch.platform.queue import JobRow

    return min(CandidateRow.__table__.c.structure_id.type.length, JobRow.__table__.c.structure_id.type.length)


def stage_select(ctx: Context, rnd: int):
    from xrdmatch.actors.screening import read_scores
    from xrdmatch.platform import queue
    from xrdmatch.platform.acquisition import element_matrix, radioactive_elements, select_candidates
    from xrdmatch.platform.data import composition_key
    from xrdmatch.simulation.validate import protocol_hash

    cfg, c = ctx.cfg, ctx.cfg.campaign
    pt = ctx.patterns()
    scores = read_scores(ctx.scores_path(rnd))
    if list(scores["id"]) != [str(i) for i in pt.ids]:
        raise CampaignError(f"round {rnd}: scores {ctx.scores_path(rnd)} do not match the pattern table")
    meta = ctx.meta()
    earlier_cands = [cand for cand in ctx.store.candidates() if cand.round < rnd]
    earlier = [cand.structure_id for cand in earlier_cands]
    budget_left = (c.label_budget - sent_to_md(earlier_cands)) if c.label_budget else c.candidates_per_round
    n = max(0, min(c.candidates_per_round, budget_left))
    presence, vocab = element_matrix([e.split() for e in meta["elements"]])
    forbidden = set(c.forbidden_elements) | (radioactive_elements() if c.exclude_radioactive else set())
    groups = list(meta["group"])
    keys = [composition_key(g) for g in groups]  # compositions compared as integer formulas: 'La0.5Li0.5TiO3' is 'LiLaTi2O6'
    lab_groups = {composition_key(g) for g in labelled_groups(cfg, ctx.url)}
    # validated under this protocol outside this campaign (`validate submit`, another campaign on
    # the store): a pick would return that job's old verdict and spend a slot on no new MD;
    # an inconclusive one's polymorphs are skipped too, as for this campaign's own earlier picks
    finished = queue.finished_under(ctx.url, protocol_hash(cfg.validation))
    done_elsewhere = [sid for sid, _, _ in finished]
    tried_groups = {composition_key(f) for _, f, state in finished if state != "failed"}
    skip = earlier + done_elsewhere
    exclude = np.isin(np.asarray(pt.ids, dtype=object), skip) if skip else None
    # an id the candidate or job table cannot hold would fail this stage on PostgreSQL (SQLite stores it)
    id_limit = max_candidate_id()
    too_long = np.fromiter((len(str(i)) > id_limit for i in pt.ids), bool, len(pt.ids))
    if too_long.any():
        exclude = too_long if exclude is None else exclude | too_long
    sel = select_candidates(
        scores["p_mean"].to_numpy(), scores["p_std"].to_numpy(), pt.X, presence, vocab,
        ctx.md_atoms(), keys, n, strategy=c.acquisition, k=c.ucb_k,
        similarity_threshold=c.similarity_threshold, required=c.required_elements, forbidden=forbidden,
        max_sites=cfg.validation.max_atoms, exclude=exclude, pool=c.candidate_pool,
        # a composition picked in an earlier round (even one MD left inconclusive) is not sent again as a polymorph
        labelled_groups=lab_groups | tried_groups | {composition_key(cand.formula) for cand in earlier_cands if cand.formula},
    )
    cands = []
    for rank, (i, s) in enumerate(zip(sel.indices.tolist(), sel.scores.tolist())):
        cands.append({"rank": rank, "structure_id": str(pt.ids[i]), "formula": groups[i] or str(pt.formulas[i]),
                      "p_mean": float(scores["p_mean"].iat[i]), "p_std": float(scores["p_std"].iat[i]),
                      "score": float(s)})
    # patterns of the picks and of the best-scored structures, for the report
    top = np.argsort(-scores["p_mean"].to_numpy(), kind="stable")[:5]
    keep = list(dict.fromkeys(sel.indices.tolist() + top.tolist()))
    np.savez_compressed(ctx.paths.root / "scores" / f"round-{rnd:03d}-patterns.npz",
                        ids=np.asarray([str(pt.ids[i]) for i in keep]), X=pt.X[keep].astype(np.float32),
                        p_mean=scores["p_mean"].to_numpy()[keep])
    result = {"strategy": c.acquisition, "n_requested": n, "n_eligible": sel.n_eligible,
              "picks": [x["structure_id"] for x in cands], "formulas": [x["formula"] for x in cands],
              "n_labelled_groups": len(lab_groups), "n_validated_elsewhere": len(set(done_elsewhere) - set(earlier)),
              **({"n_id_too_long": int(too_long.sum()), "id_limit": id_limit} if too_long.any() else {})}
    return result, {"candidates": cands}


def stage_validate(ctx: Context, rnd: int):
    from tqdm import tqdm

    from xrdmatch.platform import queue

    cfg = ctx.cfg
    cands = ctx.store.candidates(rnd)
    if not cands:
        return {"jobs": {}, "states": {}}, {}
    recs, problems = records_for(cfg, {c.structure_id for c in cands})
    job_ids: dict[str, int] = {}
    refused: dict[str, str] = {}
    for c in cands:
        rec = recs.get(c.structure_id)
        if rec is None:
            raise CampaignError(f"round {rnd}: structure {c.structure_id} not read from {cfg.database.path}: "
                                f"{problems.get(c.structure_id, 'not found')}")
        try:
            jid = queue.submit(ctx.url, c.structure_id, rec, cfg.validation,
                               priority=len(cands) - c.rank, campaign_round=rnd)
        except queue.QueueError as err:  # MD could only fail it: a failed candidate, not a failed stage
            refused[c.structure_id] = str(err)
            ctx.store.update_candidate(c.structure_id, verdict="failed",
                                       detail={"state": "refused", "error": str(err), "result": None})
            continue
        job_ids[c.structure_id] = int(jid)
        if c.job_id != str(jid):
            ctx.store.update_candidate(c.structure_id, job_id=str(jid))

    def mine():
        return {j.id: j for j in queue.list_jobs(ctx.url) if j.id in set(job_ids.values())}

    errors: list[BaseException] = []
    # the workers run in a thread: a stop of this one (Ctrl-C, SIGTERM) tells them to hand their
    # jobs back, as `validate work` does, instead of dying with the interpreter, jobs leased
    stop = threading.Event()

    def work() -> None:
        try:
            queue.run_workers(cfg, cfg.validation.workers, until_empty=True, stop=stop)
        except BaseException as e:  # reported by the waiting loop
            errors.append(e)

    jobs = mine()
    worker = None
    if any(j.state not in queue.FINISHED for j in jobs.values()):
        worker = threading.Thread(target=work, name="validation-workers", daemon=True)
        worker.start()
    try:
        t0 = time.monotonic()
        shown = None  # redraw only on a change: in a log file (no TTY) every redraw is a line
        with tqdm(total=len(job_ids), desc=f"round {rnd} validate", unit="job", disable=not ctx.progress) as bar:
            while True:
                jobs = mine()
                done = sum(j.state in queue.FINISHED for j in jobs.values())
                running = [j for j in jobs.values() if j.state == "running"]
                prog = (running[0].progress or {}) if running else {}
                text = f"{running[0].structure_id} {prog.get('stage', '')} {prog.get('T', '')}".strip() if running else ""
                if (done, text) != shown:
                    bar.n = done
                    bar.set_postfix_str(text, refresh=False)
                    bar.refresh()
                    shown = (done, text)
                if done == len(job_ids):
                    break
                if worker is not None and not worker.is_alive():
                    if errors:
                        raise CampaignError(f"round {rnd}: validation workers failed: {errors[0]!r}") from errors[0]
                    # workers stopped (queue looked empty: a job held by a dead worker's lease); go again
                    worker = threading.Thread(target=work, name="validation-workers", daemon=True)
                    time.sleep(cfg.campaign.poll_s)
                    worker.start()
                if cfg.campaign.validation_timeout_s and time.monotonic() - t0 > cfg.campaign.validation_timeout_s:
                    raise CampaignError(f"round {rnd}: no verdicts after {cfg.campaign.validation_timeout_s} s; "
                                        f"jobs {sorted(job_ids.values())} (see `xrdmatch validate status`)")
                time.sleep(cfg.campaign.poll_s)
    finally:
        stop.set()
        if worker is not None:
            worker.join(timeout=60)
    setup = [j.error for j in jobs.values() if j.state == "failed" and (j.error or "").startswith("CalculatorUnavailable")]
    if job_ids and len(setup) == len(job_ids):  # the setup, not the structures: no verdict, no budget spent
        raise CampaignError(f"round {rnd}: every MD job failed because the calculator cannot be used: {setup[0]}; "
                            "fix the setup, then `xrdmatch validate requeue --state failed` and run the campaign again")
    states: dict[str, str] = {sid: "refused" for sid in refused}
    for sid, jid in job_ids.items():
        j = jobs[jid]
        states[sid] = j.state
        ctx.store.update_candidate(sid, verdict=j.verdict or j.state,
                                   sigma_300k=j.sigma_300 if j.state == "done" else None,  # inconclusive: no sigma
                                   detail={"state": j.state, "error": j.error, "result": j.result})
    verdicts = {**{sid: "failed" for sid in refused},
                **{sid: (jobs[jid].verdict or jobs[jid].state) for sid, jid in job_ids.items()}}
    return {"jobs": {k: int(v) for k, v in job_ids.items()}, "states": states, "verdicts": verdicts,
            **({"refused": refused} if refused else {})}, {}


def stage_label(ctx: Context, rnd: int):
    import mlflow

    from xrdmatch.platform.labels import list_labels

    # this round's new labels are the verdicts of this round's MD jobs (one per candidate), not
    # every stored label of a candidate (an imported measurement of it is no verdict of ours)
    cands = ctx.store.candidates(rnd)
    jobs = {c.job_id for c in cands if c.job_id}
    labels = list_labels(ctx.url)
    mine = [lab for lab in labels if lab.job_id is not None and str(lab.job_id) in jobs]
    by_method = dict(Counter(lab.method for lab in labels))
    all_jobs = {c.job_id for c in ctx.store.candidates() if c.job_id}
    total_validated = len({lab.structure_id for lab in labels if lab.job_id is not None and str(lab.job_id) in all_jobs})
    n_super = sum(lab.label == 1 for lab in mine)
    mlflow.log_metrics({"new_labels": len(mine), "new_superionic": n_super, "validated_total": total_validated,
                        "candidates": len(cands)})
    return {"new_labels": len(mine), "new_superionic": n_super, "validated_total": total_validated,
            "labels_by_method": by_method,
            "labels": {lab.structure_id: {"label": lab.label, "sigma_300": lab.sigma_300} for lab in mine}}, {}


STAGE_FUNCS: dict[str, Callable] = {
    "patterns": stage_patterns, "train": stage_train, "register": stage_register, "screen": stage_screen,
    "select": stage_select, "validate": stage_validate, "label": stage_label,
}


def summary_line(rnd: int, stage: str, result: dict[str, Any], seconds: float) -> str:
    """One line per finished stage."""
    r = result or {}
    what = {
        "patterns": lambda: f"{r.get('n_patterns')} patterns ({r.get('n_md_sized')} small enough for MD)"
                            + (f"; {r['n_failed']} entries failed, see {r.get('errors_file')}" if r.get("n_failed") else ""),
        "train": lambda: (f"no new label since round {r['reused_from']}: its ensemble is this round's; "
                          if r.get("reused_from") else "")
                         + (f"{r.get('n_labelled')} labels {r.get('by_source')}; "
                          + (", ".join(f"{k.removeprefix('grouped_cv_')} {v:.3f}" for k, v in
                                       (r.get("metrics") or {}).items() if k.endswith(("macro_f1", "pr_auc")))
                             or r.get("metrics_note") or "no champion metric (campaign.eval_folds = 0)")),
        "register": lambda: f"{r.get('name')} v{r.get('version')}" + (" -> champion" if r.get("promoted") else "")
                            + (f" (round {r['reused_from']}'s, not registered again)" if r.get("reused_from") else ""),
        "screen": lambda: (f"round {r['reused_from']}'s scores (same model and patterns): " if r.get("reused_from")
                           else "")
                          + f"{r.get('n')} scored on {r.get('actors')} actors, {r.get('n_positive')} called superionic"
                          + (f" (>= {r['votes_needed']} of {r['members']} members with p > {r['threshold']:g})"
                             if "votes_needed" in r else " (mean p > 0.5)"),
        "select": lambda: f"{len(r.get('picks', []))} picks ({r.get('strategy')}, {r.get('n_eligible')} eligible): "
                          + ", ".join(r.get("formulas", []))
                          + (f"; {r['n_id_too_long']} ids longer than the store's {r.get('id_limit')} characters "
                             "skipped" if r.get("n_id_too_long") else ""),
        "validate": lambda: ", ".join(f"{k}: {v}" for k, v in (r.get("verdicts") or {}).items()) or "nothing to validate",
        "label": lambda: f"{r.get('new_labels')} new labels ({r.get('new_superionic')} superionic), "
                         f"{r.get('validated_total')} validated in total",
    }[stage]()
    return f"round {rnd} {stage:<9} done in {seconds:7.1f} s: {what}"


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def _start_parent_run(ctx: Context):
    import mlflow

    from xrdmatch.platform.tracking import base_tags, configure, log_params_flat

    configure(ctx.cfg)
    row = ctx.store.campaign()
    if row is not None and row.mlflow_run_id:
        return mlflow.start_run(run_id=row.mlflow_run_id)
    # a run started by a process killed before the store learnt its id: reopen it, not a second one
    found = _tagged_run(ctx.cfg, {"xrdmatch.kind": "campaign", "xrdmatch.campaign_id": ctx.store.cid})
    run = mlflow.start_run(run_id=found) if found else mlflow.start_run(
        run_name=f"campaign-{ctx.paths.root.name}",
        tags=base_tags() | {"xrdmatch.kind": "campaign", "xrdmatch.campaign_id": ctx.store.cid,
                            "xrdmatch.run_dir": str(ctx.paths.root)})
    ctx.store.set_campaign(mlflow_run_id=run.info.run_id)
    try:
        log_params_flat(ctx.cfg)  # a reopened run takes the same values again
    except mlflow.exceptions.MlflowException as err:  # it logged other ones (the config changed): keep those
        log.warning("campaign run %s keeps the params it was started with (%s)", run.info.run_id,
                    str(err).splitlines()[0])
    return run


def _tagged_run(cfg: Config, tags: dict[str, str]) -> str | None:
    from xrdmatch.platform.tracking import runs_tagged

    runs = runs_tagged(cfg, tags, max_results=1)
    return runs[0].info.run_id if runs else None


def _start_round_run(ctx: Context, rnd: int):
    import mlflow

    row = next((r for r in ctx.store.rounds() if r.round == rnd), None)
    tags = {"xrdmatch.kind": "campaign-round", "xrdmatch.campaign_id": ctx.store.cid, "xrdmatch.round": str(rnd)}
    if row is not None and row.mlflow_run_id:
        run = mlflow.start_run(run_id=row.mlflow_run_id, nested=True)
    elif found := _tagged_run(ctx.cfg, tags):  # started by a process killed before the store learnt its id
        run = mlflow.start_run(run_id=found, nested=True)
        ctx.store.set_round(rnd, mlflow_run_id=run.info.run_id)
    else:
        run = mlflow.start_run(run_name=f"round-{rnd}", nested=True, tags=tags)
        ctx.store.set_round(rnd, mlflow_run_id=run.info.run_id)
    ctx.round_run_ids[rnd] = run.info.run_id
    return run


def sent_to_md(cands) -> int:
    """Candidates that reached the MD queue (have a job): what ``campaign.label_budget`` counts.
    One the queue refused (a ``failed`` candidate without a job) cost no MD."""
    return sum(c.job_id is not None for c in cands)


def should_stop(ctx: Context, rnd: int) -> str | None:
    """Why no round ``rnd`` should start (None: go on)."""
    c = ctx.cfg.campaign
    if rnd > c.rounds:
        return f"{c.rounds} rounds done"
    if c.label_budget is not None and sent_to_md(ctx.store.candidates()) >= c.label_budget:
        return f"label budget of {c.label_budget} used"
    if rnd > 1:
        prev = ctx.store.stage(rnd - 1, "select")
        if prev and prev.status == DONE and not (prev.result or {}).get("picks"):
            return f"round {rnd - 1} found no eligible candidate"
    return None


def run_campaign(cfg: Config, run_dir: str | None = None, *, echo: Callable[[str], None] = print,
                 progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the campaign of ``cfg`` in ``run_dir``; returns stage timings."""
    import mlflow

    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.lock import RunDirLock
    from xrdmatch.platform.ray_utils import init_ray

    if run_dir:
        cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    paths = RunPaths.of(cfg.run_dir)
    cfg = cfg.model_copy(update={"run_dir": str(paths.root)})
    with RunDirLock(paths.lock_file):
        cid = campaign_id_for(paths.root)
        url = store_url(cfg)
        store = CampaignStore(url, cid)
        row = store.ensure_campaign(str(paths.root), redacted_dump(cfg))  # no password in the store
        if json.loads(row.config_json) != redacted_dump(cfg):
            echo(f"warning: {paths.root} was started with another config; finished stages keep their results")
        ctx = Context(cfg, paths, store, url, echo=echo, progress=progress)
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        t_start = time.perf_counter()
        resumed = [s for s in store.stages() if s.status in (RUNNING, FAILED)]
        if resumed:
            s = resumed[0]
            echo(f"resuming {paths.root} at round {s.round} stage {s.stage} (was {s.status}, attempt {s.attempts})")
        stop = None
        with _start_parent_run(ctx):
            rnd = 1
            while True:
                started = any(r.round == rnd for r in store.rounds())
                stop = None if started else should_stop(ctx, rnd)
                if stop:
                    break
                store.ensure_round(rnd)
                with _start_round_run(ctx, rnd):
                    for stage in STAGES:
                        rec = store.stage(rnd, stage)
                        if rec is not None and rec.status == DONE:
                            continue
                        store.start_stage(rnd, stage)
                        t0 = time.perf_counter()
                        try:
                            result, extra = STAGE_FUNCS[stage](ctx, rnd)
                        except BaseException as e:
                            store.fail_stage(rnd, stage, f"{type(e).__name__}: {e}")
                            raise
                        dt = time.perf_counter() - t0
                        store.finish_stage(rnd, stage, result, dt, **extra)
                        mlflow.log_metric(f"stage_{stage}_s", dt)
                        echo(summary_line(rnd, stage, result, dt))
                store.set_round(rnd, status=DONE, finished_at=_utcnow())
                rnd += 1
            store.set_campaign(status=DONE)
        timings = stage_timings(store)
        echo(f"campaign finished ({stop}); this invocation took {time.perf_counter() - t_start:.1f} s")
        return timings


def _utcnow():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).replace(tzinfo=None)


def stage_timings(store: CampaignStore) -> dict[str, Any]:
    per: dict[str, float] = {}
    rows = []
    for s in store.stages():
        if s.status == DONE and s.duration_s is not None:
            per[s.stage] = per.get(s.stage, 0.0) + s.duration_s
            rows.append({"round": s.round, "stage": s.stage, "seconds": round(s.duration_s, 2)})
    return {"per_stage": per, "rows": rows, "total_s": sum(per.values())}
