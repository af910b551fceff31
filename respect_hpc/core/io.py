"""Safe writing and reading back of a run's files: atomic writes, the metadata outputs carry, and whether a
saved adapter folder is whole.

Writes are atomic: a file appears complete under its final name or not at all (a temporary name in the
same folder, then a rename), so a crash never leaves a half-written output behind. Every table records
its schema version and, where a stage made it, the hash of the spec that made it (see hashing.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import polars as pl

SCHEMA_VERSION = 1
# Metadata key of an output table: the hash of the spec that made it (see hashing.py).
SPEC_HASH_KEY = "respect_hpc.spec_hash"


def atomic_write_parquet(frame: pl.DataFrame, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``frame`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.write_parquet(tmp, metadata={"respect_hpc.schema_version": str(SCHEMA_VERSION), **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_copy_tree(source: str | Path, target: str | Path) -> Path:
    """Copy a folder to ``target``, replacing what is there by renames (never a half-copied folder)."""
    target = Path(target)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def parquet_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata a table was written with; {} for a file that is not a readable Parquet file
    (truncated, say), so that the output counts as not done and its stage makes it again."""
    try:
        return pl.read_parquet_metadata(path)
    except Exception:  # polars raises ComputeError, OSError... for damaged files
        return {}


def adapter_problem(folder: Path) -> str | None:
    """What is wrong with a saved adapter folder (missing or truncated files), or None; reads headers only."""
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        json.loads(config.read_text())
        with weights.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError as exc:
        return f"'{exc.filename}' is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"'{config}' or '{weights}' is unreadable"
    if weights.stat().st_size != 8 + size + end:
        return f"'{weights}' is truncated or damaged ({weights.stat().st_size} bytes, its header says {8 + size + end})"
    return None
