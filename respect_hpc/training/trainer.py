"""The training loop of one task (round, variant, seed): LoRA through PEFT, Accelerate, DeepSpeed ZeRO.

:func:`train` runs in every process of a task's world (one per GPU; ``RANK`` and ``WORLD_SIZE`` in the
environment). A :class:`Trainer` sets up the accelerator, the task's data (batches.py), the model with its
LoRA adapter, the optimizer and schedule, the losses (losses.py), validation (validation.py) and
checkpoints (checkpoints.py); :meth:`Trainer.run` trains epoch by epoch, one optimizer step at a time
(:meth:`Trainer.step`). Each step accumulates as many micro-batches (spread over the processes) as make about
``effective_batch`` trained actions, and its loss is the mean over the actions it holds. Checkpoints are
written at every epoch's end, every ``checkpoint_every`` steps and when ``should_stop`` turns true (a
preemption signal); a new call resumes from the newest one and ends exactly where an uninterrupted run
would. A Trainer is a context manager: leaving it frees the process group and Accelerate's state, so one
process can run another task.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import polars as pl
import torch

from respect_hpc.core.text import duration
from respect_hpc.domain.prompts import policy_template
from respect_hpc.model.loading import load_encoder, load_policy
from respect_hpc.model.vision_cache import cache_vision
from respect_hpc.training.batches import Batch, TaskData, pinned, to_device
from respect_hpc.training.checkpoints import Checkpoints, discard_unusable, latest_checkpoint
from respect_hpc.training.losses import Losses, collecting_reference
from respect_hpc.training.spec import TrainingError, TrainSpec, accumulation_steps, check_optimizer, optimizer, schedule
from respect_hpc.training.tracking import Tracking, check_backend
from respect_hpc.training.validation import Validator


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, over every process: the mean loss and its parts, the gradient norm before the
    update (None where the engine gives none), and the tokens run."""

    loss: float
    objective: float
    entropy: float
    grad_norm: float | None
    tokens: int


def peak_memory_gib() -> float:
    """This process's peak: GPU memory allocated on a GPU, resident memory on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _accelerator(spec: TrainSpec, accumulation: int, world: int):
    """Accelerate, with a DeepSpeed ZeRO plugin unless ``training.zero_stage`` is null; gloo on CPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    bf16 = spec.model.dtype == "bf16"
    plugin = None
    if spec.training.zero_stage is not None:
        plugin = DeepSpeedPlugin(hf_ds_config={
            "zero_optimization": {"stage": spec.training.zero_stage},
            "train_micro_batch_size_per_gpu": spec.hp.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": spec.hp.micro_batch * accumulation * world,
            "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
        })
    return Accelerator(gradient_accumulation_steps=accumulation, deepspeed_plugin=plugin,
                       step_scheduler_with_optimizer=False,
                       mixed_precision="bf16" if bf16 and cuda and plugin is None else "no",
                       kwargs_handlers=[] if cuda else [InitProcessGroupKwargs(backend="gloo")])


