"""Train stage: one task per (variant, sweep cell, seed), run as a submitit Checkpointable array task.

:func:`prepare` builds a task's training set, validation turns and settings and refuses bad input before
any GPU time (an empty training set, a missing previous adapter, images the folder lacks, a batch the world
cannot divide). A :class:`TrainTask` runs :func:`respect_hpc.training.trainer.train` in each of its
processes; on SIGUSR2 (preemption, or the time limit coming) it finishes the optimizer step, saves a
checkpoint and hands over to submitit, which requeues it; the requeued task resumes from that checkpoint. A
finished task writes ``done.json`` with the hash of its spec, and a rerun with the same spec skips it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import submitit
import torch

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest, Variant
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.core.io import atomic_write_parquet, atomic_write_text
from respect_hpc.core.rundir import DEFAULT_CELL, TaskDir
from respect_hpc.core.text import log_console
from respect_hpc.data.datasets import source_counts, training_set, validation_turns
from respect_hpc.data.logs import IngestError, ingest
from respect_hpc.model.loading import is_multimodal_model, model_fingerprint
from respect_hpc.model.policy_inputs import image_problem
from respect_hpc.training.checkpoints import clear_task, finished, outputs_problem
from respect_hpc.training.propensity import collecting_adapters
from respect_hpc.training.selection import rank
from respect_hpc.training.spec import TrainingError, TrainSpec, accumulation_steps
from respect_hpc.training.tracking import TrackedRun, run_name
from respect_hpc.training.trainer import train

console = log_console()


@dataclass(frozen=True)
class Prepared:
    spec: TrainSpec
    examples: pl.DataFrame
    validation: pl.DataFrame


def task_key(variant: str, cell: str, seed: int) -> str:
    return f"{variant}/seed-{seed}" if cell == DEFAULT_CELL else f"{variant}@{cell}/seed-{seed}"


def variant_of(manifest: Manifest, name: str) -> Variant:
    variant = manifest.variant(name)
    if variant is None:
        raise TrainingError(f"--variant {name}: the manifest has no such variant; expected one of "
                            f"{', '.join(v.name for v in manifest.variants)}")
    return variant


def task_dir(manifest: Manifest, variant: str, seed: int, cell: str = DEFAULT_CELL) -> TaskDir:
    return manifest.run_dir.task(manifest.round, variant, cell, seed)


def task_hash(manifest: Manifest, variant_name: str, seed: int, cell: str = DEFAULT_CELL) -> str:
    """The hash of a task's spec: settings, model, and the digests of every input it reads."""
    variant = variant_of(manifest, variant_name)
    adapter = manifest.previous_adapter(variant) if variant.continues else None
    run = manifest.run_dir
    return spec_hash({
        "variant": variant.model_dump(mode="json"), "seed": seed, "cell": cell,
        "hp": manifest.objective(variant, cell).model_dump(mode="json"),
        "training": manifest.training.model_dump(mode="json", include={"zero_stage", "d0_augmentation", "packing",
                                                                      "image_order", "d0_augmentation_seed"}),
        "validation": manifest.validation.model_dump(mode="json"),
        "policy_template": manifest.policy_template, "images": file_digest(manifest.data.images),
        "model": model_fingerprint(manifest.model, run.fingerprint_memo),
        "model_options": manifest.model.model_dump(mode="json", include={"dtype", "image_size", "image_splitting"}),
        "inputs": [file_digest(p) for p in (run.data.turns, run.round_feedback(manifest.round),
                                            manifest.data.seed_data, manifest.data.validation, adapter)],
        "seed_turns": file_digest(manifest.data.seed_turns) if manifest.data.seed_turns else None,
        "collecting": _collecting_digests(manifest, variant)})


def tracked_run(manifest: Manifest, variant: str, seed: int, cell: str, spec_hash: str) -> TrackedRun | None:
    """Where a task's training is tracked: one run per (experiment, round, variant, cell, seed, spec)."""
    section = manifest.tracking
    if section.backend == "none":
        return None
    return TrackedRun(section, section.project or manifest.experiment,
                      run_name(manifest.experiment, f"round-{manifest.round}", variant, cell, f"seed-{seed}",
                               spec_hash[:8]),
                      manifest.run_dir.tracking, task_dir(manifest, variant, seed, cell).tracking)


def _collecting_digests(manifest: Manifest, variant: Variant) -> dict[str, str] | None:
    """What KTO's reference depends on: each collecting adapter's content (None where one is missing: the
    task refuses to start, saying which)."""
    if variant.objective != "kto" or manifest.seed_round or not manifest.run_dir.data.turns.is_file():
        return None
    try:
        turns = pl.read_parquet(manifest.run_dir.data.turns)
        adapters = collecting_adapters(variant, turns, manifest.collecting_adapter)
    except IngestError:
        return None
    return {f"{policy}@{round_}": file_digest(path) for (policy, round_), path in adapters.items()}


