"""Shared fixtures. Tests use the real shipped data, real pymatgen, real Ray (local)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def labelled_csv() -> Path:
    return DATA / "xrdmatch_lbs.csv"


@pytest.fixture(scope="session")
def database_path() -> Path:
    return DATA / "mp_li_structures.jsonl.xz"


@pytest.fixture(scope="session")
def labelled(labelled_csv):
    from xrdmatch.platform.data import load_labelled

    return load_labelled(labelled_csv)
