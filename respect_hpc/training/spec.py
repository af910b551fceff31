"""What one training task is: its settings (the manifest's sections, whole), where it writes, and the
optimizers and schedules a manifest can name.

A :class:`TrainSpec` holds everything a task needs besides its examples; its ``spec_hash`` (of the settings
and the inputs' digests) marks its checkpoints and outputs, so that nothing another spec wrote is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from respect_hpc.config.schema import Hyperparameters, ModelSection, TrainingSection, ValidationSection
from respect_hpc.core.errors import RespectError
from respect_hpc.core.rundir import DEFAULT_CELL, TaskDir
from respect_hpc.training.tracking import TrackedRun


def check_optimizer(name: str, section: str) -> None:
    """Refuse, before any model is loaded, an optimizer this machine cannot run."""
    if name != "paged_adamw_8bit":
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        missing = "bitsandbytes is not installed" if importlib.util.find_spec("bitsandbytes") is None else "no CUDA device"
        raise TrainingError(f"{section}.optimizer: paged_adamw_8bit needs bitsandbytes and a CUDA device ({missing} "
                            "here); set optimizer: adamw to train here")


def optimizer(name: str, params, lr: float, weight_decay: float, section: str):
    """The optimizer ``name`` of training.<objective>.optimizer (``section``): AdamW, RMSprop, or bitsandbytes'
    paged 8-bit AdamW (the official FFT/RL runs), which needs bitsandbytes and a CUDA device."""
    check_optimizer(name, section)
    if name == "paged_adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    kinds = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    return kinds[name](params, lr=lr, weight_decay=weight_decay)


def schedule(name: str, optimizer, warmup_steps: int, total_steps: int):
    """The learning-rate schedule ``name`` (cosine or constant, after linear warm-up)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)


class TrainingError(RespectError, RuntimeError):
    """Training that cannot start or go on (a bad batch size, a NaN loss), with what to do."""


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training task needs besides its examples."""

    objective: str
    hp: Hyperparameters
    seed: int
    model: ModelSection
    policy_template: str
    images: Path | None
    out: TaskDir
    training: TrainingSection = TrainingSection()
    validation: ValidationSection = ValidationSection(constrained=False)
    adapter: Path | None = None       # continue from this adapter (KTO) instead of new LoRA weights
    vision_cache: Path | None = None  # where a frozen vision model's outputs are kept; None: off
    collecting: dict[tuple[str, int], Path] | None = None  # KTO: (policy, round) -> the adapter that logged it
    cell: str = DEFAULT_CELL
    spec_hash: str = ""               # of the task's settings and inputs: checkpoints resume only under it
    tracking: TrackedRun | None = None  # where losses, throughput and validation are tracked; None: nowhere


def accumulation_steps(effective_batch: int, micro_batch: int, world_size: int, where: str = "training",
                       answers: float = 1.0) -> int:
    """Micro-batches each process accumulates per optimizer step, so that a step covers ``effective_batch``
    trained actions (about, where a sequence holds ``answers`` of them on average: packed games); refuses a
    batch the world cannot divide."""
    if effective_batch % (micro_batch * world_size):
        raise TrainingError(f"{where}.effective_batch {effective_batch} is not a multiple of micro_batch "
                            f"{micro_batch} x {world_size} processes")
    return max(1, round(effective_batch / (micro_batch * world_size * answers)))
