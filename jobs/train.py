"""Train stage: one task per (variant, seed), run as a submitit Checkpointable array task.

:func:`prepare` builds a task's training set, validation turns and settings and
refuses bad input before any GPU time (an empty training set, a missing previous
adapter, images the folder lacks, a batch the world cannot divide). A
:class:`TrainTask` runs :func:`respect_hpc.training.trainer.train` in each of its processes;
on SIGUSR2 (preemption, or the time limit coming) it finishes the optimizer step,
saves a checkpoint and hands over to submitit, which requeues it; the requeued
task resumes from that checkpoint. A finished task writes ``done.json`` with the
hash of its spec, and a rerun with the same spec skips it.
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
from rich.console import Console

from jobs.decode import FEEDBACK_FILE
from jobs.ingest import TURNS_FILE
from respect_hpc.data.datasets import source_counts, training_set, validation_turns
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.data.logs import ingest
from respect_hpc.config.schema import Manifest, Variant
from respect_hpc.model.loading import is_multimodal, model_fingerprint
from respect_hpc.core.rundir import RunDir
from respect_hpc.core.io import atomic_write_parquet, atomic_write_text
from respect_hpc.training.selection import rank
from respect_hpc.training.trainer import DONE_FILE, METRICS_FILE, SOURCES_FILE, TrainingError, TrainSpec, accumulation_steps, adapter_problem, clear_task, train

console = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class Prepared:
    spec: TrainSpec
    examples: pl.DataFrame
    validation: pl.DataFrame
    spec_hash: str


def variant_of(manifest: Manifest, name: str) -> Variant:
    for variant in manifest.variants:
        if variant.name == name:
            return variant
    raise TrainingError(f"--variant {name}: the manifest has no such variant; expected one of "
                        f"{', '.join(v.name for v in manifest.variants)}")


def task_dir(manifest: Manifest, variant: str, seed: int, cell: str = "default") -> Path:
    """round-R/train/<variant>/seed-<s>, or round-R/train/<variant>@<cell>/seed-<s> in a sweep."""
    name = variant if cell == "default" else f"{variant}@{cell}"
    return RunDir.of(manifest).round(manifest.round) / "train" / name / f"seed-{seed}"


def previous_adapter(manifest: Manifest, variant: Variant) -> Path:
    return variant.previous_adapter or RunDir.of(manifest).previous_policy(manifest.round, variant.name)


def inputs(manifest: Manifest) -> tuple[Path, Path]:
    run = RunDir.of(manifest)
    return run.data / TURNS_FILE, run.round(manifest.round) / FEEDBACK_FILE


def task_hash(manifest: Manifest, variant_name: str, seed: int, cell: str = "default") -> str:
    """The hash of a task's spec: settings, model, and the digests of every input it reads."""
    variant = variant_of(manifest, variant_name)
    adapter = previous_adapter(manifest, variant) if variant.continues else None
    run = RunDir.of(manifest)
    return spec_hash({
        "variant": variant.model_dump(mode="json"), "seed": seed, "cell": cell,
        "hp": manifest.objective(variant, cell).model_dump(mode="json"),
        "training": manifest.training.model_dump(mode="json", include={"zero_stage", "d0_augmentation", "packing",
                                                                      "image_order"}),
        "validation": manifest.validation.model_dump(mode="json"),
        "policy_template": manifest.policy_template, "images": str(manifest.data.images),
        "model": model_fingerprint(manifest.model, run.root / "cache" / "fingerprints.json"),
        "model_options": manifest.model.model_dump(mode="json", include={"dtype", "image_size", "image_splitting"}),
        "inputs": [file_digest(p) for p in (*inputs(manifest), manifest.data.seed_data, manifest.data.validation,
                                            adapter)]})


def _turns_of(path: Path | None) -> pl.DataFrame | None:
    return None if path is None else ingest([path], policies=None).turns


def prepare(manifest: Manifest, variant_name: str, seed: int, cell: str = "default") -> Prepared:
    """Everything one task needs, checked; raises TrainingError naming what is wrong."""
    variant = variant_of(manifest, variant_name)
    hp = manifest.objective(variant, cell)
    resources = manifest.cluster.stages["train"]
    accumulation_steps(hp.effective_batch, hp.micro_batch, resources.processes * resources.nodes,
                       f"training.{variant.objective}")
    turns_path, feedback_path = inputs(manifest)
    for path, stage in ((turns_path, "ingest"), (feedback_path, "decode")):
        if not path.is_file() and not manifest.seed_round:
            raise TrainingError(f"{path}: missing; run the {stage} stage first")
    if manifest.data.validation is None:
        raise TrainingError("data.validation: required for training (human-human games for checkpoint selection)")
    adapter = None
    if variant.continues:
        adapter = previous_adapter(manifest, variant)
        if not (adapter / "adapter_config.json").is_file():
            raise TrainingError(f"variant {variant.name}: continues from the previous round's adapter, but "
                                f"'{adapter}' holds none (set previous_adapter, or init: base)")
    logged = None if manifest.seed_round else (pl.read_parquet(turns_path), pl.read_parquet(feedback_path))
    examples = training_set(logged, _turns_of(manifest.data.seed_data), variant=variant, hp=hp, seed=seed,
                            augmentation=manifest.training.d0_augmentation)
    validation = validation_turns(_turns_of(manifest.data.validation), limit=manifest.validation.turns)
    from transformers import AutoConfig

    if is_multimodal(AutoConfig.from_pretrained(manifest.model.path, gguf_file=manifest.model.gguf_file)):
        _check_images(manifest, examples, "training examples")
        _check_images(manifest, validation, "data.validation")
    spec_hash = task_hash(manifest, variant.name, seed, cell)
    run = RunDir.of(manifest)
    vision_cache = (run.round(manifest.round) / "vision-cache"
                    / model_fingerprint(manifest.model, run.root / "cache" / "fingerprints.json")[:16]
                    if manifest.training.vision_cache else None)
    constrained = manifest.validation.constrained
    constrained = variant.objective == "kto" if constrained is None else constrained
    spec = TrainSpec(objective=variant.objective, hp=hp, seed=seed, model=manifest.model,
                     policy_template=manifest.policy_template, images=manifest.data.images,
                     out=task_dir(manifest, variant.name, seed, cell), adapter=adapter,
                     zero_stage=manifest.training.zero_stage, checkpoint_every=manifest.training.checkpoint_every,
                     validation=manifest.validation.model_copy(update={"constrained": constrained}), cell=cell,
                     gradient_checkpointing=manifest.training.gradient_checkpointing,
                     packing=manifest.training.packing, image_order=manifest.training.image_order,
                     vision_cache=vision_cache, spec_hash=spec_hash)
    return Prepared(spec, examples, validation, spec_hash)


