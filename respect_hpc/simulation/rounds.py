"""Rounds chained by simulated deployments (``respect-hpc loop``): what each round's deployment shows, read
back from the run directory.

:func:`learning_curve` is the round metrics of every round's simulated games (success and turns with
intervals: the paper's Figure 3 as a table); :func:`decoder_truth` is each round's decoded feedback against
the simulator's truth of the turns it labels.
"""

from __future__ import annotations

import polars as pl

from respect_hpc.config.schema import Manifest
from respect_hpc.data.logs import ingest
from respect_hpc.report.audit import decoder_quality, simulated_truth_pairs
from respect_hpc.report.round_metrics import round_metrics


def learning_curve(m: Manifest) -> pl.DataFrame:
    """Round metrics of every round's simulated deployment so far (rounds 0 to ``m.round``)."""
    run = m.run_dir
    games = [run.deployed(r) for r in range(m.round + 1)]
    result = ingest([p for p in games if p.is_file()], policies=None)
    return round_metrics(result.interactions, result.turns)


def decoder_truth(m: Manifest) -> pl.DataFrame | None:
    """Per round whose logs were decoded: precision of positive, false-positive rate and accuracy of the
    decoded labels against the simulator's truth (None before any round was decoded)."""
    run = m.run_dir
    truths = [run.deployed_truth(r) for r in range(m.round + 1) if run.deployed_truth(r).is_file()]
    if not truths:
        return None
    truth = pl.concat([pl.read_parquet(p) for p in truths])
    rows = []
    for r in range(1, m.round + 1):
        feedback = run.round_feedback(r)
        if feedback.is_file():
            quality = decoder_quality(simulated_truth_pairs(pl.read_parquet(feedback), truth))
            rows.append(quality.filter(pl.col("round") == r - 1).with_columns(decoded_in=pl.lit(r)))
    return pl.concat(rows) if rows else None
