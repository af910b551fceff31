"""Per-variant training sets: filtering, rewards, exact subsampling and rehearsal counts."""

import polars as pl
import pytest
from conftest import game, write_jsonl

from respect_hpc.config.schema import PAPER_VARIANTS, Hyperparameters, Variant
from respect_hpc.data.datasets import (
    MIX,
    REMOVE_ALL,
    REMOVE_LAST,
    UNDO_UTTERANCE,
    DatasetError,
    interleave,
    negative_draws,
    seed_examples,
    source_counts,
    training_set,
    validation_turns,
)
from respect_hpc.data.logs import ingest
from respect_hpc.domain.synthetic import synthesize


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Logs of three policies over two rounds, with hand-made decoded feedback: labels cycle positive, negative,
    neutral, negative, positive, negative..."""
    path = tmp_path_factory.mktemp("ds") / "logs.parquet"
    synthesize(90, seed=2, policies={"sft": 0.5, "bp": 0.6, "ta": 0.6}, rounds=[0, 1]).write_parquet(path)
    turns = ingest([path]).turns
    windows = turns.filter("has_follow_up").select("game_turn_id")
    cycle = [1, -1, 0, -1, 1, -1]
    labels = [cycle[i % len(cycle)] for i in range(windows.height)]
    feedback = pl.concat([windows.with_columns(kind=pl.lit(kind), label=pl.Series(labels, dtype=pl.Int8))
                          for kind in ("binary", "ternary")])
    return turns, feedback


def _variant(name: str, **update) -> Variant:
    """One of the paper's variants (lineage: sft and its own policy), with ``update`` applied."""
    return next(v for v in PAPER_VARIANTS if v.name == name).model_copy(update=update)


def _expected(turns, feedback, kind: str, policies: list[str] | None) -> pl.DataFrame:
    """Labels of the non-idle logged turns of the lineage, computed apart from datasets.py."""
    mine = turns.filter(pl.col("policy").is_in(policies)) if policies else turns
    mine = mine.filter((pl.col("utterance").str.strip_chars() != "") & (pl.col("action") != ""))
    return mine.join(feedback.filter(pl.col("kind") == kind), on="game_turn_id")


HP = Hyperparameters()


def test_fft_keeps_exactly_the_positives_of_its_lineage(logged):
    turns, feedback = logged
    examples = training_set((turns, feedback), None, variant=_variant("b-fft"), hp=HP)
    expected = _expected(turns, feedback, "binary", ["sft", "bp"]).filter(pl.col("label") == 1)
    assert sorted(examples["game_turn_id"]) == sorted(expected["game_turn_id"])
    assert set(examples["policy"]) == {"sft", "bp"}  # never the RL policy's games
    assert set(examples["label"]) == {1} and set(examples["weight"]) == {1.0}
    counts = source_counts(examples)
    assert counts.columns == ["source", "policy", "round", "examples", "positive", "negative"]
    assert counts["examples"].sum() == counts["positive"].sum() == examples.height
    everything = training_set((turns, feedback), None, variant=_variant("b-fft", policies=None), hp=HP)
    assert set(everything["policy"]) == {"sft", "bp", "ta"}  # a variant without a lineage trains on every policy


def test_rl_drops_neutral_and_draws_five_to_four_negatives_afresh_each_epoch(logged):
    turns, feedback = logged
    examples = training_set((turns, feedback), None, variant=_variant("t-rl"), hp=HP)
    expected = _expected(turns, feedback, "ternary", ["sft", "ta"])
    positives, negatives = (expected.filter(pl.col("label") == v).height for v in (1, -1))
    counts = dict(examples.group_by("label").len().iter_rows())
    assert 0 not in counts and counts == {1: positives, -1: negatives}  # every negative is in the set
    assert dict(examples.select("label", "reward").unique().iter_rows()) == {1: 1.0, -1: -0.1}
    assert dict(examples.select("label", "weight").unique().iter_rows()) == {1: 1.0, -1: pytest.approx(0.1)}
    keep = min(negatives, int(positives * 4 / 5))
    assert keep < negatives  # the fixture has more negatives than 4 per 5 positives: a draw is made
    drawn = negative_draws(examples, HP, "rl", seed=1)
    label = examples["label"].to_list()
    epochs = [drawn(e) for e in range(3)]
    for rows in epochs:
        assert sum(label[i] == -1 for i in rows) == keep and sum(label[i] == 1 for i in rows) == positives
    assert epochs[0] != epochs[1] != epochs[2]  # afresh each epoch
    assert negative_draws(examples, HP, "rl", seed=1)(1) == epochs[1]  # seeded by seed and epoch
    assert negative_draws(examples, HP, "rl", seed=2)(1) != epochs[1]
    assert negative_draws(examples, HP.model_copy(update={"negatives": "all"}), "rl", seed=1) is None
    assert negative_draws(examples, HP, "fft", seed=1) is None


