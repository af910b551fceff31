"""The training loop of one task (round, variant, seed): LoRA through PEFT, Accelerate, DeepSpeed ZeRO.

:func:`train` runs in every process of a task's world (one per GPU; ``RANK`` and
``WORLD_SIZE`` in the environment). The trained turns of a game are one sequence
(game packing, batching.py; or one sequence a turn); a micro-batch holds
``micro_batch`` sequences, and each optimizer step accumulates as many micro-batches
(spread over the processes) as make about ``effective_batch`` trained actions; its loss
is the mean over the actions it holds. Batches are length-grouped and left-padded;
logits are computed at the answer positions only. D_0 is a task of its own: its
micro-batches never mix with the logged turns', and its rows are trained with
label-smoothed cross-entropy whatever the variant's objective.

Checkpoints (``ckpt/step-SSSSSS/``: the adapter as safetensors, optimizer,
scheduler and RNG state, the position in the data) are written atomically at every
epoch's end, every ``checkpoint_every`` steps, and when ``should_stop`` turns true
(a preemption signal); a new call resumes from the newest one and ends exactly
where an uninterrupted run would. ``trainer.json`` lists the digest of every file of
its checkpoint: one written by another spec, or damaged since, is never resumed. Each
epoch's adapter is kept under ``epochs/epoch-EEE/`` (1-based) with its validation exact
match in ``metrics.parquet``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from respect_hpc.data.batching import UNPACKED_SOURCES, epoch_batches, sequences
from respect_hpc.core.hashing import bytes_digest
from respect_hpc.config.schema import Hyperparameters, ModelSection, ValidationSection
from respect_hpc.model.loading import load_policy, load_processor, load_tokenizer
from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids
from respect_hpc.domain.multiref import letters_of, mismatched_click
from respect_hpc.training.objectives import ActionScores, cross_entropy_loss, kto_loss, reinforce_loss, score_actions
from respect_hpc.model.policy_inputs import Encoded, PolicyEncoder, PolicyView, answer_logits, image_order, policy_view
from respect_hpc.domain.prompts import policy_template
from respect_hpc.core.io import atomic_copy_tree, atomic_write_parquet
from respect_hpc.model.vision_cache import cache_vision

METRICS = pl.Schema({"cell": pl.String, "step": pl.Int64, "epoch": pl.Int64, "loss": pl.Float64,
                     "objective": pl.Float64, "entropy": pl.Float64, "learning_rate": pl.Float64,
                     "val_exact_match": pl.Float64, "val_loss": pl.Float64})
METRICS_FILE = "metrics.parquet"
SOURCES_FILE = "sources.parquet"  # examples per (source, policy, round) of a finished task
DONE_FILE = "done.json"       # written by the task's entry point (jobs/train.py) when it finished
MISMATCH_FILE = "mismatch_reference.parquet"  # KTO: log pi_ref(a'|x) of each logged example's mismatched click
REHEARSAL = ("d0", "augmented")  # example sources trained with label-smoothed cross-entropy in every variant


@dataclass(frozen=True)
class LossParts:
    """A micro-batch's loss (its share of the step's mean over answers, scaled for accumulation), the mean
    loss of its logged actions (D_0 rows left out; 0 without any) and the mean entropy term U, for the
    metrics table."""

    total: torch.Tensor
    objective: torch.Tensor
    entropy: torch.Tensor


class TrainingError(RuntimeError):
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
    out: Path
    adapter: Path | None = None     # continue from this adapter (KTO) instead of new LoRA weights
    zero_stage: int | None = 2
    checkpoint_every: int = 0
    validation: ValidationSection = ValidationSection(constrained=False)
    gradient_checkpointing: bool = False
    packing: str = "game"
    image_order: str = "shuffled"   # or "logged": every example in the order the listener saw
    vision_cache: Path | None = None  # where a frozen vision model's outputs are kept (vision_cache.py); None: off
    cell: str = "default"
    spec_hash: str = ""             # of the task's settings and inputs: checkpoints resume only under it


def accumulation_steps(effective_batch: int, micro_batch: int, world_size: int, where: str = "training",
                       answers: float = 1.0) -> int:
    """Micro-batches each process accumulates per optimizer step, so that a step covers ``effective_batch``
    trained actions (about, where a sequence holds ``answers`` of them on average: packed games); refuses a
    batch the world cannot divide."""
    if effective_batch % (micro_batch * world_size):
        raise TrainingError(f"{where}.effective_batch {effective_batch} is not a multiple of micro_batch "
                            f"{micro_batch} x {world_size} processes")
    return max(1, round(effective_batch / (micro_batch * world_size * answers)))


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "ckpt").glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def clear_task(out: Path) -> None:
    """Remove a task's checkpoints, epoch adapters, metrics and done marker."""
    for name in ("ckpt", "epochs"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (METRICS_FILE, MISMATCH_FILE, SOURCES_FILE, DONE_FILE):
        (out / name).unlink(missing_ok=True)


def _inventory(checkpoint: Path) -> dict[str, str]:
    """The digest of every file of a checkpoint folder but its trainer.json, by relative name."""
    return {str(p.relative_to(checkpoint)): bytes_digest(p) for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != "trainer.json"}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (an unreadable trainer.json, a file missing or changed since it was
    written), or None."""
    try:
        recorded = json.loads((checkpoint / "trainer.json").read_text())["files"]
        found = _inventory(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        return f"'{checkpoint / 'trainer.json'}' is unreadable or lists no files"
    for name, digest in recorded.items():
        if name not in found:
            return f"'{checkpoint / name}' is missing"
        if found[name] != digest:
            return f"'{checkpoint / name}' is damaged (its bytes changed since it was written)"
    return None


def _discard_unusable(spec: TrainSpec, progress: Callable[[str], None]) -> None:
    """Remove what another spec (other settings or inputs) or a damaged checkpoint left in the task folder:
    its checkpoints, epoch adapters and metrics must never be resumed or reported by this one."""
    checkpoint = latest_checkpoint(spec.out)
    if checkpoint is None:
        return
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        written_by = json.loads((checkpoint / "trainer.json").read_text()).get("spec_hash")
        if written_by == spec.spec_hash:
            return
        problem = (f"{checkpoint} was written by another spec ({written_by or 'unrecorded'}, now {spec.spec_hash}): "
                   "settings or inputs changed")
    progress(f"{problem}; training starts afresh")
    clear_task(spec.out)


def adapter_problem(folder: Path) -> str | None:
    """What is wrong with a saved adapter folder (missing or truncated files), or None; reads headers only."""
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        json.loads(config.read_text())
        with weights.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError as exc:
        return f"'{exc.filename}' is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"'{config}' or '{weights}' is unreadable"
    if weights.stat().st_size != 8 + size + end:
        return f"'{weights}' is truncated or damaged ({weights.stat().st_size} bytes, its header says {8 + size + end})"
    return None


def _rows(frame: pl.DataFrame) -> list[dict]:
    return frame.to_dicts()


class Trainer:
    """One task's model, optimizer and data in one process; :meth:`run` trains to the end or to a stop."""

    def __init__(self, spec: TrainSpec, examples: pl.DataFrame, validation: pl.DataFrame):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        self.spec, self.hp = spec, spec.hp
        self.examples, self.validation = _rows(examples), _rows(validation)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.sequences = sequences(examples, packing=spec.packing)
        self.sizes = [len(rows) for rows in self.sequences]
        self.accum = accumulation_steps(self.hp.effective_batch, self.hp.micro_batch, world,
                                        f"training.{spec.objective}", sum(self.sizes) / max(len(self.sizes), 1))
        self.per_step = world * self.accum  # micro-batches of a step, all processes
        cuda = torch.cuda.is_available()
        bf16 = spec.model.dtype == "bf16" and cuda
        plugin = None
        if spec.zero_stage is not None:
            plugin = DeepSpeedPlugin(hf_ds_config={
                "zero_optimization": {"stage": spec.zero_stage},
                "train_micro_batch_size_per_gpu": self.hp.micro_batch,
                "gradient_accumulation_steps": self.accum,
                "train_batch_size": self.hp.micro_batch * self.accum * world,
                "gradient_clipping": 1.0, "bf16": {"enabled": spec.model.dtype == "bf16"},
            })
        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.accum, deepspeed_plugin=plugin, step_scheduler_with_optimizer=False,
            mixed_precision="bf16" if bf16 and plugin is None else "no",
            kwargs_handlers=[] if cuda else [InitProcessGroupKwargs(backend="gloo")])
        self.deepspeed = plugin is not None
        with self.accelerator.main_process_first():
            if self.accelerator.is_main_process:
                _discard_unusable(spec, print)
        self.template = policy_template(spec.policy_template)
        processor = load_processor(spec.model)
        self.tokenizer = processor.tokenizer if processor is not None else load_tokenizer(spec.model)
        self.encoder = PolicyEncoder(processor, self.tokenizer, spec.images, processor is not None)
        encoded = [self._sequence(rows, None) for rows in self.sequences]  # packing: each prefix checked here
        if encoded:  # image tokens against pixel crops, before any model is loaded
            self.encoder.check(encoded[0])
        self.lengths = [len(e.input_ids) for e in encoded]
        self.tasks = ["d0" if self.examples[rows[0]]["source"] in REHEARSAL else "log" for rows in self.sequences]
        self.model = load_policy(spec.model, r=self.hp.lora_r, alpha=self.hp.lora_alpha,
                                 dropout=self.hp.lora_dropout, placement=self.hp.lora_placement,
                                 adapter=spec.adapter, seed=spec.seed,
                                 gradient_checkpointing=spec.gradient_checkpointing)
        self.vision_cache = cache_vision(self.model, spec.vision_cache) if spec.vision_cache else None
        self.model.to(self.accelerator.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(trainable, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay)
        else:
            optimizer = torch.optim.RMSprop(trainable, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay)
        self.steps_per_epoch = len(self._epoch_batches(0)) // self.per_step
        total = self.steps_per_epoch * self.hp.epochs
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        scheduler = (get_cosine_schedule_with_warmup(optimizer, self.hp.warmup_steps, total)
                     if self.hp.schedule == "cosine" else get_constant_schedule_with_warmup(optimizer,
                                                                                           self.hp.warmup_steps))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        if not self.deepspeed:  # checkpoints hold the adapter only, never the frozen base weights
            self.accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
            self.accelerator.register_load_state_pre_hook(self._load_adapter_hook)
        self.rows: list[dict] = []
        self.legal: list[int] | None = None  # the action tokens, found at the first validation
        self.mismatch_reference = self._mismatch_reference() if spec.objective == "kto" else {}

    # -- data ---------------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This epoch's micro-batches of sequences: D_0 and the logged turns as separate tasks, a whole number
        of steps."""
        return epoch_batches(self.lengths, self.hp.micro_batch, self.per_step, self.spec.seed, epoch, tasks=self.tasks)

    def _sequence(self, rows: list[int], epoch: int | None) -> Encoded:
        """Examples ``rows`` (one, or turns of one game) as one sequence, images in the epoch's order (one per
        game and epoch when packing; None, or ``image_order: logged``: the logged order)."""
        examples = [self.examples[i] for i in rows]
        first = examples[0]
        packed = self.spec.packing == "game" and first["source"] not in UNPACKED_SOURCES
        order = None
        if epoch is not None and self.spec.image_order == "shuffled":
            order = image_order(first["context"], self.spec.seed, epoch,
                                first["game_id"] if packed else first["game_turn_id"])
        return self.encoder.encode_game([policy_view(row, self.template, order) for row in examples])

    def _answers(self, micro_batches: list[list[int]]) -> int:
        return sum(self.sizes[s] for batch in micro_batches for s in batch)

    def _batch(self, indices: list[int], epoch: int | None) -> dict[str, torch.Tensor]:
        """Sequences ``indices`` as model inputs (images in ``epoch``'s order; None: the logged order), with each
        answer's reward, p, weight and kind."""
        rows = [self.examples[i] for s in indices for i in self.sequences[s]]
        batch = self.encoder.collate([self._sequence(self.sequences[s], epoch) for s in indices])
        batch["reward"] = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        batch["propensity"] = torch.tensor([r["prob_action"] if r["prob_action"] is not None else 1.0
                                            for r in rows], dtype=torch.float32)  # datasets.py: only D_0 lacks p
        batch["rehearsal"] = torch.tensor([r["source"] in REHEARSAL for r in rows])
        batch["desirable"] = torch.tensor([r["label"] == 1 for r in rows])
        batch["weight"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _mismatch_logprobs(self, rows: list[dict]) -> list[float]:
        """log pi(a'|x) of each row's mismatched click under the model as it is (no gradient, no dropout), in
        the logged image order, as the reference was scored: z then measures the policy, not the shuffling."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        values = []
        with torch.no_grad():
            for start in range(0, len(rows), self.hp.micro_batch):
                chunk = [{**row, "action": mismatched_click(row["action"], letters_of(row["currently_selected"],
                                                                                      row["context"]))}
                         for row in rows[start:start + self.hp.micro_batch]]
                encoded = [self.encoder.encode(policy_view(row, self.template)) for row in chunk]
                batch = {k: v.to(self.accelerator.device) for k, v in self.encoder.collate(encoded).items()}
                values += score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"],
                                        self.hp.temperature).logprob.tolist()
        model.train(was_training)
        return values

    def _mismatch_reference(self) -> dict[str, float]:
        """KTO's reference for the mismatched clicks: the starting policy (the adapter the variant continues from,
        which deployed the newest round) scores each logged example's click once, in the logged image order."""
        path = self.spec.out / MISMATCH_FILE
        with self.accelerator.main_process_first():
            if not path.is_file():
                logged = [row for row in self.examples if row["source"] not in REHEARSAL]
                atomic_write_parquet(pl.DataFrame({"game_turn_id": [r["game_turn_id"] for r in logged],
                                                   "logprob": self._mismatch_logprobs(logged)},
                                                  schema={"game_turn_id": pl.String, "logprob": pl.Float64}), path)
        table = pl.read_parquet(path)
        return dict(zip(table["game_turn_id"], table["logprob"]))

    def _reference_point(self, micro_batches: list[list[int]]) -> torch.Tensor:
        """KTO's z for one optimizer step, before its update, over every process's logged examples of the step."""
        rows = [self.examples[i] for batch in micro_batches for s in batch for i in self.sequences[s]
                if self.examples[i]["source"] not in REHEARSAL]
        now = self._mismatch_logprobs(rows)
        difference = sum(n - self.mismatch_reference[r["game_turn_id"]] for n, r in zip(now, rows))
        total, count = self._reduce([difference, float(len(rows))], "sum")
        return torch.tensor(max(0.0, total / count) if count else 0.0)

    def _action_losses(self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, ActionScores]:
        """Each answer's loss: D_0 rows by label-smoothed cross-entropy, logged rows by the variant's objective
        (objectives.py); ``z``: KTO's reference point for this step."""
        hp = self.hp
        scores = score_actions(answer_logits(self.model, batch), batch["targets"], batch["target_mask"],
                               hp.temperature)
        rehearsal = batch["rehearsal"].to(scores.logprob.device)
        if self.spec.objective == "rl":
            per_action = reinforce_loss(scores, batch["reward"], batch["propensity"], entropy_weight=hp.entropy_weight)
        elif self.spec.objective == "kto":
            per_action = kto_loss(scores, batch["propensity"], batch["desirable"], batch["weight"], z=z, beta=hp.beta,
                                  entropy_weight=hp.entropy_weight)
        else:  # fft (the seed round's rows are all D_0)
            per_action = cross_entropy_loss(scores, label_smoothing=hp.entropy_weight)
        return torch.where(rehearsal, cross_entropy_loss(scores, label_smoothing=hp.label_smoothing),
                           per_action), scores

    def _loss(self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None, scale: float = 1.0) -> LossParts:
        """The micro-batch's answers' summed loss times ``scale`` (the step's micro-batches over its answers:
        the step's gradient is then its mean over answers)."""
        per_action, scores = self._action_losses(batch, z)
        logged = per_action.detach()[~batch["rehearsal"].to(per_action.device)]
        return LossParts(per_action.sum() * scale, logged.mean() if logged.numel() else torch.zeros(()),
                         scores.uniform.detach().mean())

    # -- the guard against silent non-training -------------------------------------------------------
    def _lora_b(self) -> dict[str, torch.Tensor] | None:
        """A copy of every LoRA B matrix (they start at zero and must move), or None where ZeRO-3 shards them."""
        if self.spec.zero_stage == 3:
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

    # -- checkpoints --------------------------------------------------------------------------------
    def _load_adapter_hook(self, models, folder: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(Path(folder).parent / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(self.accelerator.unwrap_model(models[0]), weights)
        models.clear()

    def _save(self, step: int, epoch: int, epoch_done: bool) -> None:
        """Checkpoint after ``step`` optimizer steps, in (0-based) ``epoch``, atomically."""
        accelerator, root = self.accelerator, self.spec.out / "ckpt"
        tmp = root / f".step-{step:06d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"), **({"exclude_frozen_parameters": True} if self.deepspeed else {}))
        accelerator.wait_for_everyone()  # every process's shard is written before the inventory is taken
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(tmp / "adapter")
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, "epoch_done": epoch_done,
                                                          "spec_hash": self.spec.spec_hash,
                                                          "files": _inventory(tmp)}))
            self._write_metrics()
            final = root / f"step-{step:06d}"
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if epoch_done:
                atomic_copy_tree(final / "adapter", self.spec.out / "epochs" / f"epoch-{epoch + 1:03d}")
            for older in root.glob("step-*"):
                if older != final:
                    shutil.rmtree(older)
        accelerator.wait_for_everyone()

    def _write_metrics(self) -> None:
        atomic_write_parquet(pl.DataFrame(self.rows, schema=METRICS, orient="row"), self.spec.out / METRICS_FILE)

    def _resume(self) -> tuple[int, int]:
        """Load the newest checkpoint; returns (optimizer steps done, epoch to continue)."""
        checkpoint = latest_checkpoint(self.spec.out)
        if checkpoint is None:
            return 0, 0
        state = json.loads((checkpoint / "trainer.json").read_text())
        self.accelerator.load_state(str(checkpoint / "state"),
                                    **({"load_module_strict": False} if self.deepspeed else {}))
        metrics = self.spec.out / METRICS_FILE
        if metrics.is_file():
            self.rows = [tuple(r) for r in pl.read_parquet(metrics).filter(pl.col("step") <= state["step"]).rows()]
        return state["step"], state["epoch"] + (1 if state["epoch_done"] else 0)

    # -- the loop -----------------------------------------------------------------------------------
    def _reduce(self, values: list[float], how: str) -> list[float]:
        return self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), how).tolist()

    def run(self, should_stop: Callable[[], bool] = lambda: False, progress: Callable[[str], None] = print) -> str:
        """Train to the last epoch ("finished") or to a stop request ("stopped", after a checkpoint)."""
        accelerator, hp = self.accelerator, self.hp
        world, rank = accelerator.num_processes, accelerator.process_index
        engine = f"DeepSpeed ZeRO-{self.spec.zero_stage}" if self.deepspeed else "Accelerate"
        progress(f"{engine}, {world} process(es) on {accelerator.device}, {self.accum} micro-batch(es) of "
                 f"{hp.micro_batch} sequences accumulated per step, {self.steps_per_epoch} steps per epoch; "
                 f"{len(self.examples)} trained actions in {len(self.sequences)} sequences ({self.spec.packing} "
                 f"packing), about {len(self.examples) / self.steps_per_epoch:.1f} a step"
                 + (f"; vision features cached in {self.spec.vision_cache}" if self.vision_cache else ""))
        step, first_epoch = self._resume()
        if step:
            progress(f"resumed at step {step} (epoch {first_epoch})")
        self.model.train()
        started = time.perf_counter()
        unmoved = self._lora_b() if step == 0 else None  # checked after the first step that has a learning rate
        answered = 0
        for epoch in range(first_epoch, hp.epochs):
            batches = self._epoch_batches(epoch)
            for epoch_step in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                sums = [0.0, 0.0, 0.0]
                step_lr = self.scheduler.get_last_lr()[0]  # what this step's update uses (0 in early warm-up)
                answers = self._answers(batches[epoch_step * self.per_step:(epoch_step + 1) * self.per_step])
                first = epoch_step * self.per_step + rank * self.accum
                mine = batches[first:first + self.accum]  # this process's micro-batches of the step
                z = self._reference_point(mine) if self.spec.objective == "kto" else None
                for a in range(self.accum):
                    batch = self._batch(mine[a], epoch)
                    with accelerator.accumulate(self.model):
                        parts = self._loss(batch, z, scale=self.per_step / answers)
                        bad, = self._reduce([float(not torch.isfinite(parts.total).item())], "max")
                        if bad:
                            raise TrainingError(
                                f"step {step + 1} (epoch {epoch}): the loss is not finite; stopped; the last good "
                                f"checkpoint is {latest_checkpoint(self.spec.out) or 'none (no step finished)'}")
                        accelerator.backward(parts.total)
                        self.optimizer.step()
                        if accelerator.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    sums = [s + float(v) / self.accum for s, v in
                            zip(sums, (parts.total.detach(), parts.objective, parts.entropy))]
                if unmoved is not None and step_lr > 0:
                    self._check_moved(unmoved, step + 1)
                    unmoved = None
                step += 1
                answered += answers
                loss, objective, entropy = self._reduce(sums, "mean")
                lr = self.scheduler.get_last_lr()[0]
                self.rows.append((self.spec.cell, step, epoch + 1, loss, objective, entropy, lr, None, None))
                if step % 10 == 0 or epoch_step == self.steps_per_epoch - 1:
                    rate = answered / (time.perf_counter() - started)
                    progress(f"epoch {epoch + 1}/{hp.epochs} step {step}/{self.steps_per_epoch * hp.epochs} "
                             f"loss {loss:.4f} lr {lr:.2e} ({rate:.1f} trained actions/s)")
                last_of_epoch = epoch_step == self.steps_per_epoch - 1
                stop, = self._reduce([float(should_stop())], "max")
                if stop and not last_of_epoch:
                    self._save(step, epoch, epoch_done=False)
                    progress(f"stopped at step {step}; checkpoint saved")
                    return "stopped"
                if self.spec.checkpoint_every and step % self.spec.checkpoint_every == 0 and not last_of_epoch:
                    self._save(step, epoch, epoch_done=False)
            exact, val_loss = self.validate(epoch)
            self.rows.append((self.spec.cell, step, epoch + 1, None, None, None, None, exact, val_loss))
            progress(f"epoch {epoch + 1}: validation exact match {exact:.3f}, loss {val_loss:.4f}")
            self._save(step, epoch, epoch_done=True)
            stop, = self._reduce([float(should_stop())], "max")
            if stop and epoch + 1 < hp.epochs:
                progress(f"stopped after epoch {epoch + 1}; checkpoint saved")
                return "stopped"
        return "finished"

    @torch.no_grad()
    def validate(self, epoch: int) -> tuple[float, float]:
        """Exact match of generated actions (the official raw accuracy: the action string, letter order
        included) and mean action loss on the validation turns (sharded over processes). Sampling draws from
        a generator seeded by (seed, epoch), apart from the training's random state."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.model)
        model.eval()
        mine = list(range(accelerator.process_index, len(self.validation), accelerator.num_processes))
        exact = loss = 0.0
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            torch.manual_seed(self.spec.seed * 1_000 + epoch)
            for start in range(0, len(mine), self.hp.micro_batch):
                rows = [self.validation[i] for i in mine[start:start + self.hp.micro_batch]]
                views = [policy_view(row, self.template) for row in rows]
                encoded = [self.encoder.encode(view) for view in views]
                batch = {k: v.to(accelerator.device) for k, v in self.encoder.collate(encoded).items()}
                scores = score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"])
                loss -= (scores.logprob / scores.length).sum().item()
                states = [GameState(len(r["context"]), frozenset(letters_of(r["currently_selected"], r["context"])))
                          for r in rows]
                for view, answer in zip(views, self._generate(model, views, states)):
                    exact += answer.strip() == view.action
        model.train()
        exact, loss = self._reduce([exact, loss], "sum")
        n = max(len(self.validation), 1)
        return exact / n, loss / n

    def _generate(self, model, views: list[PolicyView], states: list[GameState]) -> list[str]:
        """Each view's action as the policy generates it (generation.py), its settings from ``validation``."""
        settings = self.spec.validation
        if self.legal is None:
            self.legal = legal_token_ids(self.encoder, views[0])
        return [g.text for g in generate_actions(model, self.encoder, views, states, legal=self.legal,
                                                 decoding=settings.decoding, constrained=settings.constrained,
                                                 max_new_tokens=settings.max_new_tokens)]


def train(spec: TrainSpec, examples: pl.DataFrame, validation: pl.DataFrame,
          should_stop: Callable[[], bool] = lambda: False, progress: Callable[[str], None] = print) -> str:
    """Run (or resume) one training task in this process; returns "finished" or "stopped"."""
    spec.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(spec, examples, validation)
    try:
        return trainer.run(should_stop, progress)
    finally:
        _release(trainer)


def _release(trainer: Trainer) -> None:
    """Free the process group and Accelerate's shared state, so a process can run another task."""
    from accelerate.state import AcceleratorState

    trainer.accelerator.free_memory()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
