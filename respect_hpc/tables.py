"""Schemas of the project's tables and their safe writing.

Every stage reads and writes Parquet tables; this module names their columns
once. Writes are atomic: a table appears complete under its final name or not
at all, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import polars as pl

SCHEMA_VERSION = 1
# Metadata key of an output table: the hash of the spec that made it (see hashing.py).
SPEC_HASH_KEY = "respect_hpc.spec_hash"

_STR_LIST = pl.List(pl.String)

# One row per game: the normalised form of both public layouts.
INTERACTIONS = pl.Schema({
    "game_id": pl.String,
    "round": pl.Int64,
    "policy": pl.String,
    "speaker": pl.String,        # hashed speaker id, "h:<16 hex>"
    "date": pl.String,
    "dataset_alias": pl.String,
    "context": _STR_LIST,        # image names in the listener's order (A, B, ...)
    "targets": _STR_LIST,
    "chat": _STR_LIST,           # speaker utterances, one per turn
    "clicks": pl.List(_STR_LIST),  # the selection after each turn
    "prob_action": pl.List(pl.Float64),  # p of each action when the policy acted; nulls if unlogged
    "success": pl.Boolean,
    "num_turns": pl.Int64,
})

# One row per logged action.
TURNS = pl.Schema({
    "game_turn_id": pl.String,   # "<game_id>_<turn_id>"
    "game_id": pl.String,
    "turn_id": pl.Int64,         # 0-based position in the game
    "round": pl.Int64,
    "policy": pl.String,
    "context": _STR_LIST,
    "targets": _STR_LIST,
    "chats": _STR_LIST,          # utterances up to and including this turn
    "utterance": pl.String,
    "currently_selected": _STR_LIST,  # before the action
    "selected": _STR_LIST,
    "deselected": _STR_LIST,
    "action": pl.String,         # canonical action text in listener letters
    "previous_action": pl.String,  # null on a game's first turn
    "follow_up": pl.String,      # the next utterance, "" on the last turn
    "has_follow_up": pl.Boolean,  # False on a game's last action: no feedback to decode
    "prob_action": pl.Float64,
    "game_success": pl.Boolean,
})

# Rows refused at ingest, kept aside with the reason instead of being dropped.
QUARANTINE = pl.Schema({
    "file": pl.String,
    "row": pl.Int64,             # 1-based row (Parquet) or line (JSON lines)
    "game_id": pl.String,
    "field": pl.String,
    "reason": pl.String,
})


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
