"""Where each stage keeps its files inside a run directory.

One run directory holds one campaign: patterns cache, campaign store (SQLite),
MLflow store, models and MD trajectories. Two run directories never share state.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def database_key(db_path: str | os.PathLike[str], limit: int | None = None) -> str:
    """A stable short key for a database source (path, size, mtime, limit) for cache folders."""
    p = Path(db_path).resolve()
    st = p.stat()
    size = st.st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    h = hashlib.sha1(f"{p.name}|{size}|{limit}".encode()).hexdigest()[:10]
    stem = p.name.split(".")[0]
    return f"{stem}-{h}"


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
