"""The XRD stage's output format, and how other stages read it.

Layout of a patterns folder (written by :mod:`xrdmatch.platform.xrd_stage`)::

    manifest.json                 source, engine version, batch size, shards, totals, done flag
    shards/part-000000.parquet    id, formula, pattern (fixed-size list of 4501 float32)
    errors/part-000000.parquet    id, reason, batch (only for batches with bad entries)
    errors.parquet                every error row (consolidated when the run is done)

Shard ``k`` holds the good entries of database batch ``k`` (entries ``[k*B, (k+1)*B)``);
its Parquet key-value metadata records the batch's counts, so a shard file is its own
proof of completion.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xrdmatch import N_BINS

if TYPE_CHECKING:
    import pyarrow as pa

    from xrdmatch.config import Config

MANIFEST = "manifest.json"
SHARDS = "shards"
ERRORS_DIR = "errors"
ERRORS = "errors.parquet"
META_KEY = b"xrdmatch"
#: Patterns are ~96% zeros: plain zstd (no dictionary on the pattern column) gave the smallest
#: and fastest-to-write shards of the codecs tried (~0.4 MB and ~40 ms per 500 patterns).
COMPRESSION = "zstd"


class PatternsError(RuntimeError):
    """A patterns folder that is missing, unfinished, or inconsistent; names the folder."""


@dataclass
class PatternTable:
    """Patterns of a database, rows aligned: ``X[i]`` is the pattern of ``ids[i]``."""

    ids: list[str]
    formulas: list[str]
    X: np.ndarray  # float32 (n, 4501)

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------- layout


def shard_path(out_dir: str | os.PathLike[str], k: int) -> Path:
    return Path(out_dir) / SHARDS / f"part-{k:06d}.parquet"


def errors_part_path(out_dir: str | os.PathLike[str], k: int) -> Path:
    return Path(out_dir) / ERRORS_DIR / f"part-{k:06d}.parquet"


def shard_index(path: Path) -> int | None:
    name = path.name
    if name.startswith("part-") and name.endswith(".parquet"):
        try:
            return int(name[5:-8])
        except ValueError:
            return None
    return None


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PatternsError(f"{p}: unreadable manifest ({e})") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then os.replace (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, ``path`` a folder...: no temp file left behind
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- encoding


def _schema_meta(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {META_KEY: json.dumps(meta).encode()}


def encode_shard(ids: list[str], formulas: list[str], X: np.ndarray, meta: dict[str, Any]) -> bytes:
    """Parquet bytes of one shard: id, formula, pattern (fixed-size list<float32>[4501])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = np.ascontiguousarray(X, dtype=np.float32).reshape(len(ids), N_BINS)
    patterns = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), type=pa.float32()), N_BINS)
    table = pa.table(
        {"id": pa.array(ids, pa.string()), "formula": pa.array(formulas, pa.string()), "pattern": patterns}
    ).replace_schema_metadata(_schema_meta(meta))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION, use_dictionary=["id", "formula"])
    return buf.getvalue()


