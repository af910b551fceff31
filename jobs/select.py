"""Select stage: the best checkpoint of each variant -> round-R/selection.parquet and round-R/policies/<variant>/.

Reads every training task's ``metrics.parquet`` (variants x sweep cells x seeds), picks
checkpoints with :func:`respect_hpc.training.selection.select_checkpoints`, and copies each chosen
epoch adapter to ``policies/<variant>/`` (atomically), where the next round deploys it and
its KTO variants continue from it.
"""

from __future__ import annotations

import json

import polars as pl

from jobs.train import task_dir
from respect_hpc.core.hashing import spec_hash
from respect_hpc.config.schema import Manifest
from respect_hpc.core.rundir import RunDir
from respect_hpc.training.selection import CURVES, select_checkpoints
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_copy_tree, atomic_write_parquet, parquet_metadata
from respect_hpc.training.trainer import DONE_FILE, METRICS_FILE, TrainingError, adapter_problem

SELECTION_FILE = "selection.parquet"


def tasks(manifest: Manifest) -> list[tuple[str, str, int]]:
    """Every training task of the round: (variant, cell, seed)."""
    return [(v.name, cell, seed) for v in manifest.variants for cell in manifest.cells() for seed in manifest.seeds]


def _spec_hash(manifest: Manifest) -> str | None:
    """The hash of what selection reads: the done markers of every training task (None while one is missing)."""
    hashes = []
    for variant, cell, seed in tasks(manifest):
        done = task_dir(manifest, variant, seed, cell) / DONE_FILE
        try:
            hashes.append(json.loads(done.read_text())["spec_hash"])
        except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: that task is not done
            return None
    return spec_hash({"train": hashes})


def is_done(manifest: Manifest) -> bool:
    """Selection ran on the current training outputs and every chosen policy is intact."""
    path = RunDir.of(manifest).round(manifest.round) / SELECTION_FILE
    current = _spec_hash(manifest)
    if current is None or not path.is_file() or parquet_metadata(path).get(SPEC_HASH_KEY) != current:
        return False
    chosen = pl.read_parquet(path).filter("chosen")["variant"].to_list()
    return all(adapter_problem(RunDir.of(manifest).policy(manifest.round, v)) is None for v in chosen)


def curves(manifest: Manifest) -> pl.DataFrame:
    frames = []
    for variant, cell, seed in tasks(manifest):
        path = task_dir(manifest, variant, seed, cell) / METRICS_FILE
        if not (path.parent / DONE_FILE).is_file():
            raise TrainingError(f"{path.parent}: training task {variant} seed {seed} ({cell}) has not finished; "
                                "run the train stage first")
        frames.append(pl.read_parquet(path).filter(pl.col("val_exact_match").is_not_null()).select(
            pl.lit(variant).alias("variant"), pl.lit(cell).alias("cell"), pl.lit(seed).alias("seed"),
            "epoch", "val_exact_match", "val_loss"))
    return pl.concat(frames).cast(dict(CURVES))


def run(manifest: Manifest) -> pl.DataFrame:
    """Write the selection table and place each variant's chosen adapter; returns the table."""
    round_dir = RunDir.of(manifest).round(manifest.round)
    selection = select_checkpoints(curves(manifest), manifest.round)
    for row in selection.filter("chosen").iter_rows(named=True):
        source = task_dir(manifest, row["variant"], row["seed"], row["cell"]) / "epochs" / f"epoch-{row['epoch']:03d}"
        problem = adapter_problem(source)
        if problem:
            raise TrainingError(f"variant {row['variant']}: the selected adapter is damaged: {problem}; run the "
                                "round again: the training task is redone")
        atomic_copy_tree(source, RunDir.of(manifest).policy(manifest.round, row["variant"]))
    atomic_write_parquet(selection, round_dir / SELECTION_FILE, {SPEC_HASH_KEY: _spec_hash(manifest)})
    return selection

