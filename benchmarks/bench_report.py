"""A full offline report: 7 rounds x 7 policies x 330 games, 10,000 bootstrap resamples per interval.

Inputs made once before the clock starts: synthetic logs, a turn evaluation of every
turn against a reference action (the next target to select, the wrong selections
to deselect), random 64-dimensional embeddings of every image, a binary decoder
table with noisy human labels, and training curves (6 variants x 3 seeds x 20
epochs per round). Timed: respect_hpc.report.build.build + write (tables, plots, HTML).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.data.logs import ingest
from respect_hpc.domain.synthetic import load_image_bank, synthesize
from respect_hpc.report.audit import heuristic_label
from respect_hpc.report.build import build, write

POLICIES = {"sft": 0.3, "bp": 0.35, "tp": 0.35, "ba": 0.35, "ta": 0.35, "bk": 0.3, "tk": 0.35}
VARIANTS = ["b-fft", "t-fft", "b-rl", "t-rl", "b-kto", "t-kto"]


def inputs(root: Path) -> list[Path]:
    logs = root / "logs.parquet"
    synthesize(330, seed=0, policies=POLICIES, rounds=range(7)).write_parquet(logs)
    result = ingest([logs])
    run = root / "run"
    atomic_write_parquet(result.interactions, run / "data" / "interactions.parquet")
    atomic_write_parquet(result.turns, run / "data" / "turns.parquet")
    turns = result.turns
    evals = turns.select(
        "game_turn_id", "round", "policy", "selected", "deselected",
        pl.col("targets").list.set_difference("currently_selected").list.head(1).alias("reference_selected"),
        pl.col("currently_selected").list.set_difference("targets").alias("reference_deselected"),
        heuristic_label().alias("feedback"))
    for round_, rows in evals.partition_by("round", as_dict=True).items():
        atomic_write_parquet(rows, run / f"round-{round_[0]}" / "turn_eval.parquet")
    rng = np.random.default_rng(0)
    names = load_image_bank().names
    pl.DataFrame({"image": names, "embedding": rng.normal(size=(len(names), 64)).tolist()}).write_parquet(
        root / "embeddings.parquet")
    human = turns.filter("has_follow_up").select("game_turn_id", labels=heuristic_label())
    flip = rng.random(human.height) < 0.15
    human.with_columns(predictions=pl.when(pl.Series(flip)).then(-pl.col("labels")).otherwise("labels"),
                       text=pl.lit("")).write_parquet(root / "feedback_decoder_binary.parquet")
    for round_ in range(1, 7):
        for variant in VARIANTS:
            for seed in (1, 2, 3):
                curve = np.clip(0.3 + 0.02 * np.arange(1, 21) + rng.normal(0, 0.03, 20), 0, 1)
                atomic_write_parquet(pl.DataFrame({"step": np.arange(1, 21) * 10, "epoch": np.arange(1, 21),
                                                   "val_exact_match": curve, "val_loss": 2 - curve}),
                                     run / f"round-{round_}" / "train" / variant / f"seed-{seed}" / "metrics.parquet")
    return [run, root / "feedback_decoder_binary.parquet"]


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = inputs(root)
        start = time.perf_counter()
        report = build(sources, root / "embeddings.parquet")
        built = time.perf_counter() - start
        write(report, root / "out")
        total = time.perf_counter() - start
        rm = report.tables["round_metrics"]
        turns = report.tables["turn_metrics"]["turns"].sum()
        return f"""## Offline report (issue: aggregation and reports)

{rm['games'].sum():,} games and {turns:,} evaluated turns in {rm.height} (policy, round) cells; intervals for
success rate, turns, exact match, similarity and positive-feedback rate, 10,000 bootstrap resamples each;
decoder audit of {report.tables['decoder_confusion']['count'].sum():,} labelled windows; 378 training curves.

| step | time (s) |
|---|---|
| build (read, aggregate, bootstrap) | {built:.1f} |
| build + write (Parquet, CSV, {len(list((root / 'out' / 'plots').glob('*.png')))} plots, HTML) | {total:.1f} |

Target: under 15 s."""