def test_kto_weighs_desirable_and_undesirable_by_lambda(logged):
    turns, feedback = logged
    hp = Hyperparameters(lambda_desirable=4.0, lambda_undesirable=1.0)
    examples = training_set((turns, feedback), None, variant=_variant("t-kto", policies=["sft"]), hp=hp)
    assert 0 not in set(examples["label"])
    assert dict(examples.select("label", "reward").unique().iter_rows()) == {1: 1.0, -1: -1.0}
    assert dict(examples.select("label", "weight").unique().iter_rows()) == {1: 4.0, -1: 1.0}


def test_a_lineage_that_matches_no_logs_or_logs_without_p_are_refused(logged):
    turns, feedback = logged
    with pytest.raises(DatasetError, match=r"variant b-kto: its policies \(sft, bk\) match no logged turns; the "
                                           r"logs hold: bp, ta"):
        training_set((turns.filter(pl.col("policy") != "sft"), feedback), None, variant=_variant("b-kto"), hp=HP)
    unlogged = turns.with_columns(prob_action=pl.lit(None, pl.Float64))
    with pytest.raises(DatasetError, match=r"variant t-rl: \d+ logged turns have no p \(prob_action\)"):
        training_set((unlogged, feedback), None, variant=_variant("t-rl"), hp=HP)
    assert training_set((unlogged, feedback), None, variant=_variant("b-fft"), hp=HP).height  # no p needed


def _good(turns: pl.DataFrame) -> pl.DataFrame:
    return turns.filter(((pl.col("selected").list.len() > 0)
                         & (pl.col("selected").list.set_difference("targets").list.len() == 0))
                        | ((pl.col("deselected").list.len() > 0)
                           & (pl.col("deselected").list.set_intersection("targets").list.len() == 0)))


@pytest.fixture(scope="module")
def d0(tmp_path_factory):
    path = tmp_path_factory.mktemp("d0") / "d0.parquet"
    synthesize(60, seed=8, policies={"human": 0.7}, rounds=[0]).write_parquet(path)
    return ingest([path]).turns


def test_official_rehearsal_mixes_d0_good_turns_with_two_kinds_of_deselection(d0):
    examples = seed_examples(d0, seed=3)
    own = examples.filter(pl.col("source") == "d0")
    assert set(own["game_turn_id"]) <= set(_good(d0)["game_turn_id"])  # only turns whose action was good
    augmented = examples.filter(pl.col("source") == "augmented")
    undo = augmented.filter(pl.col("game_turn_id").str.ends_with("_aug_remove_last"))
    clear = augmented.filter(pl.col("game_turn_id").str.ends_with("_aug_remove_current"))
    ratio = augmented.height / (own.height + augmented.height)
    assert undo.height and clear.height and 0.05 < ratio < 0.25, (undo.height, clear.height, ratio)  # 0.88/.06/.06
    assert set(undo["chats"].list.last()) <= set(REMOVE_LAST) and set(clear["chats"].list.last()) <= set(REMOVE_ALL)
    corrected = seed_examples(d0, seed=3, augmentation="corrected")
    assert corrected["game_turn_id"].equals(examples["game_turn_id"])  # the same draw, another state line
    for row in undo.iter_rows(named=True):  # undoes a wrong selection of the turn before
        source = d0.filter(pl.col("game_turn_id") == row["game_turn_id"].removesuffix("_aug_remove_last")
                           ).row(0, named=True)
        assert row["deselected"] == sorted(source["selected"]) and set(source["selected"]) - set(source["targets"])
        assert row["selected"] == [] and row["action"].startswith("deselect ")
        assert len(row["previous_actions"]) == len(row["chats"]) - 1 == len(row["previous_selections"])
        # official: the state line shows the selection before the source turn (augmentation.py), corrected: after
        assert row["currently_selected"] == source["currently_selected"]
        fixed = corrected.filter(pl.col("game_turn_id") == row["game_turn_id"]).row(0, named=True)
        after = sorted((set(source["currently_selected"]) - set(source["deselected"])) | set(source["selected"]))
        assert fixed["currently_selected"] == after != source["currently_selected"]
    for row in clear.iter_rows(named=True):  # deselects everything
        assert row["deselected"] == sorted(row["currently_selected"]) and row["currently_selected"]
    assert seed_examples(d0, seed=3).equals(examples) and not seed_examples(d0, seed=4).equals(examples)


