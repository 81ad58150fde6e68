"""A hash of the code that decides a trained member's predictions.

Cached member predictions and reused ensembles are keyed on their data, settings and seeds; this
adds the code, so that a result computed by an older trainer, augmentation, network or
preprocessing is never reused as if the current code had produced it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    from xrdmatch.training import augment, networks, preprocess, trainer

    h = hashlib.sha256()
    for module in (augment, networks, preprocess, trainer):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]
