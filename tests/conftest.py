"""Shared fixtures: hand-made games in the public layouts, written to real files."""

import json
from pathlib import Path

import polars as pl
import pytest

KILOGRAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "kilogram"
CONTEXT = [f"page-{c}.png" for c in "ABCDEFGHIJ"]


def game(game_id="g1", **fields):
    """A valid 3-turn successful game; ``fields`` override any column."""
    row = {
        "game_id": game_id, "round": 1, "policy_name": "bp", "speaker": "alice", "end": "successful",
        "date": "2026-01-01", "dataset_alias": "test",
        "context": CONTEXT, "targets": ["page-B.png", "page-D.png"],
        "chat": ["the bird", "no, the other one", "yes, now the chair"],
        "clicks": [["page-A.png"], ["page-B.png"], ["page-B.png", "page-D.png"]],
        "prob_action": [0.2, 0.6, 0.9],
    }
    row.update(fields)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture
def kilogram():
    if not (KILOGRAM / "dense10.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}")
    return KILOGRAM
