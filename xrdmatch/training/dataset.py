"""The training set: the paper's labelled patterns plus validated labels from the label store.

Each label source gets the weight ``cfg.labels.source_weights[source]`` (0 or a missing key
excludes it). A validated structure needs its pattern: looked up by id in the PatternTable of
the XRD stage, else computed from the structure stored with the label (a structure submitted
from a file); labels with neither are skipped with a warning naming them.
When a structure has several labels, the newest one from a source of positive weight counts
(the store lists oldest first; the labels file is older than any of them).
"""

from __future__ import annotations

import logging

import numpy as np

from xrdmatch.config import Config
from xrdmatch.platform.data import LabelledDataError, LabelledSet, composition_key, formula_group, load_labelled

log = logging.getLogger(__name__)


def _store_labels(cfg: Config) -> list:
    try:
        from xrdmatch.platform.labels import list_labels
    except ImportError:  # label store not installed in this build
        return []
    from xrdmatch.platform.db import store_url

    return list_labels(store_url(cfg))


def _record_pattern(rec) -> np.ndarray | None:
    """The XRD stage's pattern of a label's stored structure (shipped record format), or None."""
    from xrdmatch.simulation.xrd import xrd_pattern_arrays

    r = rec.record or {}
    try:
        return np.asarray(xrd_pattern_arrays(r["lattice"], r["species"], r["frac_coords"]), np.float32)
    except Exception as err:  # noqa: BLE001 - no structure, or one the engine cannot use
        if r:
            log.warning("label of %s: no pattern from its stored structure (%s)", rec.structure_id, err)
        return None


def build_training_set(cfg: Config, patterns=None) -> tuple[LabelledSet, np.ndarray]:
    """(LabelledSet with ``sources``, per-sample weights) for ``train_ensemble``.

    One row per structure: its newest label from a source of positive weight, the labels file
    counting as the oldest. So a store label on a compound of the labels file replaces the
    file's label (that compound keeps its own pattern and group), and with ``paper: 0`` such a
    compound is still trained on through its store label. A store label of another structure
    joins the group of the file's compound of the same composition (``composition_key``), so
    the two never straddle a grouped split."""
    weight = lambda source: cfg.labels.source_weights.get(source, 0.0)  # noqa: E731
    paper = load_labelled(cfg.labels.path)
    newest: dict[str, object] = {}
    for rec in _store_labels(cfg):
        if weight(rec.method) > 0:  # an excluded source hides no other label
            newest[str(rec.structure_id)] = rec  # later records win
    paper_ids = set(paper.ids)
    keep = [i for i, (sid, src) in enumerate(zip(paper.ids, paper.sources)) if sid in newest or weight(src) > 0]
    base = paper.subset(keep)
    for i, sid in enumerate(base.ids):  # the store's newer label of a file compound
        if sid in newest:
            base.y[i], base.sources[i], base.conductivity[i] = int(newest[sid].label), newest[sid].method, np.nan
    group_of = {composition_key(f): g for f, g in zip(paper.formulas, paper.groups)}
    row_of = {sid: i for i, sid in enumerate(patterns.ids)} if patterns is not None else {}
    ids, formulas, groups, ys, Xs, sources, missing = [], [], [], [], [], [], []
    for sid, rec in newest.items():
        if sid in paper_ids:
            continue
        if sid in row_of:
            x = patterns.X[row_of[sid]]
        else:  # not in the database (`validate submit FILE.cif`): the pattern of the label's own structure
            x = _record_pattern(rec)
            if x is None:
                missing.append(sid)
                continue
        ids.append(sid)
        formulas.append(rec.formula)
        groups.append(group_of.get(composition_key(rec.formula), formula_group(rec.formula)))
        ys.append(int(rec.label))
        Xs.append(x)
        sources.append(rec.method)
    if missing:
        log.warning("%d labels have no pattern (not in the XRD table, no structure stored) and are skipped: %s",
                    len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if ids:
        base = LabelledSet(
            ids=base.ids + ids,
            formulas=base.formulas + formulas,
            groups=base.groups + groups,
            conductivity=np.concatenate([base.conductivity, np.full(len(ids), np.nan)]),
            y=np.concatenate([base.y, np.asarray(ys, dtype=np.int64)]),
            X=np.concatenate([base.X, np.asarray(Xs, dtype=np.float32)]),
            sources=base.sources + sources,
        )
    if len(base) == 0:
        raise LabelledDataError("no labelled data left: labels.source_weights gives every label weight 0")
    weights = np.asarray([weight(s) for s in base.sources], dtype=np.float32)
    return base, weights


def unlabelled_pool(patterns, labelled: LabelledSet) -> np.ndarray:
    """The database patterns minus those of labelled structures (a validated structure is a label,
    not also an unlabelled pattern); the members' unlabelled set is drawn from it."""
    known = set(labelled.ids)
    keep = np.flatnonzero([i not in known for i in patterns.ids])
    return patterns.X[keep] if len(keep) < len(patterns.ids) else patterns.X
