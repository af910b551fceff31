"""Metrics stage: interactions and turns tables -> round metrics table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from jobs.ingest import INTERACTIONS_FILE, TURNS_FILE
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.config.schema import Manifest
from respect_hpc.report.round_metrics import N_RESAMPLES, round_metrics
from respect_hpc.core.rundir import RunDir
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

METRICS_FILE = "round_metrics.parquet"


def run(data_dir: str | Path, out_dir: str | Path, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
        metadata: dict[str, str] | None = None) -> pl.DataFrame:
    """Compute round metrics from an ingest stage's tables and write them to ``out_dir``."""
    data_dir = Path(data_dir)
    metrics = round_metrics(pl.read_parquet(data_dir / INTERACTIONS_FILE), pl.read_parquet(data_dir / TURNS_FILE),
                            seed=seed, n_resamples=n_resamples)
    atomic_write_parquet(metrics, Path(out_dir) / METRICS_FILE, metadata)
    return metrics


def stage_hash(manifest: Manifest) -> str:
    data = RunDir.of(manifest).data
    return spec_hash({"interactions": file_digest(data / INTERACTIONS_FILE), "turns": file_digest(data / TURNS_FILE)})


def is_done(manifest: Manifest) -> bool:
    path = RunDir.of(manifest).metrics(manifest.round) / METRICS_FILE
    return path.is_file() and parquet_metadata(path).get(SPEC_HASH_KEY) == stage_hash(manifest)


def stage(manifest: Manifest) -> pl.DataFrame:
    """The metrics stage of a round: metrics of the logged rounds so far."""
    run_dir = RunDir.of(manifest)
    return run(run_dir.data, run_dir.metrics(manifest.round), metadata={SPEC_HASH_KEY: stage_hash(manifest)})
