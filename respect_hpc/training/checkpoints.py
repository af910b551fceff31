"""A training task's checkpoints and outputs: written atomically, checked before they are trusted.

A checkpoint (``ckpt/step-SSSSSS/``: the adapter as safetensors, optimizer, scheduler and RNG state, the
position in the data) is written under a temporary name and renamed into place; its ``trainer.json`` lists
the digest of every file it holds and the hash of the spec that wrote it, so one written by another spec,
or damaged since, is never resumed. Each finished epoch's adapter is copied to ``epochs/epoch-EEE/``; the
task's ``done.json`` marks the end. Adapters are checked by their safetensors header against their size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl

from respect_hpc.core.hashing import bytes_digest
from respect_hpc.core.io import adapter_problem, atomic_copy_tree, atomic_write_parquet
from respect_hpc.core.rundir import TaskDir

# One row per optimizer step (loss, objective, entropy, learning rate) and per epoch (validation).
METRICS = pl.Schema({"cell": pl.String, "step": pl.Int64, "epoch": pl.Int64, "loss": pl.Float64,
                     "objective": pl.Float64, "entropy": pl.Float64, "learning_rate": pl.Float64,
                     "val_exact_match": pl.Float64, "val_loss": pl.Float64})


def latest_checkpoint(task: TaskDir) -> Path | None:
    done = sorted(p for p in task.checkpoints.glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def clear_task(task: TaskDir) -> None:
    """Remove a task's checkpoints, epoch adapters, metrics and done marker."""
    for folder in (task.checkpoints, task.epochs):
        shutil.rmtree(folder, ignore_errors=True)
    for path in (task.metrics, task.mismatch_reference, task.sources, task.done, task.tracking):
        path.unlink(missing_ok=True)


def inventory(checkpoint: Path) -> dict[str, str]:
    """The digest of every file of a checkpoint folder but its trainer.json, by relative name."""
    return {str(p.relative_to(checkpoint)): bytes_digest(p) for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != "trainer.json"}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (an unreadable trainer.json, a file missing or changed since it was
    written), or None."""
    try:
        recorded = json.loads((checkpoint / "trainer.json").read_text())["files"]
        found = inventory(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        return f"'{checkpoint / 'trainer.json'}' is unreadable or lists no files"
    for name, digest in recorded.items():
        if name not in found:
            return f"'{checkpoint / name}' is missing"
        if found[name] != digest:
            return f"'{checkpoint / name}' is damaged (its bytes changed since it was written)"
    return None


def discard_unusable(task: TaskDir, spec_hash: str, progress: Callable[[str], None]) -> None:
    """Remove what another spec (other settings or inputs) or a damaged checkpoint left in the task folder:
    its checkpoints, epoch adapters and metrics must never be resumed or reported by this one."""
    checkpoint = latest_checkpoint(task)
    if checkpoint is None:
        return
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        written_by = json.loads((checkpoint / "trainer.json").read_text()).get("spec_hash")
        if written_by == spec_hash:
            return
        problem = (f"{checkpoint} was written by another spec ({written_by or 'unrecorded'}, now {spec_hash}): "
                   "settings or inputs changed")
    progress(f"{problem}; training starts afresh")
    clear_task(task)


def outputs_problem(task: TaskDir) -> str | None:
    """What is wrong with a finished task's outputs that later stages trust (every epoch's adapter), or None."""
    try:
        epochs = json.loads(task.done.read_text()).get("epochs")
    except (OSError, ValueError):
        return f"'{task.done}' is unreadable"
    for epoch in range(1, (epochs or 0) + 1):
        problem = adapter_problem(task.epoch(epoch))
        if problem:
            return f"epoch {epoch}: {problem}"
    return None if epochs else f"'{task.done}' names no epochs"


def finished(task: TaskDir, spec_hash: str) -> bool:
    """The task finished under this spec and its epoch adapters are intact."""
    return recorded_spec(task) == spec_hash and outputs_problem(task) is None


def recorded_spec(task: TaskDir) -> str | None:
    """The spec hash a finished task recorded in done.json, or None (not finished, or unreadable)."""
    try:
        recorded = json.loads(task.done.read_text()).get("spec_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


class Checkpoints:
    """Saving and resuming one task's training state through its Accelerator (adapter only: never the frozen
    base weights), with the metrics rows so far."""

    def __init__(self, accelerator, model, task: TaskDir, spec_hash: str, deepspeed: bool):
        self.accelerator, self.model, self.task = accelerator, model, task
        self.spec_hash, self.deepspeed = spec_hash, deepspeed
        self.rows: list[tuple] = []
        if not deepspeed:
            accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
            accelerator.register_load_state_pre_hook(self._load_adapter)

    def _load_adapter(self, models, folder: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(Path(folder).parent / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(self.accelerator.unwrap_model(models[0]), weights)
        models.clear()

    def write_metrics(self) -> None:
        atomic_write_parquet(pl.DataFrame(self.rows, schema=METRICS, orient="row"), self.task.metrics)

    def save(self, step: int, epoch: int, epoch_done: bool) -> None:
        """Checkpoint after ``step`` optimizer steps, in (0-based) ``epoch``, atomically; at an epoch's end
        its adapter is kept under epochs/."""
        accelerator = self.accelerator
        final = self.task.checkpoint(step)
        tmp = final.with_name(f".{final.name}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"), **({"exclude_frozen_parameters": True} if self.deepspeed else {}))
        accelerator.wait_for_everyone()  # every process's shard is written before the inventory is taken
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(tmp / "adapter")
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, "epoch_done": epoch_done,
                                                          "spec_hash": self.spec_hash, "files": inventory(tmp)}))
            self.write_metrics()
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if epoch_done:
                atomic_copy_tree(final / "adapter", self.task.epoch(epoch + 1))
            for older in self.task.checkpoints.glob("step-*"):
                if older != final:
                    shutil.rmtree(older)
        accelerator.wait_for_everyone()

    def resume(self) -> tuple[int, int]:
        """Load the newest checkpoint; returns (optimizer steps done, epoch to continue)."""
        checkpoint = latest_checkpoint(self.task)
        if checkpoint is None:
            return 0, 0
        state = json.loads((checkpoint / "trainer.json").read_text())
        self.accelerator.load_state(str(checkpoint / "state"),
                                    **({"load_module_strict": False} if self.deepspeed else {}))
        if self.task.metrics.is_file():
            self.rows = [tuple(r) for r in pl.read_parquet(self.task.metrics)
                         .filter(pl.col("step") <= state["step"]).rows()]
        return state["step"], state["epoch"] + (1 if state["epoch_done"] else 0)
