"""Rounds chained by simulated deployments (``respect-hpc loop``): what each round's deployment shows, read
back from the run directory.

:func:`learning_curve` is the round metrics of every round's simulated games (success and turns with
intervals: the paper's Figure 3 as a table); :func:`decoder_truth` is each round's decoded feedback against
the simulator's truth of the turns it labels; :func:`verdict` says whether the trained policies beat the
control.
"""

from __future__ import annotations

import polars as pl

from respect_hpc.config.schema import Manifest
from respect_hpc.data.logs import ingest
from respect_hpc.domain.policies import CONTROL_POLICY
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


SIMULATED = ("simulated: the speaker is a program speaking KiloGram's descriptions, D_0 and validation come from "
             "simulated people, and the models are tiny IDEFICS2-8B replicas taught offline")


def verdict(curve: pl.DataFrame, round_: int) -> list[str]:
    """One line per policy trained in ``round_`` against the control of that round (success with 95%
    intervals, and whether the intervals are apart), then what is simulated."""
    rows = {r["policy"]: r for r in curve.filter(pl.col("round") == round_).iter_rows(named=True)}
    control = rows.get(CONTROL_POLICY)
    if control is None:
        return [f"round {round_} has no control games to compare with", SIMULATED]

    def success(row: dict) -> str:
        return (f"{100 * row['success_rate']:.1f}% [{100 * row['success_ci_low']:.1f}, "
                f"{100 * row['success_ci_high']:.1f}] of {row['games']} games")

    lines = []
    for policy, row in sorted(rows.items()):
        if policy == CONTROL_POLICY:
            continue
        if row["success_ci_low"] > control["success_ci_high"]:
            outcome = "intervals apart: it learned from the feedback decoded from its deployments"
        elif row["success_ci_high"] < control["success_ci_low"]:
            outcome = "intervals apart, below the control"
        else:
            outcome = "intervals overlap: no difference shown at this size"
        lines.append(f"round {round_}: {policy} succeeds in {success(row)}; the control (the seed policy) in "
                     f"{success(control)}: {outcome}")
    return lines + [SIMULATED]
