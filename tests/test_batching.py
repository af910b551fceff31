"""Sequences and micro-batches: game packing groups a game's trained turns, micro-batches respect their
answer budget and tasks, every epoch has the same number of steps."""

from collections import Counter

import polars as pl
import pytest

from respect_hpc.batching import epoch_batches, sequences


@pytest.mark.parametrize("group", [None, 50])
def test_epoch_batches_fill_whole_steps_and_cover_every_example(group):
    lengths = [(i * 37) % 101 for i in range(45)]
    batches = epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=0, group=group)
    assert all(len(b) <= 4 for b in batches) and len(batches) == 12  # 3 steps of 4 micro-batches
    counts = Counter(i for b in batches for i in b)
    assert set(counts) == set(range(45)) and sum(counts.values()) == 45
    assert batches == epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=0, group=group)
    assert batches != epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=1, group=group)


def test_the_last_step_is_filled_with_micro_batches_of_the_epoch():
    batches = epoch_batches([10] * 9, micro_batch=2, per_step=8, seed=1, epoch=0)
    assert len(batches) == 8 and set(i for b in batches for i in b) == set(range(9))


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 101 + 20 for i in range(400)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, 64, seed=0, epoch=0, group=50)
    plain = epoch_batches(lengths, 8, 64, seed=0, epoch=0, group=None)
    assert padding(grouped) * 5 < padding(plain)


def test_micro_batches_never_mix_tasks_and_every_task_runs_each_epoch():
    """D_0 is its own task (OFFICIAL-RECIPE.md (d)): no micro-batch holds D_0 and logged rows together."""
    tasks = ["log"] * 30 + ["d0"] * 9
    lengths = [(i * 37) % 101 for i in range(39)]
    batches = epoch_batches(lengths, micro_batch=4, per_step=8, seed=1, epoch=0, tasks=tasks)
    assert all(len({tasks[i] for i in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches) and len(batches) % 2 == 0
    assert {i for b in batches for i in b} == set(range(39))
    assert len(batches) == len(epoch_batches(lengths, 4, 8, seed=1, epoch=5, tasks=tasks))  # one schedule a run


def test_packed_micro_batches_hold_at_most_their_answers_and_every_epoch_the_same_number():
    sizes = [(i * 7) % 4 + 1 for i in range(200)]  # answers per sequence, 1 to 4
    lengths = [300 + 50 * s + (i * 13) % 40 for i, s in enumerate(sizes)]
    tasks = ["log" if i % 5 else "d0" for i in range(200)]
    counts = set()
    for epoch in range(6):
        batches = epoch_batches(lengths, 4, 32, seed=3, epoch=epoch, tasks=tasks, sizes=sizes)
        assert all(sum(sizes[s] for s in b) <= 4 for b in batches)
        assert all(len({tasks[s] for s in b}) == 1 for b in batches)
        assert {s for b in batches for s in b} == set(range(200))
        counts.add(len(batches))
        assert len(batches) % 8 == 0
    assert len(counts) == 1
    # first-fit, largest first, leaves little room unused: close to the bound of sum(sizes) / 4
    first = [b for b in epoch_batches(lengths, 4, 4, seed=3, epoch=0, tasks=tasks, sizes=sizes)]
    assert len(first) <= -(-sum(sizes) // 4) + 2


def _examples(rows):
    return pl.DataFrame(rows, schema={"game_id": pl.String, "turn_id": pl.Int64, "source": pl.String},
                        orient="row")


def test_game_packing_groups_a_games_trained_turns_in_turn_order_and_cuts_long_games():
    examples = _examples([("g1", 3, "log"), ("g2", 0, "log"), ("g1", 1, "log"), ("g1", 0, "augmented"),
                          ("g1", 2, "log"), ("g3", 0, "d0"), ("g3", 4, "d0"), ("g1", 5, "log"), ("g1", 6, "log"),
                          ("g1", 8, "log")])
    assert sequences(examples, packing="turn", capacity=4) == [[i] for i in range(10)]
    packed = sequences(examples, packing="game", capacity=4)
    # g1's six logged turns (1, 2, 3, 5, 6, 8) in two chunks of three; the augmented turn alone
    assert packed == [[1], [2, 4, 0], [3], [5, 6], [7, 8, 9]]
    assert sequences(examples, packing="game", capacity=8) == [[1], [2, 4, 0, 7, 8, 9], [3], [5, 6]]
