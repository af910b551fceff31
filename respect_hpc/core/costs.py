"""What a round cost, read back from the timing records its tasks wrote (cluster/timing.py writes them, one
JSON line per attempt: started, elapsed_s, gpus, ok): per stage and task, attempts, wall hours and GPU-hours,
for ``status``, ``report`` and ``plan``'s estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

COSTS = pl.Schema({"round": pl.Int64, "stage": pl.String, "task": pl.String, "attempts": pl.Int64,
                   "elapsed_h": pl.Float64, "gpu_hours": pl.Float64})


def record_path(folder: Path, key: str) -> Path:
    """A task's timing record in a stage's timing folder (the task key's '/' kept out of the name)."""
    return folder / f"{key.replace('/', '__')}.jsonl"


def costs(folder: Path, round_: int) -> pl.DataFrame:
    """Per (stage, task) of a round's timing folder: attempts, wall hours and GPU-hours (unreadable lines,
    such as a half-written one of a killed task, are skipped)."""
    rows = []
    for path in sorted(folder.glob("*/*.jsonl")) if folder.is_dir() else []:
        lines = []
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
        if lines:
            elapsed = sum(float(line["elapsed_s"]) for line in lines)
            gpu = sum(float(line["elapsed_s"]) * int(line.get("gpus", 0)) for line in lines)
            rows.append((round_, path.parent.name, path.stem.replace("__", "/"), len(lines), elapsed / 3600,
                         gpu / 3600))
    return pl.DataFrame(rows, schema=COSTS, orient="row")
