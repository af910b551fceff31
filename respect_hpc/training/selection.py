"""Checkpoint selection, with Polars: per variant, the epoch checkpoint of any seed (and sweep cell)
with the highest validation exact match; ties go to the lower validation loss, then the earlier
epoch, then the lower seed. Cells of a sweep are compared by the mean and spread over seeds of
each seed's best exact match.
"""

from __future__ import annotations

import polars as pl

CURVES = pl.Schema({"variant": pl.String, "cell": pl.String, "seed": pl.Int64, "epoch": pl.Int64,
                    "val_exact_match": pl.Float64, "val_loss": pl.Float64})
SELECTION = pl.Schema({"round": pl.Int64, "variant": pl.String, "cell": pl.String, "seed": pl.Int64,
                       "epoch": pl.Int64, "val_exact_match": pl.Float64, "val_loss": pl.Float64,
                       "seeds": pl.Int64, "mean_val_exact_match": pl.Float64, "std_val_exact_match": pl.Float64,
                       "chosen": pl.Boolean})
_ORDER = (["val_exact_match", "val_loss", "epoch", "seed"], [True, False, False, False])


def rank(curves: pl.DataFrame) -> pl.DataFrame:
    """Checkpoints best first: higher exact match, then lower loss, then earlier epoch, then lower seed."""
    order = [(c, d) for c, d in zip(*_ORDER) if c in curves.columns]
    return curves.sort([c for c, _ in order], descending=[d for _, d in order])


def select_checkpoints(curves: pl.DataFrame, round_: int) -> pl.DataFrame:
    """One row per (variant, cell): its best checkpoint and the spread over seeds; ``chosen`` marks each
    variant's best cell, whose checkpoint becomes the variant's policy."""
    ranked = rank(curves)
    per_seed = ranked.group_by("variant", "cell", "seed", maintain_order=True).first()
    spread = per_seed.group_by("variant", "cell").agg(
        seeds=pl.len(), mean_val_exact_match=pl.col("val_exact_match").mean(),
        std_val_exact_match=pl.col("val_exact_match").std())
    best = ranked.group_by("variant", "cell", maintain_order=True).first().join(spread, on=["variant", "cell"])
    best = rank(best).with_columns(
        chosen=pl.int_range(pl.len()).over("variant") == 0, round=pl.lit(round_, pl.Int64))
    return best.select(SELECTION.names()).cast(dict(SELECTION)).sort("variant", "cell")
