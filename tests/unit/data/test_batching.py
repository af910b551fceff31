"""Sequences and micro-batches: game packing groups a game's trained turns in turn order, micro-batches keep
to one task, every epoch has the same number of steps."""

from collections import Counter

import polars as pl
import pytest

from respect_hpc.data.batching import epoch_batches, sequences


@pytest.mark.parametrize("group", [None, 50])
def test_epoch_batches_fill_whole_steps_and_cover_every_example(group):
    lengths = [(i * 37) % 101 for i in range(45)]
    batches = epoch_batches(lengths, micro_batch=4, step_batches=4, seed=1, epoch=0, group=group)
    assert all(len(b) <= 4 for b in batches) and len(batches) == 12  # 3 steps of 4 micro-batches
    counts = Counter(i for b in batches for i in b)
    assert set(counts) == set(range(45)) and sum(counts.values()) == 45
    assert batches == epoch_batches(lengths, micro_batch=4, step_batches=4, seed=1, epoch=0, group=group)
    assert batches != epoch_batches(lengths, micro_batch=4, step_batches=4, seed=1, epoch=1, group=group)


def test_the_last_step_is_filled_with_micro_batches_of_the_epoch():
    batches = epoch_batches([10] * 9, micro_batch=2, step_batches=4, seed=1, epoch=0)
    assert len(batches) == 8 and set(i for b in batches for i in b) == set(range(9))


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 101 + 20 for i in range(400)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, 8, seed=0, epoch=0, group=50)
    plain = epoch_batches(lengths, 8, 8, seed=0, epoch=0, group=None)
    assert padding(grouped) * 5 < padding(plain)


def test_micro_batches_never_mix_tasks_and_every_task_runs_each_epoch():
    """D_0 is its own task (OFFICIAL-RECIPE.md (d)): no micro-batch holds D_0 and logged rows together."""
    tasks = ["log"] * 30 + ["d0"] * 9
    lengths = [(i * 37) % 101 for i in range(39)]
    batches = epoch_batches(lengths, micro_batch=4, step_batches=2, seed=1, epoch=0, tasks=tasks)
    assert all(len({tasks[i] for i in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches) and len(batches) % 2 == 0
    assert {i for b in batches for i in b} == set(range(39))
    assert len(batches) == len(epoch_batches(lengths, 4, 2, seed=1, epoch=5, tasks=tasks))  # one schedule a run


def _examples(rows):
    return pl.DataFrame(rows, schema={"game_id": pl.String, "turn_id": pl.Int64, "source": pl.String},
                        orient="row")


def test_game_packing_groups_a_games_trained_turns_in_turn_order():
    examples = _examples([("g1", 3, "log"), ("g2", 0, "log"), ("g1", 1, "log"), ("g1", 0, "augmented"),
                          ("g1", 2, "log"), ("g3", 0, "d0"), ("g3", 4, "d0"), ("g1", 5, "log")])
    assert sequences(examples, packing="turn") == [[i] for i in range(8)]
    # g1's logged turns 1, 2, 3, 5 in turn order; its augmented turn alone; D_0's game g3 packed too
    assert sequences(examples, packing="game") == [[1], [2, 4, 0, 7], [3], [5, 6]]