class Trainer:
    """One task's model, optimizer and data in one process; :meth:`run` trains to the end or to a stop."""

    def __init__(self, spec: TrainSpec, examples: pl.DataFrame, validation: pl.DataFrame):
        self.spec, self.hp = spec, spec.hp
        check_optimizer(self.hp.optimizer, f"training.{spec.objective}")
        if spec.tracking is not None:
            check_backend(spec.tracking.section)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        template = policy_template(spec.policy_template)
        encoder = load_encoder(spec.model, spec.images)
        self.data = TaskData(spec, examples, encoder, template)
        self.accum = accumulation_steps(self.hp.effective_batch, self.hp.micro_batch, world,
                                        f"training.{spec.objective}", self.data.answers_per_sequence)
        self.per_step = world * self.accum  # micro-batches of a step, all processes
        self.accelerator = _accelerator(spec, self.accum, world)
        self.deepspeed = spec.training.zero_stage is not None
        with self.accelerator.main_process_first():
            if self.accelerator.is_main_process:
                discard_unusable(spec.out, spec.spec_hash, print)
        model = load_policy(spec.model, r=self.hp.lora_r, alpha=self.hp.lora_alpha, dropout=self.hp.lora_dropout,
                            placement=self.hp.lora_placement, init=self.hp.lora_init, adapter=spec.adapter,
                            seed=spec.seed,
                            gradient_checkpointing=spec.training.gradient_checkpointing)
        self.vision_cache = (cache_vision(model, spec.vision_cache, encoder.family.vision_tower)
                             if spec.vision_cache else None)
        encoder.digests = self.vision_cache is not None  # batches bring their crops' digests to the cache
        model.to(self.accelerator.device)
        if spec.objective == "kto" and spec.collecting is None:
            raise TrainingError("KTO needs the adapters that logged its examples (TrainSpec.collecting)")
        reference = collecting_reference(model, spec, self.data, self.accelerator) if spec.objective == "kto" else None
        adam = optimizer(self.hp.optimizer, [p for p in model.parameters() if p.requires_grad],
                         self.hp.learning_rate, self.hp.weight_decay, f"training.{spec.objective}")
        # optimizer steps of each epoch (they differ only where negatives are drawn per epoch and packing
        # leaves a game without any), and the step each epoch starts at
        self.epoch_steps = [len(self.data.epoch(e, self.per_step)) // self.per_step for e in range(self.hp.epochs)]
        self.epoch_start = [sum(self.epoch_steps[:e]) for e in range(self.hp.epochs + 1)]
        scheduler = schedule(self.hp.schedule, adam, self.hp.warmup_steps, self.epoch_start[-1])
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, adam, scheduler)
        self.checkpoints = Checkpoints(self.accelerator, self.model, spec.out, spec.spec_hash, self.deepspeed)
        self.losses = Losses(spec, self.data, self.accelerator, self.model, reference)
        self.validate = Validator(validation.to_dicts(), encoder, template, spec.validation, self.accelerator,
                                  self.hp.micro_batch, spec.seed)
        config = {"objective": spec.objective, "seed": spec.seed, "cell": spec.cell, "spec_hash": spec.spec_hash,
                  **{k: v for k, v in self.hp.model_dump().items() if isinstance(v, (bool, int, float, str))}}
        self.tracking = Tracking.start(spec.tracking, config, self.accelerator.is_main_process)
        self.waited = 0.0  # seconds the loop waited for micro-batches to be built (batches)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        """Free the process group and Accelerate's shared state, so this process can run another task.
        (Accelerate has no public reset of its process-wide state; its own tests call ``_reset_state``.)"""
        from accelerate.state import AcceleratorState

        self.tracking.close()
        self.accelerator.free_memory()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)

    # -- the guard against silent non-training -------------------------------------------------------
    def _lora_b(self) -> dict[str, torch.Tensor] | None:
        """A copy of every LoRA B matrix (they start at zero and must move), or None where ZeRO-3 shards them."""
        if self.spec.training.zero_stage == 3:
            return None
        return {n: p.detach().clone() for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                if "lora_B" in n}

    def _check_moved(self, before: dict[str, torch.Tensor], step: int) -> None:
        after = self._lora_b()
        moved, = self._reduce([float(any(not torch.equal(before[n], after[n]) for n in before))], "max")
        if not before or not moved:
            raise TrainingError(f"step {step}: no LoRA B matrix moved ({len(before)} checked) although the learning "
                                "rate is above zero: the adapter is not training (frozen LoRA parameters, or "
                                "gradients that never reach them); stopped")

    # -- the loop -----------------------------------------------------------------------------------
    def _reduce(self, values: list[float], how: str) -> list[float]:
        return self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), how).tolist()

    def step(self, micro_batches: list[list[int]], epoch: int, step: int) -> StepResult:
        """One optimizer step over the step's ``micro_batches`` (every process's; this process runs its share)."""
        accelerator = self.accelerator
        answers = self.data.answers(micro_batches, epoch)
        first = accelerator.process_index * self.accum
        mine = micro_batches[first:first + self.accum]
        z = self.losses.reference_point(mine, epoch) if self.spec.objective == "kto" else None
        sums, tokens, norm = [0.0, 0.0, 0.0], 0, None
        for batch in self.batches(mine, epoch):
            tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(self.model):
                parts = self.losses.loss(batch, z, scale=self.per_step / answers)
                bad, = self._reduce([float(not torch.isfinite(parts.total).item())], "max")
                if bad:
                    raise TrainingError(
                        f"step {step + 1} (epoch {epoch}): the loss is not finite; stopped; the last good "
                        f"checkpoint is {latest_checkpoint(self.spec.out) or 'none (no step finished)'}")
                accelerator.backward(parts.total)
                if accelerator.sync_gradients and not self.deepspeed:  # the norm alone: an infinite bound clips nothing
                    norm = accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))
                self.optimizer.step()
                if accelerator.sync_gradients:
                    if self.deepspeed:  # the engine's norm of the step it has just taken
                        norm = accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))
                    self.scheduler.step()
                self.optimizer.zero_grad()
            sums = [s + float(v) / self.accum for s, v in zip(sums, (parts.total.detach(), parts.objective,
                                                                      parts.entropy))]
        loss, objective, entropy = self._reduce(sums, "mean")
        tokens, = self._reduce([float(tokens)], "sum")
        return StepResult(loss, objective, entropy, None if norm is None else float(norm), int(tokens))

    def batches(self, mine: list[list[int]], epoch: int):
        """This process's micro-batches of a step, in order, on the device; with ``training.prefetch`` (default:
        on a GPU) each is built (tokens, pixels; pinned on a GPU) in a worker thread while the one before it
        runs. ``waited`` adds up the seconds the loop waited for them."""
        device, cuda = self.accelerator.device, torch.cuda.is_available()

        def build(indices: list[int]) -> Batch:
            batch = self.data.batch(indices, epoch)
            return pinned(batch) if cuda else batch

        prefetch = self.spec.training.prefetch
        if not (cuda if prefetch is None else prefetch):
            for indices in mine:
                started = time.perf_counter()
                batch = build(indices)
                self.waited += time.perf_counter() - started
                yield to_device(batch, device)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="micro-batch") as pool:
            pending = pool.submit(build, mine[0]) if mine else None
            for i in range(len(mine)):
                started = time.perf_counter()
                batch = pending.result()
                self.waited += time.perf_counter() - started
                if i + 1 < len(mine):
                    pending = pool.submit(build, mine[i + 1])
                yield to_device(batch, device, non_blocking=True)

    def run(self, should_stop: Callable[[], bool] = lambda: False, progress: Callable[[str], None] = print) -> str:
        """Train to the last epoch ("finished") or to a stop request ("stopped", after a checkpoint)."""
        accelerator, hp, spec = self.accelerator, self.hp, self.spec
        engine = f"DeepSpeed ZeRO-{spec.training.zero_stage}" if self.deepspeed else "Accelerate"
        n_examples, n_sequences = len(self.data.examples), len(self.data.sequences)
        per_epoch = self.epoch_steps[0]
        progress(f"{engine}, {accelerator.num_processes} process(es) on {accelerator.device} ({spec.model.attention} "
                 f"attention), {self.accum} micro-batch(es) of {hp.micro_batch} sequences accumulated per step, "
                 f"{per_epoch} steps per epoch; {n_examples} trained actions in {n_sequences} sequences "
                 f"({spec.training.packing} packing), about {n_examples / per_epoch:.1f} a step"
                 + ("" if self.data.drawn is None else "; negatives drawn afresh each epoch")
                 + (f"; vision features cached in {spec.vision_cache}" if self.vision_cache else ""))
        step, first_epoch = self.checkpoints.resume()
        if step:
            progress(f"resumed at step {step} (epoch {first_epoch})")
        self.model.train()
        started = time.perf_counter()
        unmoved = self._lora_b() if step == 0 else None  # checked after the first step that has a learning rate
        answered = 0
        total_steps = self.epoch_start[-1]
        for epoch in range(first_epoch, hp.epochs):
            batches = self.data.epoch(epoch, self.per_step)
            for epoch_step in range(step - self.epoch_start[epoch], self.epoch_steps[epoch]):
                step_lr = self.scheduler.get_last_lr()[0]  # what this step's update uses (0 in early warm-up)
                micro_batches = batches[epoch_step * self.per_step:(epoch_step + 1) * self.per_step]
                step_started = time.perf_counter()
                result = self.step(micro_batches, epoch, step)
                loss = result.loss
                if unmoved is not None and step_lr > 0:
                    self._check_moved(unmoved, step + 1)
                    unmoved = None
                step += 1
                actions = self.data.answers(micro_batches, epoch)
                answered += actions
                seconds = time.perf_counter() - step_started
                lr = self.scheduler.get_last_lr()[0]
                self.checkpoints.rows.append((spec.cell, step, epoch + 1, loss, result.objective, result.entropy, lr,
                                              None, None))
                self.tracking.log(step, {
                    "train/loss": loss, "train/objective": result.objective, "train/entropy": result.entropy,
                    "train/learning_rate": step_lr, "train/actions_per_s": actions / seconds,
                    "train/tokens_per_s": result.tokens / seconds, "train/peak_memory_gib": peak_memory_gib(),
                    "train/epoch": epoch + 1, **({} if result.grad_norm is None else
                                                 {"train/grad_norm": result.grad_norm})})
                last_of_epoch = epoch_step == self.epoch_steps[epoch] - 1
                if step % 10 == 0 or last_of_epoch:
                    elapsed = time.perf_counter() - started
                    rate = answered / elapsed
                    eta = elapsed / max(step - self.epoch_start[first_epoch], 1) * (total_steps - step)
                    progress(f"epoch {epoch + 1}/{hp.epochs} step {step}/{total_steps} loss {loss:.4f} "
                             f"lr {lr:.2e} ({rate:.1f} trained actions/s, ETA {duration(eta)})")
                stop, = self._reduce([float(should_stop())], "max")
                if stop and not last_of_epoch:
                    self.checkpoints.save(step, epoch, epoch_done=False)
                    self.tracking.flush()
                    progress(f"stopped at step {step}; checkpoint saved")
                    return "stopped"
                if spec.training.checkpoint_every and step % spec.training.checkpoint_every == 0 \
                        and not last_of_epoch:
                    self.checkpoints.save(step, epoch, epoch_done=False)
                    self.tracking.flush()
            exact, val_loss = self.validate(accelerator.unwrap_model(self.model), epoch)
            self.checkpoints.rows.append((spec.cell, step, epoch + 1, None, None, None, None, exact, val_loss))
            progress(f"epoch {epoch + 1}: validation exact match {exact:.3f}, loss {val_loss:.4f}")
            self.tracking.log(step, {"validation/exact_match": exact, "validation/loss": val_loss})
            self.checkpoints.save(step, epoch, epoch_done=True)
            self.tracking.flush()
            stop, = self._reduce([float(should_stop())], "max")
            if stop and epoch + 1 < hp.epochs:
                progress(f"stopped after epoch {epoch + 1}; checkpoint saved")
                return "stopped"
        return "finished"


def train(spec: TrainSpec, examples: pl.DataFrame, validation: pl.DataFrame,
          should_stop: Callable[[], bool] = lambda: False, progress: Callable[[str], None] = print) -> str:
    """Run (or resume) one training task in this process; returns "finished" or "stopped"."""
    spec.out.root.mkdir(parents=True, exist_ok=True)
    with Trainer(spec, examples, validation) as trainer:
        return trainer.run(should_stop, progress)
