"""Metrics stage: the ingested logs -> round-R/metrics/round_metrics.parquet (success, turns, language per
policy and round, with bootstrap intervals)."""

from __future__ import annotations

import polars as pl

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata
from respect_hpc.report.round_metrics import round_metrics

KEY = "metrics"


def spec(manifest: Manifest) -> str:
    data = manifest.run_dir.data
    return spec_hash({"interactions": file_digest(data.interactions), "turns": file_digest(data.turns)})


def done(manifest: Manifest) -> set[str]:
    path = manifest.run_dir.round_metrics(manifest.round)
    return {KEY} if path.is_file() and parquet_metadata(path).get(SPEC_HASH_KEY) == spec(manifest) else set()


def run(manifest: Manifest) -> pl.DataFrame:
    """The metrics of the logged rounds so far."""
    data = manifest.run_dir.data
    metrics = round_metrics(pl.read_parquet(data.interactions), pl.read_parquet(data.turns))
    atomic_write_parquet(metrics, manifest.run_dir.round_metrics(manifest.round), {SPEC_HASH_KEY: spec(manifest)})
    return metrics


STAGE = Stage("metrics", upstream=("ingest",), tasks=lambda m: [Task(KEY, run, (m,))], done=done,
              applies=lambda m: not m.seed_round)