def seed_turns(path: Path | None) -> frozenset[str] | None:
    """The D_0 turn ids of ``data.seed_turns`` (one a line; an ``_aug...`` suffix names its source turn)."""
    if path is None:
        return None
    try:
        ids = {line.strip().split("_aug")[0] for line in path.read_text().splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"data.seed_turns: cannot read '{path}' ({exc.__class__.__name__}): expected a text "
                            "file of game_turn_ids, one a line") from None
    if not ids:
        raise TrainingError(f"data.seed_turns: '{path}' lists no turn ids")
    return frozenset(ids)


def _turns_of(path: Path | None) -> pl.DataFrame | None:
    return None if path is None else ingest([path], policies=None).turns


def prepare(manifest: Manifest, variant_name: str, seed: int, cell: str = DEFAULT_CELL) -> Prepared:
    """Everything one task needs, checked; raises TrainingError naming what is wrong."""
    variant = variant_of(manifest, variant_name)
    hp = manifest.objective(variant, cell)
    resources = manifest.cluster.stages["train"]
    accumulation_steps(hp.effective_batch, hp.micro_batch, resources.processes * resources.nodes,
                       f"training.{variant.objective}")
    run = manifest.run_dir
    turns_path, feedback_path = run.data.turns, run.round_feedback(manifest.round)
    for path, stage in ((turns_path, "ingest"), (feedback_path, "decode")):
        if not path.is_file() and not manifest.seed_round:
            raise TrainingError(f"{path}: missing; run the {stage} stage first")
    if manifest.data.validation is None:
        raise TrainingError("data.validation: required for training (human-human games for checkpoint selection)")
    adapter = None
    if variant.continues:
        adapter = manifest.previous_adapter(variant)
        if not (adapter / "adapter_config.json").is_file():
            raise TrainingError(f"variant {variant.name}: continues from the previous round's adapter, but "
                                f"'{adapter}' holds none (set previous_adapter, or init: base)")
    logged = None if manifest.seed_round else (pl.read_parquet(turns_path), pl.read_parquet(feedback_path))
    examples = training_set(logged, _turns_of(manifest.data.seed_data), variant=variant, hp=hp,
                            augmentation=manifest.training.d0_augmentation,
                            augmentation_seed=manifest.training.d0_augmentation_seed,
                            include=seed_turns(manifest.data.seed_turns))
    validation = validation_turns(_turns_of(manifest.data.validation), limit=manifest.validation.turns)
    if is_multimodal_model(manifest.model):
        _check_images(manifest, examples, "training examples")
        _check_images(manifest, validation, "data.validation")
    vision_cache = (run.vision_cache(manifest.round, model_fingerprint(manifest.model, run.fingerprint_memo)[:16])
                    if manifest.training.vision_cache else None)
    constrained = manifest.validation.constrained
    constrained = variant.objective == "kto" if constrained is None else constrained
    collecting = None if logged is None else collecting_adapters(variant, logged[0], manifest.collecting_adapter)
    spec_hash = task_hash(manifest, variant.name, seed, cell)
    spec = TrainSpec(objective=variant.objective, hp=hp, seed=seed, model=manifest.model,
                     policy_template=manifest.policy_template, images=manifest.data.images,
                     out=task_dir(manifest, variant.name, seed, cell), training=manifest.training,
                     validation=manifest.validation.model_copy(update={"constrained": constrained}), adapter=adapter,
                     vision_cache=vision_cache, cell=cell, spec_hash=spec_hash, collecting=collecting,
                     tracking=tracked_run(manifest, variant.name, seed, cell, spec_hash))
    return Prepared(spec, examples, validation)


def _check_images(manifest: Manifest, turns: pl.DataFrame, what: str) -> None:
    folder = manifest.data.images
    if folder is None:
        raise TrainingError("data.images: required to train a multimodal policy (the folder of tangram PNGs)")
    names = sorted(turns.select(pl.col("context").list.explode()).unique().to_series().to_list())
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise TrainingError(f"{what}: {len(missing)} images are not in data.images '{folder}', e.g. {missing[0]}")
    for name in names:  # before any GPU time: a damaged image would stop the task mid-epoch
        problem = image_problem(folder / name)
        if problem:
            raise TrainingError(f"{what}: data.images '{folder / name}': {problem}")


def set_distributed_env() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR/PORT for torch.distributed: from submitit inside a job, else one process."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        env = None
    if env is not None and env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return
    with socket.socket() as sock:  # a free port: several one-process tasks may share a machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")


