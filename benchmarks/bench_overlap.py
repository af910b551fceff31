"""Training input off the critical path: the share of an optimizer step spent waiting for micro-batches to be
built (tokens and pixels), with ``training.prefetch`` off (built in the loop) and on (each built in a worker
thread while the one before it runs), same trainer, same steps, alternating.

Model and data as bench_train.py (the IDEFICS2-8B replica, text hidden 256 x 4 layers, synthetic games on the
KiloGram tangrams at 224 px), one sequence per turn (``packing: turn``, no vision cache: pixels are built for
every micro-batch), micro-batches of 2 sequences, 4 accumulated per step, each pair of steps (off, on) over
the same micro-batches.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from bench_train import examples_of, synthetic_round

from jobs.train import set_distributed_env
from respect_hpc.config.schema import Hyperparameters, ModelSection, TrainingSection
from respect_hpc.core.rundir import TaskDir
from respect_hpc.model.replica import replica_like
from respect_hpc.training.spec import TrainSpec
from respect_hpc.training.trainer import Trainer

GAMES = 12
MICRO_BATCH, ACCUMULATED = 2, 4
ROUNDS = 6  # each round: one step with prefetch off, one with it on, over the same micro-batches
TEXT, VISION = (256, 4), (64, 3)


def main() -> str:
    set_distributed_env()
    root = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    _, images, turns, feedback = synthetic_round(root, GAMES)
    examples = examples_of(turns, feedback, "fft")
    model = replica_like("idefics2-8b", root / "model", hidden_size=TEXT[0], layers=TEXT[1], vision=VISION)
    hp = Hyperparameters(micro_batch=MICRO_BATCH, effective_batch=MICRO_BATCH * ACCUMULATED, warmup_steps=0)
    spec = TrainSpec(objective="fft", hp=hp, seed=1, model=ModelSection(path=model, dtype="fp32"),
                     policy_template="respect-listener@1", images=images, out=TaskDir(root / "task"),
                     training=TrainingSection(zero_stage=None, packing="turn", vision_cache=False))
    seconds, waited = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}
    with Trainer(spec, examples, examples.head(1)) as trainer:
        batches = trainer.data.epoch(0, trainer.per_step)
        for step in range(2 * ROUNDS + 1):
            prefetch = step % 2 == 1
            trainer.spec = dataclasses.replace(spec, training=spec.training.model_copy(update={"prefetch": prefetch}))
            pair = (step + 1) // 2 % 4  # each pair of steps (off, on) runs the same micro-batches
            chosen = batches[pair * trainer.per_step:(pair + 1) * trainer.per_step]
            before, started = trainer.waited, time.perf_counter()
            trainer.step(chosen, 0, step)
            if step:  # the first step warms up
                seconds[prefetch] += time.perf_counter() - started
                waited[prefetch] += trainer.waited - before
    off, on = (100 * waited[p] / seconds[p] for p in (False, True))
    return f"""## Training input off the critical path: micro-batches built ahead (issue: fast on a GPU node)

{examples.height} trained actions of {GAMES} synthetic games; IDEFICS2-8B replica, text hidden {TEXT[0]} x {TEXT[1]}
layers; one sequence per turn, 10 images at 224 px a prompt, no vision cache; {ACCUMULATED} micro-batches of
{MICRO_BATCH} sequences a step; {ROUNDS} steps each way, alternating; {torch.get_num_threads()} torch threads.

| `training.prefetch` | step (s, mean) | waiting for micro-batches (share of the step) |
|---|---|---|
| off (built in the loop) | {seconds[False] / ROUNDS:.2f} | {off:.1f}% |
| on (built in a worker thread) | {seconds[True] / ROUNDS:.2f} | {on:.1f}% |

Built ahead, the wait falls from {off:.1f}% to {on:.1f}% of the step, but here the worker competes with the model
for the same {torch.get_num_threads()} cores and the step takes {seconds[True] / seconds[False]:.2f}x as long: the default
(`prefetch` unset) builds ahead on a GPU only. The first micro-batch of each step is still built in the loop
(KTO's reference point is measured before it). Equal losses and adapters either way:
tests/integration/training/test_trainer.py. On a GPU node the model runs on the GPU and the worker has the CPU
to itself: not measured here (no GPU lent to this issue); `benchmarks/run.py overlap` there measures it."""