def encode_errors(ids: list[str], reasons: list[str], batch: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "batch": pa.array([batch] * len(ids), pa.int64()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION)
    return buf.getvalue()


def decode_shard(data: bytes) -> "PatternTable":
    import pyarrow.parquet as pq

    return _table_to_patterns(pq.read_table(io.BytesIO(data)))


def decode_errors(data: bytes | None) -> tuple[list[str], list[str]]:
    """(ids, reasons) of an errors part's bytes (None: no errors)."""
    import pyarrow.parquet as pq

    if data is None:
        return [], []
    t = pq.read_table(io.BytesIO(data), columns=["id", "reason"])
    return t.column("id").to_pylist(), t.column("reason").to_pylist()


def shard_meta(path: Path) -> dict[str, Any] | None:
    """The batch counts stored in a shard's footer, or None if the file is not a valid shard."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - a torn/foreign file is just "not done"
        return None
    raw = (md.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    meta = json.loads(raw)
    meta["rows"] = md.num_rows
    return meta


def _table_to_patterns(table: "pa.Table") -> PatternTable:
    col = table.column("pattern").combine_chunks()
    values = col.flatten() if hasattr(col, "flatten") else col.values
    X = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, N_BINS)
    return PatternTable(
        ids=table.column("id").to_pylist(), formulas=table.column("formula").to_pylist(), X=X
    )


# ----------------------------------------------------------------------------- reading


def _finished_shards(out_dir: Path) -> list[Path]:
    man = read_manifest(out_dir)
    if man is None:
        raise PatternsError(f"{out_dir}: no patterns here (no {MANIFEST}); run `xrdmatch xrd` first")
    if not man.get("done"):
        raise PatternsError(
            f"{out_dir}: the XRD stage has not finished ({man.get('totals', {}).get('shards', 0)} shards so far); "
            "rerun the same `xrdmatch xrd` command to finish it"
        )
    shards = [out_dir / s["file"] for s in sorted(man["shards"], key=lambda s: s["index"])]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise PatternsError(f"{out_dir}: manifest lists shards that are missing: {missing[:3]}")
    return shards


def iter_pattern_batches(out_dir: str | os.PathLike[str]) -> Iterator[PatternTable]:
    """One PatternTable per shard, in database order: for tables too large for memory."""
    import pyarrow.parquet as pq

    for s in _finished_shards(Path(out_dir)):
        yield _table_to_patterns(pq.read_table(s))


def load_patterns(out_dir: str | os.PathLike[str]) -> PatternTable:
    """Every pattern of a finished patterns folder, in database order."""
    ids: list[str] = []
    formulas: list[str] = []
    parts: list[np.ndarray] = []
    for t in iter_pattern_batches(out_dir):
        ids += t.ids
        formulas += t.formulas
        parts.append(t.X)
    X = np.concatenate(parts) if parts else np.zeros((0, N_BINS), np.float32)
    return PatternTable(ids=ids, formulas=formulas, X=X)


def load_ids(out_dir: str | os.PathLike[str]) -> list[str]:
    """The ids of a finished patterns folder (the id column only: cheap next to the patterns)."""
    import pyarrow.parquet as pq

    return [i for s in _finished_shards(Path(out_dir)) for i in pq.read_table(s, columns=["id"]).column("id").to_pylist()]


def load_errors(out_dir: str | os.PathLike[str]):
    """The errors table (pandas: id, reason, batch) of a patterns folder; empty if none."""
    import pandas as pd
    import pyarrow.parquet as pq

    out = Path(out_dir)
    if (out / ERRORS).is_file():
        return pq.read_table(out / ERRORS).to_pandas()
    parts = sorted((out / ERRORS_DIR).glob("part-*.parquet")) if (out / ERRORS_DIR).is_dir() else []
    if parts:
        return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    return pd.DataFrame({"id": pd.Series(dtype=str), "reason": pd.Series(dtype=str), "batch": pd.Series(dtype="int64")})


def patterns_dir_for(cfg: "Config") -> Path:
    """Where the patterns of ``cfg.database`` live inside ``cfg.run_dir`` (the stage's cache)."""
    from xrdmatch.config import resolve_path
    from xrdmatch.platform.paths import RunPaths, database_key

    return RunPaths.of(cfg.run_dir).patterns_dir(database_key(resolve_path(cfg.database.path), cfg.database.limit))


def ensure_patterns(cfg: "Config", progress: bool = True) -> PatternTable:
    """Patterns of ``cfg.database``: computed (resumably) into the run's cache when missing or unfinished."""
    from xrdmatch.config import resolve_path
    from xrdmatch.platform.xrd_stage import run_xrd_stage

    out = patterns_dir_for(cfg)
    # Cheap when the cache is complete and was made by the current engine (no Ray started).
    summary = run_xrd_stage(
        resolve_path(cfg.database.path),
        out,
        workers=cfg.xrd.workers,
        batch_size=cfg.xrd.batch_size,
        limit=cfg.database.limit,
        progress=progress,
        max_retries=cfg.xrd.max_retries,
        ray_address=cfg.ray.address,
        num_cpus=cfg.ray.num_cpus,
        restart_incompatible=True,
    )
    if not summary.done:
        why = "; ".join(f"batch {k}: {msg}" for k, msg in sorted(summary.failed_batches.items())[:3])
        raise PatternsError(f"{out}: XRD stage did not finish: {summary.line()}" + (f" ({why})" if why else ""))
    if summary.patterns == 0:  # nothing to screen or to learn from: as `xrdmatch xrd` says
        why = (f"all {summary.entries} entries failed (see {out / ERRORS})" if summary.entries
               else f"{cfg.database.path} has no entries")
        raise PatternsError(f"database.path {cfg.database.path}: no pattern was computed: {why}")
    return load_patterns(out)