def _check_images(manifest: Manifest, turns: pl.DataFrame, what: str) -> None:
    folder = manifest.data.images
    if folder is None:
        raise TrainingError("data.images: required to train a multimodal policy (the folder of tangram PNGs)")
    names = turns.select(pl.col("context").list.explode()).unique().to_series().to_list()
    missing = sorted(n for n in names if not (folder / n).is_file())
    if missing:
        raise TrainingError(f"{what}: {len(missing)} images are not in data.images '{folder}', e.g. {missing[0]}")


def outputs_problem(out: Path) -> str | None:
    """What is wrong with a finished task's outputs that later stages trust (every epoch's adapter), or None."""
    try:
        epochs = json.loads((out / DONE_FILE).read_text()).get("epochs")
    except (OSError, ValueError):
        return f"'{out / DONE_FILE}' is unreadable"
    for epoch in range(1, (epochs or 0) + 1):
        problem = adapter_problem(out / "epochs" / f"epoch-{epoch:03d}")
        if problem:
            return f"epoch {epoch}: {problem}"
    return None if epochs else f"'{out / DONE_FILE}' names no epochs"


def is_done(out: Path, spec_hash: str) -> bool:
    """The task finished under this spec and its epoch adapters are intact."""
    done = out / DONE_FILE
    try:
        recorded = json.loads(done.read_text()).get("spec_hash") if done.is_file() else None
    except ValueError:
        return False
    return recorded == spec_hash and outputs_problem(out) is None


def _distributed_env() -> None:
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

    def __init__(self, manifest: Manifest, variant: str, seed: int, cell: str = "default"):
        self.manifest, self.variant, self.seed, self.cell = manifest, variant, seed, cell

    def __call__(self) -> dict:
        torch.set_num_threads(self.manifest.cluster.stages["train"].cpus)
        prepared = prepare(self.manifest, self.variant, self.seed, self.cell)
        out = prepared.spec.out
        if is_done(out, prepared.spec_hash):
            console.print(f"{self.variant} seed {self.seed}: done already ({out / DONE_FILE}), skipped")
            return json.loads((out / DONE_FILE).read_text())
        if (out / DONE_FILE).is_file() and outputs_problem(out):
            console.print(f"{self.variant} seed {self.seed}: {outputs_problem(out)}; training again from the start")
            clear_task(out)
        _distributed_env()
        main = os.environ.get("RANK", "0") == "0"
        stop = StopRequest()
        console.print(f"{self.variant} seed {self.seed}: {prepared.examples.height} examples "
                      f"({_source_counts(prepared.examples)}), {prepared.validation.height} validation turns -> {out}")
        outcome = train(prepared.spec, prepared.examples, prepared.validation, stop.is_set,
                        progress=console.print if main else (lambda _: None))
        if outcome == "stopped":
            stop.hand_over()
        result = {"variant": self.variant, "cell": self.cell, "seed": self.seed, "spec_hash": prepared.spec_hash,
                  "examples": prepared.examples.height, "epochs": prepared.spec.hp.epochs, **best_epoch(out)}
        if main:
            atomic_write_parquet(source_counts(prepared.examples), out / SOURCES_FILE)  # for reports
            atomic_write_text(json.dumps(result, indent=1), out / DONE_FILE)
        return result


def _source_counts(examples: pl.DataFrame) -> str:
    return ", ".join(f"{r['examples']} {r['source']} {r['policy']} round {r['round']}"
                     for r in source_counts(examples).iter_rows(named=True))


def best_epoch(out: Path) -> dict:
    """The epoch with the highest validation exact match (ties: lower loss, then earlier)."""
    epochs = pl.read_parquet(out / METRICS_FILE).filter(pl.col("val_exact_match").is_not_null())
    best = rank(epochs).row(0, named=True)
    return {"best_epoch": best["epoch"], "val_exact_match": best["val_exact_match"], "val_loss": best["val_loss"]}


def run_task(manifest: Manifest, variant: str, seed: int, cell: str = "default") -> dict:
    """Run one task in this process (world size 1)."""
    return TrainTask(manifest, variant, seed, cell)()

