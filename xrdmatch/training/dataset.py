"""The training set: the paper's labelled patterns plus validated labels from the label store.

Each label source gets the weight ``cfg.labels.source_weights[source]`` (0 or a missing key
excludes it). A validated structure needs its pattern: looked up by id in the PatternTable of
the XRD stage; labels whose pattern is missing are skipped with a warning naming them.
When a structure has several labels, the newest one from a source of positive weight counts
(the store lists oldest first).
"""

from __future__ import annotations

import logging

import numpy as np

from xrdmatch.config import Config
from xrdmatch.platform.data import LabelledSet, formula_group, load_labelled

log = logging.getLogger(__name__)


def _store_labels(cfg: Config) -> list:
    try:
        from xrdmatch.platform.labels import list_labels
    except ImportError:  # label store not installed in this build
        return []
    from xrdmatch.platform.db import store_url

    return list_labels(store_url(cfg))


def build_training_set(cfg: Config, patterns=None) -> tuple[LabelledSet, np.ndarray]:
    """(LabelledSet with ``sources``, per-sample weights) for ``train_ensemble``."""
    weights_by_source = cfg.labels.source_weights
    paper = load_labelled(cfg.labels.path)
    newest: dict[str, object] = {}
    for rec in _store_labels(cfg):
        if weights_by_source.get(rec.method, 0.0) > 0:  # an excluded source hides no other label
            newest[str(rec.structure_id)] = rec  # later records win
    row_of = {sid: i for i, sid in enumerate(patterns.ids)} if patterns is not None else {}
    ids, formulas, groups, ys, Xs, sources, missing = [], [], [], [], [], [], []
    paper_ids = set(paper.ids)
    for sid, rec in newest.items():
        if sid in paper_ids:
            continue
        if sid not in row_of:
            missing.append(sid)
            continue
        ids.append(sid)
        formulas.append(rec.formula)
        groups.append(formula_group(rec.formula))
        ys.append(int(rec.label))
        Xs.append(patterns.X[row_of[sid]])
        sources.append(rec.method)
    if missing:
        log.warning("%d validated labels have no pattern in the XRD table and are skipped: %s",
                    len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    keep = np.flatnonzero([weights_by_source.get(s, 0.0) > 0 for s in paper.sources])
    base = paper.subset(keep)
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
        raise ValueError("build_training_set: no labelled data left (check labels.source_weights)")
    weights = np.asarray([weights_by_source.get(s, 0.0) for s in base.sources], dtype=np.float32)
    return base, weights


def unlabelled_pool(patterns, labelled: LabelledSet) -> np.ndarray:
    """The database patterns minus those of labelled structures (a validated structure is a label,
    not also an unlabelled pattern); the members' unlabelled set is drawn from it."""
    known = set(labelled.ids)
    keep = np.flatnonzero([i not in known for i in patterns.ids])
    return patterns.X[keep] if len(keep) < len(patterns.ids) else patterns.X
