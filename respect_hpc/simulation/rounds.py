"""Rounds chained by simulated deployments (``respect-hpc loop``): what each round's deployment shows, read
back from the run directory.

:func:`learning_curve` is the round metrics of every round's simulated games (success and turns with
intervals: the paper's Figure 3 as a table); :func:`decoder_truth` is each round's decoded feedback against
the simulator's truth of the turns it labels; :func:`paired_difference` is each trained policy's success
minus the control's on the games both played, and :func:`verdict` says whether the trained policies beat the
control by it.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from respect_hpc.config.schema import Manifest
from respect_hpc.data.logs import ingest
from respect_hpc.domain.policies import CONTROL_POLICY
from respect_hpc.domain.simulator import GAME_NUMBER
from respect_hpc.report.audit import decoder_quality, simulated_truth_pairs
from respect_hpc.report.round_metrics import bootstrap_mean_ci, group_rng, round_metrics


def round_differences(m: Manifest) -> pl.DataFrame:
    """:func:`paired_difference` of the round ``m`` deployed."""
    return paired_difference(pl.read_parquet(m.run_dir.deployed(m.round), columns=["game_id", "end", "policy_name"]))


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

DIFFERENCE = pl.Schema({"policy": pl.String, "games": pl.Int64, "difference": pl.Float64, "ci_low": pl.Float64,
                        "ci_high": pl.Float64})


def paired_difference(games: pl.DataFrame, *, seed: int = 0) -> pl.DataFrame:
    """Per policy other than the control in one round's simulated games (``game_id``, ``end``,
    ``policy_name``): its success rate minus the control's on the games both played (game ``n`` of every
    policy shows the same tangrams and targets, and its speaker starts from the same draws), with the 95%
    bootstrap interval of the mean of the paired differences (-1, 0 or 1 a game)."""
    success = games.select(pl.col("policy_name").alias("policy"),
                           pl.col("game_id").str.extract(GAME_NUMBER).cast(pl.Int64).alias("number"),
                           (pl.col("end") == "successful").cast(pl.Int64).alias("success"))
    control = success.filter(pl.col("policy") == CONTROL_POLICY).select("number", control="success")
    pairs = success.filter(pl.col("policy") != CONTROL_POLICY).join(control, on="number")
    counts = (pairs.group_by("policy", (pl.col("success") - pl.col("control")).alias("d")).len()
              .sort("policy", "d").group_by("policy", maintain_order=True).agg("d", "len"))
    rows = []
    for policy, values, n in counts.iter_rows():
        values, n = np.asarray(values, dtype=np.float64), np.asarray(n, dtype=np.int64)
        low, high = bootstrap_mean_ci(values, n, group_rng(seed, "paired", policy))
        rows.append((policy, int(n.sum()), float(values @ n / n.sum()), low, high))
    return pl.DataFrame(rows, schema=DIFFERENCE, orient="row")


def verdict(curve: pl.DataFrame, differences: pl.DataFrame, round_: int) -> list[str]:
    """One line per policy trained in ``round_`` against the control of that round: success with 95%
    intervals, the paired difference on the games both played (:func:`paired_difference`) with its interval,
    and whether that interval excludes no difference; then what is simulated."""
    rows = {r["policy"]: r for r in curve.filter(pl.col("round") == round_).iter_rows(named=True)}
    control = rows.get(CONTROL_POLICY)
    if control is None:
        return [f"round {round_} has no control games to compare with", SIMULATED]

    def success(row: dict) -> str:
        return (f"{100 * row['success_rate']:.1f}% [{100 * row['success_ci_low']:.1f}, "
                f"{100 * row['success_ci_high']:.1f}] of {row['games']} games")

    lines = []
    for d in differences.sort("policy").iter_rows(named=True):
        if d["ci_low"] > 0:
            outcome = "better: it learned from the feedback decoded from its deployments"
        elif d["ci_high"] < 0:
            outcome = "worse than the control"
        else:
            outcome = "no difference shown at this size"
        lines.append(f"round {round_}: {d['policy']} succeeds in {success(rows[d['policy']])}, the control (the "
                     f"seed policy) in {success(control)}; on the {d['games']} games both played, "
                     f"{100 * d['difference']:+.1f} points [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]: "
                     f"{outcome}")
    return lines + [SIMULATED]
