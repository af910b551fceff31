"""Per-variant training sets: filtering, rewards, exact subsampling and rehearsal counts."""

import polars as pl
import pytest
from conftest import game, write_jsonl

from respect_hpc.datasets import UNDO_UTTERANCE, DatasetError, seed_examples, training_set
from respect_hpc.ingest import ingest
from respect_hpc.synthetic import synthesize


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "logs.parquet"
    synthesize(60, seed=2, policies={"sft": 0.5}, rounds=[0, 1]).write_parquet(path)
    turns = ingest([path]).turns
    windows = turns.filter("has_follow_up").select("game_turn_id")
    # Hand-made decoded feedback: labels cycle positive, negative, neutral, negative, positive, negative...
    cycle = [1, -1, 0, -1, 1, -1]
    labels = [cycle[i % len(cycle)] for i in range(windows.height)]
    feedback = pl.concat([windows.with_columns(kind=pl.lit(kind), label=pl.Series(labels, dtype=pl.Int8))
                          for kind in ("binary", "ternary")])
    return turns, feedback, labels


def test_fft_keeps_exactly_the_positives(logged):
    turns, feedback, labels = logged
    examples = training_set(turns, feedback, None, variant="b-fft", kind="binary", objective="fft", seed=1)
    assert examples.height == labels.count(1)
    assert set(examples["label"]) == {1} and set(examples["weight"]) == {1.0}


def test_rl_subsamples_negatives_to_five_to_four_and_keeps_neutral(logged):
    turns, feedback, labels = logged
    examples = training_set(turns, feedback, None, variant="t-rl", kind="ternary", objective="rl", seed=1)
    positives, negatives, neutral = labels.count(1), labels.count(-1), labels.count(0)
    counts = dict(examples.group_by("label").len().iter_rows())
    assert counts[1] == positives and counts[0] == neutral
    assert counts[-1] == min(negatives, int(positives * 4 / 5))
    rewards = dict(examples.select("label", "reward").unique().iter_rows())
    assert rewards == {1: 1.0, 0: 0.0, -1: -0.1}
    assert dict(examples.select("label", "weight").unique().iter_rows()) == {1: 1.0, 0: 0.0, -1: pytest.approx(0.1)}
    again = training_set(turns, feedback, None, variant="t-rl", kind="ternary", objective="rl", seed=1)
    assert again.equals(examples)  # seeded
    other = training_set(turns, feedback, None, variant="t-rl", kind="ternary", objective="rl", seed=2)
    assert not other["game_turn_id"].equals(examples["game_turn_id"])


def test_kto_drops_neutral(logged):
    turns, feedback, labels = logged
    examples = training_set(turns, feedback, None, variant="t-kto", kind="ternary", objective="kto", seed=1)
    assert 0 not in set(examples["label"])
    assert examples.filter(pl.col("label") == -1).height == int(labels.count(1) * 4 / 5)


def test_rehearsal_adds_d0_and_one_deselection_turn_per_twelve(tmp_path, logged):
    turns, feedback, _ = logged
    d0_path = tmp_path / "d0.parquet"
    synthesize(10, seed=8, policies={"human": 0.9}, rounds=[0]).write_parquet(d0_path)
    d0 = ingest([d0_path]).turns
    examples = training_set(turns, feedback, d0, variant="b-fft", kind="binary", objective="fft", seed=3)
    counts = dict(examples.group_by("source").len().iter_rows())
    assert counts["d0"] == d0.height and counts["augmented"] == d0.height // 12
    undo = examples.filter(pl.col("source") == "augmented").row(0, named=True)
    assert undo["chats"][-1] == UNDO_UTTERANCE and undo["selected"] == []
    assert undo["action"].startswith("deselect ") and len(undo["deselected"]) >= 1
    assert set(undo["deselected"]) <= set(undo["currently_selected"])
    assert len(undo["previous_actions"]) == len(undo["chats"]) - 1 == len(undo["previous_selections"])


def test_history_lines_up_with_the_game(tmp_path):
    turns = ingest([write_jsonl(tmp_path / "logs.jsonl", [game("g1")])]).turns
    d0 = seed_examples(turns, seed=0)  # 3 turns: no augmentation (3 // 12 == 0)
    last = d0.filter(pl.col("game_turn_id") == "g1_2").row(0, named=True)
    assert last["previous_actions"] == ["select A", "deselect A select B"]
    assert last["previous_selections"] == [[], ["page-A.png"]]


def test_an_empty_training_set_is_refused_before_training(logged):
    turns, feedback, _ = logged
    negative_only = feedback.with_columns(label=pl.lit(-1, pl.Int8))
    with pytest.raises(DatasetError, match="variant b-fft: no positive binary feedback in the logs"):
        training_set(turns, negative_only, None, variant="b-fft", kind="binary", objective="fft", seed=1)


def test_the_undo_turn_starts_from_the_selection_after_its_source_turn(tmp_path):
    c = [f"page-{x}.png" for x in "ABC"]
    games = [game(f"g{i}", clicks=[[c[0]], [c[1]], [c[2]]], targets=[c[2]]) for i in range(4)]  # 12 turns
    d0 = ingest([write_jsonl(tmp_path / "d0.jsonl", games)]).turns
    deselecting = 0
    for seed in range(8):
        examples = seed_examples(d0, seed=seed)
        undo = examples.filter(pl.col("source") == "augmented").row(0, named=True)
        source = d0.filter(pl.col("game_turn_id") == undo["game_turn_id"].removesuffix("_undo")).row(0, named=True)
        after = sorted((set(source["currently_selected"]) - set(source["deselected"])) | set(source["selected"]))
        assert undo["currently_selected"] == after
        deselecting += bool(source["deselected"])
    assert deselecting  # at least one seed picked a turn that deselects (the case the old expression got wrong)
