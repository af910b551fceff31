"""Round metrics against a hand computation; the bootstrap is reproducible, covers the mean, and matches
plain resampling."""

import numpy as np
import polars as pl
import pytest
from conftest import game, write_jsonl

from respect_hpc.data.logs import ingest
from respect_hpc.report.round_metrics import METRIC_COLUMNS, bootstrap_mean_ci, round_metrics

B, C, D = "page-B.png", "page-C.png", "page-D.png"
HAND_MADE = [
    # turn 0 selects A (wrong), turn 1 deselects A (right) and selects B (right), turn 2 selects D (right): 3/4
    game("g1"),
    # selects C (wrong), selects B (right), deselects B (wrong) and C (right): 2/4
    game("g2", end="unsuccessful", chat=["Let's start over", "try again, the other one", "Remove all of them"],
         clicks=[[C], [B, C], []]),
    # selects A, a target: 1/1
    game("g3", chat=["restart from scratch: the swan"], clicks=[["page-A.png"]], targets=["page-A.png"],
         prob_action=[0.9]),
    game("g4", policy_name="sft", round=0, end=0, chat=["the bird"], clicks=[[C]], prob_action=[0.5]),
]


@pytest.fixture
def cells(tmp_path):
    result = ingest([write_jsonl(tmp_path / "logs.jsonl", HAND_MADE)])
    return {(r["policy"], r["round"]): r for r in round_metrics(result.interactions, result.turns).to_dicts()}


def test_hand_computed_cell(cells):
    bp = cells[("bp", 1)]
    assert bp["games"] == 3
    assert bp["success_rate"] == pytest.approx(2 / 3)
    assert bp["turns_mean"] == pytest.approx(7 / 3)
    assert bp["click_accuracy"] == pytest.approx(6 / 9)
    # utterances: "the bird" | "no, the other one" | "yes, now the chair" | "let's start over" |
    # "try again, the other one" | "remove all of them" | "restart from scratch: the swan"
    assert bp["vocab_size"] == 21
    assert bp["utterance_len_mean"] == pytest.approx(27 / 7)
    assert bp["reset_count"] == 3  # start over; remove all; restart (from scratch)
    assert bp["try_again_count"] == 2  # "the other one" twice ("try again" shares an utterance)
    # the official notebook counts occurrences: start over, remove all, restart, from scratch; the other one
    # twice and try again once
    assert (bp["frustrated_occurrences"], bp["lazy_occurrences"]) == (4, 3)


def test_cells_are_separate(cells):
    assert sorted(cells) == [("bp", 1), ("sft", 0)]
    sft = cells[("sft", 0)]
    assert (sft["games"], sft["success_rate"], sft["turns_mean"], sft["click_accuracy"]) == (1, 0.0, 1.0, 0.0)
    assert (sft["success_ci_low"], sft["success_ci_high"]) == (0.0, 0.0)  # one game: a degenerate interval
    assert list(cells[("sft", 0)]) == list(METRIC_COLUMNS)


def test_intervals_cover_the_mean(cells):
    bp = cells[("bp", 1)]
    assert bp["success_ci_low"] <= bp["success_rate"] <= bp["success_ci_high"]
    assert bp["turns_ci_low"] <= bp["turns_mean"] <= bp["turns_ci_high"]
    assert bp["success_ci_low"] < bp["success_ci_high"]


def test_bootstrap_is_reproducible_for_a_seed(tmp_path):
    logs = [game(f"g{i}", end=["successful", "unsuccessful"][i % 3 == 0]) for i in range(40)]
    result = ingest([write_jsonl(tmp_path / "logs.jsonl", logs)])
    first = round_metrics(result.interactions, result.turns, seed=7)
    assert first.equals(round_metrics(result.interactions, result.turns, seed=7))
    values, counts = np.arange(1.0, 11.0), np.arange(10, 110, 10)  # many distinct means: seeds differ
    assert bootstrap_mean_ci(values, counts, np.random.default_rng(7), n_resamples=500) != bootstrap_mean_ci(
        values, counts, np.random.default_rng(8), n_resamples=500)


def test_intervals_do_not_depend_on_the_order_of_rows(tmp_path):
    """The seeded resampler must see each cell's distinct values in a fixed order, whatever the row order."""
    from respect_hpc.domain.synthetic import synthesize
    from respect_hpc.report.turn_metrics import turn_metrics

    logs = synthesize(120, seed=2, policies={"sft": 0.4, "bp": 0.7}, rounds=[0, 1])
    result = ingest([write_jsonl(tmp_path / "logs.jsonl", logs.to_dicts())])
    first = round_metrics(result.interactions, result.turns, seed=0, n_resamples=2000)
    evals = result.turns.with_columns(reference_selected="selected", reference_deselected="deselected",
                                      feedback=(pl.col("game_turn_id").str.len_chars() % 3 - 1),
                                      correct=pl.lit(None, pl.Boolean))
    first_turns = turn_metrics(evals, seed=0, n_resamples=2000)
    for shuffle in range(6):
        interactions, turns = (f.sample(fraction=1.0, shuffle=True, seed=shuffle)
                               for f in (result.interactions, result.turns))
        assert round_metrics(interactions, turns, seed=0, n_resamples=2000).equals(first)
        assert turn_metrics(evals.sample(fraction=1.0, shuffle=True, seed=shuffle), seed=0,
                            n_resamples=2000).equals(first_turns)


def test_multinomial_bootstrap_matches_plain_resampling():
    rng = np.random.default_rng(0)
    sample = rng.integers(1, 11, size=300).astype(float)
    values, counts = np.unique(sample, return_counts=True)
    low, high = bootstrap_mean_ci(values, counts, np.random.default_rng(1), n_resamples=20_000)
    resampled = sample[np.random.default_rng(2).integers(0, sample.size, size=(20_000, sample.size))].mean(axis=1)
    plain_low, plain_high = np.quantile(resampled, [0.025, 0.975])
    assert low == pytest.approx(plain_low, abs=0.03) and high == pytest.approx(plain_high, abs=0.03)
    assert low < sample.mean() < high