class StopRequest:
    """SIGUSR2 (and SIGTERM) set a flag that the loop reads at each optimizer step, instead of exiting at once."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self._note)

    def _note(self, signum, frame) -> None:
        self.received = signum

    def is_set(self) -> bool:
        return self.received is not None

    def hand_over(self) -> None:
        """Give the signal to the handler that was there before (submitit's: checkpoint and requeue)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        handler = self.previous[self.received]
        if callable(handler):
            handler(self.received, None)
        raise SystemExit(f"stopped by {signal.Signals(self.received).name}; the checkpoint is saved and a rerun "
                         "resumes from it")


class TrainTask(submitit.helpers.Checkpointable):
    """One training task as a submitit callable: requeued with the same arguments when preempted."""

    def __init__(self, manifest: Manifest, variant: str, seed: int, cell: str = DEFAULT_CELL):
        self.manifest, self.variant, self.seed, self.cell = manifest, variant, seed, cell

    def __call__(self) -> dict:
        torch.set_num_threads(self.manifest.cluster.stages["train"].cpus)
        prepared = prepare(self.manifest, self.variant, self.seed, self.cell)
        out = prepared.spec.out
        if finished(out, prepared.spec.spec_hash):
            console.print(f"{self.variant} seed {self.seed}: done already ({out.done}), skipped")
            return json.loads(out.done.read_text())
        if out.done.is_file() and outputs_problem(out):
            console.print(f"{self.variant} seed {self.seed}: {outputs_problem(out)}; training again from the start")
            clear_task(out)
        set_distributed_env()
        main = os.environ.get("RANK", "0") == "0"
        stop = StopRequest()
        console.print(f"{self.variant} seed {self.seed}: {prepared.examples.height} examples "
                      f"({_source_counts(prepared.examples)}), {prepared.validation.height} validation turns -> "
                      f"{out.root}")
        console.print(f"{self.variant} seed {self.seed}: "
                      f"{self.manifest.training.in_force(prepared.spec.objective, prepared.spec.hp)}")
        outcome = train(prepared.spec, prepared.examples, prepared.validation, stop.is_set,
                        progress=console.print if main else (lambda _: None))
        if outcome == "stopped":
            stop.hand_over()
        result = {"variant": self.variant, "cell": self.cell, "seed": self.seed,
                  "spec_hash": prepared.spec.spec_hash, "examples": prepared.examples.height,
                  "epochs": prepared.spec.hp.epochs, **best_epoch(out)}
        if main:
            atomic_write_parquet(source_counts(prepared.examples), out.sources)  # for reports
            atomic_write_text(json.dumps(result, indent=1), out.done)
        return result


def _source_counts(examples: pl.DataFrame) -> str:
    return ", ".join(f"{r['examples']} {r['source']} {r['policy']} round {r['round']}"
                     for r in source_counts(examples).iter_rows(named=True))


def best_epoch(out: TaskDir) -> dict:
    """The epoch with the highest validation exact match (ties: lower loss, then earlier)."""
    epochs = pl.read_parquet(out.metrics).filter(pl.col("val_exact_match").is_not_null())
    best = rank(epochs).row(0, named=True)
    return {"best_epoch": best["epoch"], "val_exact_match": best["val_exact_match"], "val_loss": best["val_loss"]}


def run(manifest: Manifest, variant: str, seed: int, cell: str = DEFAULT_CELL) -> dict:
    """Run one task in this process (world size 1)."""
    return TrainTask(manifest, variant, seed, cell)()


def done(manifest: Manifest) -> set[str]:
    return {task_key(v, c, s) for v, c, s in manifest.training_tasks()
            if finished(task_dir(manifest, v, s, c), task_hash(manifest, v, s, c))}


def progress(manifest: Manifest, key: str) -> str:
    """A running task's last checkpoint: its epoch of all and its last validation exact match."""
    found = next(((v, c, s) for v, c, s in manifest.training_tasks() if task_key(v, c, s) == key), None)
    metrics = task_dir(manifest, found[0], found[2], found[1]).metrics if found else None
    if metrics is None or not metrics.is_file():
        return "no checkpoint yet"
    try:
        rows = pl.read_parquet(metrics)
    except (OSError, pl.exceptions.ComputeError):
        return "no checkpoint yet"
    epochs = manifest.objective(variant_of(manifest, found[0]), found[1]).epochs
    validated = rows.filter(pl.col("val_exact_match").is_not_null())
    text = f"epoch {rows['epoch'].max()}/{epochs}, step {rows['step'].max()}"
    if validated.height:
        text += f", validation exact match {validated['val_exact_match'][-1]:.3f} (epoch {validated['epoch'][-1]})"
    return text


STAGE = Stage("train", upstream=("ingest", "merge"), done=done, progress=progress,
              tasks=lambda m: [Task(task_key(v, c, s), TrainTask(m, v, s, c)) for v, c, s in m.training_tasks()])
