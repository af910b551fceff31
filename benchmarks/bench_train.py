"""Training throughput: length-grouped, dynamically padded batches against fixed batches padded to the
longest example of the set; same model, same data, same loop, one run.

Model: a small random-weight Idefics2 built offline (text model: hidden 512, 4 layers; the tiny
vision tower of the tests), LoRA with the paper's placement, FFT objective, fp32 on this CPU.
Data: the FFT training set of synthetic MultiRef games with the real KiloGram tangrams (10 images per
example) when ../shared/data/kilogram is present. The two ways alternate micro-batch by micro-batch
(forward, backward, optimizer step) so that load from elsewhere slows both alike.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from jobs.train import _distributed_env
from respect_hpc.datasets import training_set
from respect_hpc.ingest import ingest
from respect_hpc.manifest import Hyperparameters, ModelSection
from respect_hpc.models import build_tiny_idefics2
from respect_hpc.policy_data import epoch_batches
from respect_hpc.synthetic import DEFAULT_KILOGRAM, draw_procedural_images, load_image_bank, synthesize
from respect_hpc.train import Trainer, TrainSpec, _release

GAMES = int(os.environ.get("BENCH_TRAIN_GAMES", 40))
MICRO_BATCH = 8


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    bank = load_image_bank(DEFAULT_KILOGRAM)
    images = DEFAULT_KILOGRAM / "tangram_pngs"
    if bank.source == "procedural":
        images = root / "images"
        draw_procedural_images(bank, images)
    logs = root / "logs.parquet"
    synthesize(GAMES, seed=11, policies={"sft": 0.35}, rounds=[0], bank=bank).write_parquet(logs)
    turns = ingest([logs]).turns
    feedback = turns.select("game_turn_id", kind=pl.lit("binary"), label=pl.lit(1, pl.Int8))
    examples = training_set(turns, feedback, None, variant="b-fft", kind="binary", objective="fft", seed=1)
    model = build_tiny_idefics2(root / "model", corpus=[d for ds in bank.descriptions.values() for d in ds],
                                hidden_size=512, layers=4)
    hp = Hyperparameters(micro_batch=MICRO_BATCH, effective_batch=MICRO_BATCH, warmup_steps=0)
    spec = TrainSpec(objective="fft", hp=hp, seed=1, model=ModelSection(path=model, dtype="fp32"),
                     policy_template="multiref-listener@1", images=images, out=root / "task", zero_stage=None)
    _distributed_env()
    trainer = Trainer(spec, examples, examples.head(1))
    lengths = trainer.lengths
    longest = max(lengths)
    grouped = epoch_batches(lengths, MICRO_BATCH, MICRO_BATCH, seed=1, epoch=0, group=50)
    fixed = epoch_batches(lengths, MICRO_BATCH, MICRO_BATCH, seed=1, epoch=0, group=None)
    seconds = {"grouped": 0.0, "fixed": 0.0}
    padded = {"grouped": 0, "fixed": 0}
    for i, (a, b) in enumerate(zip(grouped, fixed)):
        for way, indices, pad_to in (("grouped", a, None), ("fixed", b, longest)):
            batch = trainer._batch(indices, 0, pad_to=pad_to)
            padded[way] += batch["input_ids"].numel()
            began = time.perf_counter()
            parts = trainer._loss(batch)
            trainer.accelerator.backward(parts.total)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            seconds[way] += time.perf_counter() - began
        if i % 10 == 0:
            print(f"{i + 1}/{len(grouped)} micro-batches: grouped {seconds['grouped']:.0f} s, "
                  f"fixed {seconds['fixed']:.0f} s", flush=True)
    _release(trainer)
    n = len(grouped) * MICRO_BATCH
    real = sum(lengths[i] for batch in grouped for i in batch)
    rows = "\n".join(
        f"| {label} | {n / seconds[way]:.2f} | {real / seconds[way]:,.0f} | {100 * (1 - real / padded[way]):.0f}% |"
        for way, label in (("fixed", "fixed batches, padded to the longest example of the set"),
                           ("grouped", "length-grouped, dynamically padded (respect_hpc)")))
    return f"""## Training throughput, small Idefics2 + LoRA, fp32, CPU (issue: training stage)

{examples.height} FFT examples from {GAMES} synthetic games ({bank.source} images, 10 per example); {min(lengths)}
to {longest} tokens per example (mean {sum(lengths) / len(lengths):.0f}), micro-batches of {MICRO_BATCH};
one epoch each way, alternating micro-batch by micro-batch; {torch.get_num_threads()} torch threads.
Timed: forward, backward and optimizer step (encoding and image loading excluded, the same for both).

| batches | examples/s | non-padding tokens/s | padding |
|---|---|---|---|
{rows}
| **speed-up** | **{seconds['fixed'] / seconds['grouped']:.2f}x** | | |

Target: at least 1.5x."""
