"""Which examples share a sequence, and which sequences share a micro-batch, epoch by epoch (pure code).

Game packing (``training.packing: game``): the turns a variant trains on in one game are one sequence, in
turn order, cut into consecutive chunks when a game has more trained turns than a micro-batch holds; what is
not a prefix of its game (the synthetic D_0 deselection turns) stays its own sequence. With ``turn`` every
example is its own sequence. A micro-batch holds sequences of one task (D_0 apart from the logged turns) with
at most ``micro_batch`` answers; an optimizer step takes a fixed number of micro-batches, so it covers about
``effective_batch`` answers, and the loss is normalised by the answers the step really holds.
"""

from __future__ import annotations

import heapq
import random

import polars as pl

PACKINGS = ("game", "turn")
UNPACKED_SOURCES = ("augmented",)  # synthetic turns: not a prefix of any turn of their game


def sequences(examples: pl.DataFrame, *, packing: str, capacity: int) -> list[list[int]]:
    """Example row indices per sequence, each in turn order; sequences ordered by their first row."""
    indexed = examples.with_row_index("_row")
    if packing == "turn":
        return [[i] for i in range(examples.height)]
    alone = indexed.filter(pl.col("source").is_in(UNPACKED_SOURCES))["_row"].to_list()
    games = (indexed.filter(~pl.col("source").is_in(UNPACKED_SOURCES)).sort("turn_id")
             .group_by("source", "game_id", maintain_order=True).agg("_row")["_row"].to_list())
    out = [[i] for i in alone]
    for rows in games:
        chunks = -(-len(rows) // capacity)
        bounds = [round(k * len(rows) / chunks) for k in range(chunks + 1)]
        out += [rows[a:b] for a, b in zip(bounds, bounds[1:])]
    return sorted(out)


def _first_fit(order: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """Each item into the earliest opened micro-batch with room for it (a new one when none has)."""
    bins: list[list[int]] = []
    with_room: dict[int, list[int]] = {room: [] for room in range(1, capacity + 1)}  # room -> heap of bins
    for item in order:
        size = sizes[item]
        fits = [(heap[0], room) for room, heap in with_room.items() if room >= size and heap]
        if fits:
            index, room = min(fits)
            heapq.heappop(with_room[room])
        else:
            index, room = len(bins), capacity
            bins.append([])
        bins[index].append(item)
        if room - size > 0:
            heapq.heappush(with_room[room - size], index)
    return bins


def epoch_batches(lengths: list[int], micro_batch: int, per_step: int, seed: int, epoch: int,
                  group: int | None = 50, tasks: list[str] | None = None,
                  sizes: list[int] | None = None) -> list[list[int]]:
    """One epoch's micro-batches of sequences (``lengths`` tokens, ``sizes`` answers each, default 1), a
    whole number of optimizer steps' worth (``per_step // micro_batch`` micro-batches), in a seeded order.

    With ``tasks`` (one name per sequence), a micro-batch holds sequences of one task only, as the official
    code batches D_0 apart from the logged turns; every task's sequences run once an epoch, randomly
    interleaved. Each task's sequences are shuffled; with ``group``, cut into spans of ``group``
    micro-batches and sorted by length inside each span (little padding, while every epoch still differs);
    then, largest first (a stable sort), each goes into the first micro-batch with room for its answers.
    The number of micro-batches depends on the sizes only, so every epoch has the same number of steps.
    The shuffled micro-batches are wrapped around to fill the last step.
    """
    rng = random.Random(f"{seed}/{epoch}/batches")
    tasks = tasks or [""] * len(lengths)
    sizes = sizes or [1] * len(lengths)
    batches = []
    for task in sorted(set(tasks)):
        order = [i for i, t in enumerate(tasks) if t == task]
        rng.shuffle(order)
        if group is not None:
            span_size = micro_batch * group
            order = [i for start in range(0, len(order), span_size)
                     for i in sorted(order[start:start + span_size], key=lambda i: -lengths[i])]
        order.sort(key=lambda i: -sizes[i])
        batches += _first_fit(order, sizes, micro_batch)
    rng.shuffle(batches)
    per_step_batches = per_step // micro_batch
    steps = -(-len(batches) // per_step_batches)
    return (batches * -(-steps * per_step_batches // len(batches)))[:steps * per_step_batches]
