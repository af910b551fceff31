"""Which examples share a sequence, and which sequences share a micro-batch, epoch by epoch (pure code).

Game packing (``training.packing: game``): the turns a variant trains on in one game are one sequence, in
turn order (the last one's prompt holds every earlier one; the sequence is no longer than that turn's own);
what is not a prefix of its game (the synthetic D_0 deselection turns) stays its own sequence. With ``turn``
every example is its own sequence. A micro-batch holds ``micro_batch`` sequences of one task (D_0 apart from
the logged turns); the trainer accumulates as many micro-batches a step as make about ``effective_batch``
trained actions and normalises the loss by the actions the step really holds.
"""

from __future__ import annotations

import random

import polars as pl

UNPACKED_SOURCES = ("augmented",)  # synthetic turns: not a prefix of any turn of their game
REHEARSAL = ("d0", "augmented")  # sources trained with label-smoothed cross-entropy in every variant, as a task


def sequences(examples: pl.DataFrame, *, packing: str) -> list[list[int]]:
    """Example row indices per sequence, each in turn order; sequences ordered by their first row."""
    indexed = examples.with_row_index("_row")
    if packing == "turn":
        return [[i] for i in range(examples.height)]
    alone = indexed.filter(pl.col("source").is_in(UNPACKED_SOURCES))["_row"].to_list()
    games = (indexed.filter(~pl.col("source").is_in(UNPACKED_SOURCES)).sort("turn_id")
             .group_by("source", "game_id", maintain_order=True).agg("_row")["_row"].to_list())
    return sorted([[i] for i in alone] + games)


def task_of(source: str) -> str:
    """The task an example's micro-batches belong to: D_0 (rehearsal) apart from the logged turns."""
    return "d0" if source in REHEARSAL else "log"


def epoch_batches(lengths: list[int], micro_batch: int, step_batches: int, seed: int, epoch: int,
                  group: int | None = 50, tasks: list[str] | None = None) -> list[list[int]]:
    """One epoch's micro-batches of sequences (``lengths`` tokens each), a whole number of optimizer steps'
    worth (``step_batches`` micro-batches a step), in a seeded order.

    With ``tasks`` (one name per sequence), a micro-batch holds sequences of one task only, as the official
    code batches D_0 apart from the logged turns; every task's sequences run once an epoch, randomly
    interleaved. Each task's sequences are shuffled; with ``group``, they are cut into spans of ``group``
    micro-batches and sorted by length inside each span (a micro-batch's rows have similar lengths: little
    padding, while every epoch still differs). The shuffled micro-batches are wrapped around to fill the
    last step.
    """
    rng = random.Random(f"{seed}/{epoch}/batches")
    tasks = tasks or [""] * len(lengths)
    batches = []
    for task in sorted(set(tasks)):
        order = [i for i, t in enumerate(tasks) if t == task]
        rng.shuffle(order)
        span_size = len(order) if group is None else micro_batch * group
        for start in range(0, len(order), span_size):
            span = order[start:start + span_size]
            if group is not None:
                span.sort(key=lambda i: -lengths[i])
            batches += [span[i:i + micro_batch] for i in range(0, len(span), micro_batch)]
    rng.shuffle(batches)
    steps = -(-len(batches) // step_batches)
    return (batches * -(-steps * step_batches // len(batches)))[:steps * step_batches]
