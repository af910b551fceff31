"""Feedback-decoder audit: decoded labels against human labels and against a privileged heuristic.

Labels are 1 (positive), 0 (neutral), -1 (negative). Precision and false-positive
rate count neutral as positive, as RESPECT.md reports them. The heuristic label
needs no annotation, only the game's targets: an action is good when everything
it selects is a target and nothing it deselects is; its agreement with the
decoder, round by round, shows decoder drift.
"""

from __future__ import annotations

import polars as pl


def heuristic_label() -> pl.Expr:
    """1 for an action whose selections are all targets and whose deselections are none, else -1."""
    good = ((pl.col("selected").list.set_difference("targets").list.len() == 0)
            & (pl.col("deselected").list.set_intersection("targets").list.len() == 0))
    return pl.when(good).then(pl.lit(1, pl.Int8)).otherwise(pl.lit(-1, pl.Int8))


def confusion(pairs: pl.DataFrame) -> pl.DataFrame:
    """Counts of (human, decoded) label pairs per (kind, round): the confusion matrices, long form."""
    return (pairs.group_by("kind", "round", "human", "decoded").len().rename({"len": "count"})
            .sort("kind", "round", "human", "decoded"))


def decoder_quality(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per (kind, round): labelled windows, precision of positive, false-positive rate, accuracy."""
    decoded_pos, human_pos = pl.col("decoded") >= 0, pl.col("human") >= 0
    return (pairs.group_by("kind", "round").agg(
        pl.len().alias("windows"),
        ((decoded_pos & human_pos).sum() / decoded_pos.sum()).alias("precision_positive"),
        ((decoded_pos & ~human_pos).sum() / (~human_pos).sum()).alias("false_positive_rate"),
        (pl.col("decoded") == pl.col("human")).mean().alias("accuracy"),
    ).sort("kind", "round"))


def heuristic_agreement(feedback: pl.DataFrame, turns: pl.DataFrame) -> pl.DataFrame:
    """Per (kind, round, policy): how often the decoded label (neutral as positive) matches the heuristic."""
    joined = feedback.join(turns.select("game_turn_id", "selected", "deselected", "targets"), on="game_turn_id")
    return (joined.with_columns(heuristic=heuristic_label())
            .group_by("kind", "round", "policy")
            .agg(pl.len().alias("windows"),
                 ((pl.col("label") >= 0) == (pl.col("heuristic") >= 0)).mean().alias("heuristic_agreement"),
                 (pl.col("heuristic") == 1).mean().alias("heuristic_positive_rate"),
                 (pl.col("label") >= 0).mean().alias("decoded_positive_rate"))
            .sort("kind", "round", "policy"))


def simulated_truth_pairs(feedback: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """Decoded labels (a feedback table) against a simulated deployment's truth of each turn (game_id,
    turn_id, truth: 1 good, -1 bad, 0 nothing done, which counts as bad), as (kind, round, human, decoded)."""
    known = truth.select(game_turn_id=pl.format("{}_{}", "game_id", "turn_id"),
                         human=pl.when(pl.col("truth") == 1).then(1).otherwise(-1).cast(pl.Int8))
    return feedback.join(known, on="game_turn_id").select("kind", "round", "human",
                                                          decoded=pl.col("label").cast(pl.Int8))
