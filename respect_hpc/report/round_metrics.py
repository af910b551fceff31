"""Interaction-level round metrics (RESPECT.md, "Metrics"), computed with Polars.

Per (policy, round): games, success rate and turns per interaction with 95%
percentile bootstrap intervals, click accuracy, and the speakers' language
(vocabulary size, utterance length, reset and try-again phrases: utterances that
contain one, and occurrences as the official notebook counts them).

The bootstrap is exact and vectorised: resampling n games with replacement
and averaging a statistic that takes K distinct values is the same as drawing
the K counts from Multinomial(n, observed frequencies). Success (K = 2) and
turns (K <= turn limit) thus cost O(resamples x K) per cell, not
O(resamples x n), with the same distribution of resampled means.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import polars as pl

from respect_hpc.report import N_RESAMPLES  # noqa: F401  (re-exported: the default of every interval here)

CONFIDENCE = 0.95

RESET_PATTERN = (r"\b(?:reset|restart|from scratch|all over|start over|"
                 r"(?:deselect|remove|clear|unselect|drop)\s+(?:everything|all))\b")
TRY_AGAIN_PATTERN = r"\b(?:try again|try one more time|the other one)\b"
WORD_PATTERN = r"[a-z0-9']+"
# The official notebook's phrase lists (analysis/plots.ipynb), counted as it counts them: every occurrence in the
# lower-cased utterances, substrings included, the first listed phrase winning where two start at one place.
FRUSTRATED_PHRASES = ("reset", "restart", "from scratch", "all over", "start over", "deselect everything",
                      "deselect all", "remove everything", "remove all", "clear everything", "clear all",
                      "unselect everything", "unselect all", "drop everything", "drop all")
LAZY_PHRASES = ("try again", "try one more time", "the other one")

KEYS = ("policy", "round")
METRIC_COLUMNS = ("policy", "round", "games", "success_rate", "success_ci_low", "success_ci_high",
                  "turns_mean", "turns_ci_low", "turns_ci_high", "click_accuracy", "vocab_size",
                  "utterance_len_mean", "reset_count", "try_again_count", "frustrated_occurrences",
                  "lazy_occurrences")


def group_rng(seed: int, *key: object) -> np.random.Generator:
    """A generator for one cell, independent of which other cells are computed."""
    return np.random.default_rng([seed, zlib.crc32("\x00".join(map(str, key)).encode())])


def bootstrap_mean_ci(values: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                      n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of a sample given as distinct ``values`` with ``counts``.

    Few distinct values: counts drawn from the multinomial (exact, O(resamples x K)).
    Many (a continuous statistic): plain resampling of indices, in chunks that bound memory.
    """
    n = int(counts.sum())
    if len(values) <= 64:
        means = rng.multinomial(n, counts / n, size=n_resamples) @ values / n
    else:
        sample = np.repeat(values, counts)
        rows = max(1, 2**22 // n)
        means = np.concatenate([sample[rng.integers(0, n, size=(min(rows, n_resamples - start), n), dtype=np.int32)].mean(axis=1)
                                for start in range(0, n_resamples, rows)])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _intervals(interactions: pl.DataFrame, column: str, seed: int, n_resamples: int,
               confidence: float) -> pl.DataFrame:
    """Bootstrap interval of the mean of ``column`` per (policy, round)."""
    counts = (interactions.group_by(*KEYS, column).len().sort(*KEYS, column)  # a fixed order for the seeded draws
              .group_by(KEYS, maintain_order=True).agg(pl.col(column).cast(pl.Float64), pl.col("len")))
    rows = []
    for policy, round_, values, n in counts.iter_rows():  # one iteration per cell, not per game
        low, high = bootstrap_mean_ci(np.asarray(values), np.asarray(n, dtype=np.int64),
                                      group_rng(seed, column, policy, round_), n_resamples, confidence)
        rows.append((policy, round_, low, high))
    name = {"success": "success", "num_turns": "turns"}[column]
    return pl.DataFrame(rows, schema={"policy": pl.String, "round": pl.Int64,
                                      f"{name}_ci_low": pl.Float64, f"{name}_ci_high": pl.Float64}, orient="row")


def click_accuracy(turns: pl.DataFrame) -> pl.DataFrame:
    """Right clicks (select a target, deselect a non-target) over all clicks, per cell."""
    right = (pl.col("selected").list.set_intersection("targets").list.len()
             + pl.col("deselected").list.set_difference("targets").list.len())
    clicks = pl.col("selected").list.len() + pl.col("deselected").list.len()
    return turns.group_by(KEYS).agg((right.sum() / clicks.sum()).alias("click_accuracy"))


def language(interactions: pl.DataFrame) -> pl.DataFrame:
    """Vocabulary size, mean utterance length (words), reset and try-again utterances, and the notebook's
    occurrence counts of its frustrated and lazy phrases."""
    utterances = (interactions.select(*KEYS, pl.col("chat").alias("utterance")).explode("utterance")
                  .with_columns(pl.col("utterance").str.to_lowercase()))
    words = pl.col("utterance").str.extract_all(WORD_PATTERN)
    return utterances.group_by(KEYS).agg(
        words.list.explode(keep_nulls=False, empty_as_null=False).n_unique().alias("vocab_size"),
        words.list.len().mean().alias("utterance_len_mean"),
        pl.col("utterance").str.contains(RESET_PATTERN).sum().alias("reset_count"),
        pl.col("utterance").str.contains(TRY_AGAIN_PATTERN).sum().alias("try_again_count"),
        pl.col("utterance").str.count_matches(_alternation(FRUSTRATED_PHRASES)).sum().alias("frustrated_occurrences"),
        pl.col("utterance").str.count_matches(_alternation(LAZY_PHRASES)).sum().alias("lazy_occurrences"),
    )


def _alternation(phrases: tuple[str, ...]) -> str:
    return "|".join(re.escape(p) for p in phrases)


def round_metrics(interactions: pl.DataFrame, turns: pl.DataFrame, *, seed: int = 0,
                  n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> pl.DataFrame:
    """One row per (policy, round) with the columns :data:`METRIC_COLUMNS`."""
    base = interactions.group_by(KEYS).agg(
        pl.len().alias("games"),
        pl.col("success").mean().alias("success_rate"),
        pl.col("num_turns").mean().alias("turns_mean"),
    )
    out = base
    for part in (_intervals(interactions, "success", seed, n_resamples, confidence),
                 _intervals(interactions, "num_turns", seed, n_resamples, confidence),
                 click_accuracy(turns), language(interactions)):
        out = out.join(part, on=KEYS, how="left")
    return out.with_columns(pl.col("games", "vocab_size", "reset_count", "try_again_count", "frustrated_occurrences",
                                   "lazy_occurrences").cast(pl.Int64)) \
        .select(METRIC_COLUMNS).sort(KEYS)
