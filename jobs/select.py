"""Select stage: the best checkpoint of each variant -> round-R/selection.parquet and round-R/policies/<variant>/.

Reads every training task's ``metrics.parquet`` (variants x sweep cells x seeds), picks checkpoints with
:func:`respect_hpc.training.selection.select_checkpoints`, and copies each chosen epoch adapter to
``policies/<variant>/`` (atomically), where the next round deploys it and its KTO variants continue from it.
"""

from __future__ import annotations

import polars as pl

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest
from respect_hpc.core.hashing import spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, adapter_problem, atomic_copy_tree, atomic_write_parquet, parquet_metadata
from respect_hpc.training.checkpoints import recorded_spec
from respect_hpc.training.selection import CURVES, select_checkpoints
from respect_hpc.training.spec import TrainingError

KEY = "select"


def spec(manifest: Manifest) -> str | None:
    """The hash of what selection reads: the done markers of every training task (None while one is missing)."""
    run = manifest.run_dir
    hashes = [recorded_spec(run.task(manifest.round, v, c, s)) for v, c, s in manifest.training_tasks()]
    return None if None in hashes else spec_hash({"train": hashes})


def done(manifest: Manifest) -> set[str]:
    """Selection ran on the current training outputs and every chosen policy is intact."""
    run = manifest.run_dir
    path, current = run.selection(manifest.round), spec(manifest)
    if current is None or not path.is_file() or parquet_metadata(path).get(SPEC_HASH_KEY) != current:
        return set()
    chosen = pl.read_parquet(path).filter("chosen")["variant"].to_list()
    return {KEY} if all(adapter_problem(run.policy(manifest.round, v)) is None for v in chosen) else set()


def curves(manifest: Manifest) -> pl.DataFrame:
    frames = []
    for variant, cell, seed in manifest.training_tasks():
        task = manifest.run_dir.task(manifest.round, variant, cell, seed)
        if not task.done.is_file():
            raise TrainingError(f"{task.root}: training task {variant} seed {seed} ({cell}) has not finished; "
                                "run the train stage first")
        frames.append(pl.read_parquet(task.metrics).filter(pl.col("val_exact_match").is_not_null()).select(
            pl.lit(variant).alias("variant"), pl.lit(cell).alias("cell"), pl.lit(seed).alias("seed"),
            "epoch", "val_exact_match", "val_loss"))
    return pl.concat(frames).cast(dict(CURVES))


def run(manifest: Manifest) -> pl.DataFrame:
    """Write the selection table and place each variant's chosen adapter; returns the table."""
    run_dir = manifest.run_dir
    selection = select_checkpoints(curves(manifest), manifest.round)
    for row in selection.filter("chosen").iter_rows(named=True):
        source = run_dir.task(manifest.round, row["variant"], row["cell"], row["seed"]).epoch(row["epoch"])
        problem = adapter_problem(source)
        if problem:
            raise TrainingError(f"variant {row['variant']}: the selected adapter is damaged: {problem}; run the "
                                "round again: the training task is redone")
        atomic_copy_tree(source, run_dir.policy(manifest.round, row["variant"]))
    atomic_write_parquet(selection, run_dir.selection(manifest.round), {SPEC_HASH_KEY: spec(manifest)})
    return selection


STAGE = Stage("select", upstream=("train",), tasks=lambda m: [Task(KEY, run, (m,))], done=done)