def test_the_interleave_draws_as_hugging_face_datasets_does():
    """The official D_0 is ``datasets.interleave_datasets([d0, remove_last, remove_current], [0.88, 0.06, 0.06],
    seed=42)``: the same rows are kept, for several sizes and seeds."""
    from datasets import Dataset, interleave_datasets

    for sizes, seed in (((300, 40, 60), 42), ((120, 9, 30), 42), ((57, 12, 3), 7), ((1000, 80, 90), 0)):
        sources = [Dataset.from_dict({"source": [k] * n, "row": list(range(n))}) for k, n in enumerate(sizes)]
        mixed = interleave_datasets(sources, probabilities=list(MIX), seed=seed, stopping_strategy="first_exhausted")
        expected = [sorted(r for s, r in zip(mixed["source"], mixed["row"]) if s == k) for k in range(3)]
        assert interleave(sizes, MIX, seed) == expected, (sizes, seed)


def test_seed_turns_keep_listed_turns_and_the_augmented_turns_made_from_them(d0):
    everything = seed_examples(d0, seed=42)
    augmented = everything.filter(pl.col("source") == "augmented")["game_turn_id"].to_list()
    listed = {augmented[0].split("_aug")[0], *everything.filter(pl.col("source") == "d0")["game_turn_id"][:5]}
    kept = seed_examples(d0, seed=42, include=frozenset(listed))
    assert set(kept["game_turn_id"].str.replace(r"_aug.*$", "")) == listed
    assert augmented[0] in set(kept["game_turn_id"])  # kept by its source turn's id


def test_paper_rehearsal_and_none(d0):
    paper = seed_examples(d0, seed=3, augmentation="paper")
    counts = dict(paper.group_by("source").len().iter_rows())
    assert counts["augmented"] == counts["d0"] // 12 and counts["d0"] == _good(d0).height
    assert set(paper.filter(pl.col("source") == "augmented")["chats"].list.last()) == {UNDO_UTTERANCE}
    assert set(seed_examples(d0, seed=3, augmentation="none")["source"]) == {"d0"}


def test_d0_joins_the_training_set(logged, d0):
    turns, feedback = logged
    examples = training_set((turns, feedback), d0, variant=_variant("t-rl"), hp=HP)
    assert {"log", "d0", "augmented"} == set(examples["source"])
    assert examples.filter(pl.col("source") != "log")["reward"].unique().to_list() == [1.0]


def test_validation_takes_good_turns_up_to_a_seeded_limit(tmp_path):
    path = tmp_path / "hh.parquet"
    synthesize(150, seed=4, policies={"human": 0.7}, rounds=[0]).write_parquet(path)
    turns = ingest([path]).turns
    chosen = validation_turns(turns)
    assert chosen.height == 390 < turns.height
    assert chosen.filter(pl.col("action") == "").is_empty()
    assert chosen.equals(validation_turns(turns)) and not chosen.equals(validation_turns(turns, seed=1))
    assert validation_turns(turns, limit=10_000).height < turns.height  # bad actions never reach validation


def test_history_lines_up_with_the_game(tmp_path):
    turns = ingest([write_jsonl(tmp_path / "logs.jsonl", [game("g1")])]).turns
    d0 = seed_examples(turns, seed=0)  # 3 turns: no augmentation (3 // 12 == 0)
    last = d0.filter(pl.col("game_turn_id") == "g1_2").row(0, named=True)
    assert last["previous_actions"] == ["select A", "deselect A select B"]
    assert last["previous_selections"] == [[], ["page-A.png"]]


def test_an_empty_training_set_is_refused_before_training(logged):
    turns, feedback = logged
    negative_only = feedback.with_columns(label=pl.lit(-1, pl.Int8))
    with pytest.raises(DatasetError, match="variant b-fft: no positive binary feedback in the logs"):
        training_set((turns, negative_only), None, variant=_variant("b-fft"), hp=HP)


def test_the_undo_turn_starts_from_the_selection_after_its_source_turn(tmp_path):
    c = [f"page-{x}.png" for x in "ABC"]
    games = [game(f"g{i}", clicks=[[c[0]], [c[1]], [c[2]]], targets=[c[2]]) for i in range(12)]  # 24 good turns
    d0 = ingest([write_jsonl(tmp_path / "d0.jsonl", games)]).turns
    deselecting = 0
    for seed in range(8):
        examples = seed_examples(d0, seed=seed, augmentation="paper")
        undo = examples.filter(pl.col("source") == "augmented").row(0, named=True)
        source = d0.filter(pl.col("game_turn_id") == undo["game_turn_id"].removesuffix("_aug_undo")).row(0, named=True)
        after = sorted((set(source["currently_selected"]) - set(source["deselected"])) | set(source["selected"]))
        assert undo["currently_selected"] == after
        deselecting += bool(source["deselected"])
    assert deselecting  # at least one seed picked a turn that deselects (the case the old expression got wrong)
