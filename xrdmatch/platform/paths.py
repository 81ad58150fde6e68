"""Where each stage keeps its files inside a run directory.

One run directory holds one campaign: patterns cache, campaign store (SQLite),
MLflow store, models and MD trajectories. Two run directories never share state.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def database_key(db_path: str | os.PathLike[str], limit: int | None = None) -> str:
    """A short key for a database source (its content and the limit) naming its cache folders.

    Keyed on the bytes, not the name or size: another database under the same name, or one
    edited in place, must never be served the patterns of the first (a folder of structure
    files hashes the name and bytes of every file the reader reads).
    """
    p = Path(db_path).resolve()
    digest = _content_digest(p) if p.is_file() else _folder_digest(p)
    h = hashlib.sha1(f"{digest}|{limit}".encode()).hexdigest()[:10]
    stem = p.name.split(".")[0]
    return f"{stem}-{h}"


def _folder_digest(p: Path) -> str:
    from xrdmatch.platform.databases import folder_files  # exactly the files the reader reads

    h = hashlib.sha1()
    for f in folder_files(p):
        h.update(f"{f.relative_to(p)}|{_content_digest(f)}\n".encode("utf-8", "surrogateescape"))  # any file name
    return h.hexdigest()


def _content_digest(p: Path) -> str:
    st = p.stat()
    return _digest_of(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of a file's bytes, computed once per (path, size, mtime) in a process."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str]) -> "RunPaths":
        root = Path(run_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def patterns_dir(self, db_key: str) -> Path:
        return self.root / "patterns" / db_key

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root / 'store.db'}"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def md_dir(self) -> Path:
        return self.root / "md"

    @property
    def lock_file(self) -> Path:
        return self.root / "campaign.lock"
