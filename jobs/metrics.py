"""Metrics stage: interactions and turns tables -> round metrics table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from jobs.ingest import INTERACTIONS_FILE, TURNS_FILE
from respect_hpc.metrics import N_RESAMPLES, round_metrics
from respect_hpc.tables import atomic_write_parquet

METRICS_FILE = "round_metrics.parquet"


def run(data_dir: str | Path, out_dir: str | Path, *, seed: int = 0, n_resamples: int = N_RESAMPLES) -> pl.DataFrame:
    """Compute round metrics from an ingest stage's tables and write them to ``out_dir``."""
    data_dir = Path(data_dir)
    metrics = round_metrics(pl.read_parquet(data_dir / INTERACTIONS_FILE), pl.read_parquet(data_dir / TURNS_FILE),
                            seed=seed, n_resamples=n_resamples)
    atomic_write_parquet(metrics, Path(out_dir) / METRICS_FILE)
    return metrics
