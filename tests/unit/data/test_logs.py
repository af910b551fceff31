"""Ingest: public layouts -> interactions and turns tables; every bad-row kind is refused or quarantined."""

import re

import polars as pl
import pytest
from conftest import CONTEXT, game, write_jsonl, write_parquet

from respect_hpc.data.logs import IngestError, hash_speaker, ingest
from respect_hpc.domain.multiref import Action, format_action, letters_of, parse_action
from respect_hpc.domain.synthetic import synthesize, to_public_turn_layout


def test_turn_explosion_of_a_hand_made_game(tmp_path):
    result = ingest([write_jsonl(tmp_path / "logs.jsonl", [game()])])
    turns = result.turns.to_dicts()
    assert [t["game_turn_id"] for t in turns] == ["g1_0", "g1_1", "g1_2"]
    assert [t["action"] for t in turns] == ["select A", "deselect A select B", "select D"]
    assert [t["previous_action"] for t in turns] == [None, "select A", "deselect A select B"]
    assert [t["currently_selected"] for t in turns] == [[], ["page-A.png"], ["page-B.png"]]
    assert [t["selected"] for t in turns] == [["page-A.png"], ["page-B.png"], ["page-D.png"]]
    assert [t["deselected"] for t in turns] == [[], ["page-A.png"], []]
    assert [t["utterance"] for t in turns] == ["the bird", "no, the other one", "yes, now the chair"]
    assert [t["follow_up"] for t in turns] == ["no, the other one", "yes, now the chair", ""]
    assert [t["has_follow_up"] for t in turns] == [True, True, False]  # the last action is kept, flagged
    assert [t["chats"] for t in turns] == [["the bird"], ["the bird", "no, the other one"],
                                           ["the bird", "no, the other one", "yes, now the chair"]]
    assert [t["prob_action"] for t in turns] == [0.2, 0.6, 0.9]
    assert all(t["context"] == CONTEXT and t["round"] == 1 and t["policy"] == "bp" and t["game_success"]
               for t in turns)
    assert result.interactions["speaker"].to_list() == [hash_speaker("alice")]
    assert hash_speaker("alice").startswith("h:") and "alice" not in hash_speaker("alice")


def test_letters_follow_the_listener_order(tmp_path):
    reversed_context = list(reversed(CONTEXT))  # page-J is A for this listener
    row = game(context=reversed_context, clicks=[["page-J.png", "page-A.png"], ["page-A.png"], ["page-A.png", "page-B.png"]],
               targets=["page-A.png", "page-B.png"])
    actions = ingest([write_parquet(tmp_path / "logs.parquet", [row])]).turns["action"].to_list()
    assert actions == ["select A J", "deselect A", "select I"]


def test_end_spellings_and_missing_probabilities(tmp_path):
    rows = [game("a", end="successful"), game("b", end="unsuccessful"), game("c", end=1), game("d", end="0")]
    del rows[1]["prob_action"]
    result = ingest([write_jsonl(tmp_path / "logs.jsonl", rows)])
    assert result.interactions.sort("game_id")["success"].to_list() == [True, False, True, False]
    b_probs = result.turns.filter(pl.col("game_id") == "b")["prob_action"].to_list()
    assert b_probs == [None, None, None]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_the_bots_sentinel_p_values_are_read_as_missing_and_counted_per_file(tmp_path, fmt):
    """The official bot logged -1, -2 or -3 where it could not compute p: missing p, not a bad row."""
    sentinel = float if fmt == "parquet" else int  # JSON logs write them as integers
    rows = [game("a", prob_action=[sentinel(-1), 0.6, sentinel(-3)]), game("b", prob_action=[0.2, sentinel(-2), 0.9]),
            game("c")]
    path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"logs.{fmt}", rows)
    result = ingest([path])
    p = {t["game_turn_id"]: t["prob_action"] for t in result.turns.to_dicts()}
    assert [p["a_0"], p["a_1"], p["a_2"], p["b_1"], p["c_0"]] == [None, 0.6, None, None, 0.2]
    assert result.rows_quarantined == 0 and result.unscored == {str(path): 3}
    assert result.accounting().endswith(f"{path}: 3 actions with the bot's sentinel p (-1, -2 or -3), read as "
                                        "missing p")


TURN_COLUMNS = ["game_turn_id", "action", "previous_action", "follow_up", "has_follow_up", "prob_action",
                "selected", "deselected", "currently_selected", "chats", "game_success"]


@pytest.mark.parametrize("clicks", ["toggled", "after"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_turn_layout_round_trip(tmp_path, clicks, fmt):
    """``clicks`` as the official generator writes it (the images toggled in each turn so far) or as the
    selection after the turn: both read, the action from selected/deselected."""
    from respect_hpc.data.logs import selection_after

    logs = synthesize(20, seed=3, policies={"sft": 0.5}, rounds=[0])
    from_interactions = ingest([write_parquet(tmp_path / "interaction.parquet", logs.to_dicts())])
    turn_layout = to_public_turn_layout(from_interactions.turns)
    row = turn_layout.filter(pl.col("turn_id") == 2).row(0, named=True)
    assert row["clicks"] == [sorted(turn_layout.filter((pl.col("game_id") == row["game_id"]) & (pl.col("turn_id") == t))
                                    .select(pl.col("selected").list.concat("deselected").list.sort()).item())
                             for t in range(3)]
    if clicks == "after":
        turn_layout = turn_layout.with_columns(clicks=selection_after())
    write = write_parquet if fmt == "parquet" else write_jsonl
    from_turns = ingest([write(tmp_path / f"turn.{fmt}", turn_layout.to_dicts())])
    assert from_turns.turns.select(TURN_COLUMNS).equals(from_interactions.turns.select(TURN_COLUMNS))
    assert from_turns.rows_in == from_interactions.turns.height  # turn layout: records are turns


@pytest.mark.parametrize("clicks", ["toggled", "after"])
def test_turn_layout_clicks_that_disagree_with_the_action_are_refused(tmp_path, clicks):
    from respect_hpc.data.logs import selection_after

    logs = synthesize(6, seed=3, policies={"sft": 0.5}, rounds=[0])
    turn_layout = to_public_turn_layout(ingest([write_parquet(tmp_path / "i.parquet", logs.to_dicts())]).turns)
    if clicks == "after":
        turn_layout = turn_layout.with_columns(clicks=selection_after())
    rows = turn_layout.to_dicts()
    victim = next(i for i, r in enumerate(rows) if r["turn_id"] == 1 and r["selected"])
    stray = next(x for x in rows[victim]["context"] if x not in rows[victim]["selected"])
    if clicks == "toggled":
        rows[victim]["clicks"][-1] = sorted([*rows[victim]["clicks"][-1], stray])
    else:
        rows[victim]["clicks"] = sorted({*rows[victim]["clicks"]} ^ {stray})
    with pytest.raises(IngestError, match=rf"turn\.parquet: row {victim + 1}: clicks: turn 1: clicks disagree with "
                                          r"currently_selected/selected/deselected"):  # the row of the turn at fault
        ingest([write_parquet(tmp_path / "turn.parquet", rows)])


def test_polars_actions_agree_with_the_game_rules(tmp_path):
    logs = synthesize(50, seed=1, policies={"sft": 0.4, "bp": 0.7}, rounds=[0, 1])
    turns = ingest([write_parquet(tmp_path / "logs.parquet", logs.to_dicts())]).turns
    for t in turns.iter_rows(named=True):
        before = letters_of(t["currently_selected"], t["context"])
        after = (before - letters_of(t["deselected"], t["context"])) | letters_of(t["selected"], t["context"])
        assert t["action"] == format_action(Action(deselect=before - after, select=after - before))
        assert format_action(parse_action(t["action"])) == t["action"]


BAD_ROWS = [
    (game(clicks=[["page-A.png"]]), "clicks: 1 selections for 3 utterances"),
    (game(clicks=[["page-A.png"], ["zz.png"], ["page-B.png"]]), "clicks: names images outside the context: zz.png"),
    (game(chat=["x"] * 11, clicks=[["page-A.png"]] * 11, prob_action=[0.5] * 11),
     "chat: 11 turns, more than the limit of 10"),
    (game(chat=[], clicks=[], prob_action=[]), "chat: empty game: no turns"),
    (game(policy_name="gpt"), "policy_name: unknown policy 'gpt': expected one of ba, bk, bp, human, sft, ta, tk, tp"),
    (game(round=None), "round: unknown round 'null': expected an integer from 0 to any"),
    (game(round=-1), "round: unknown round '-1': expected an integer from 0 to any"),
    (game(end="won"), "end: expected 'successful', 'unsuccessful', 0 or 1, got 'won'"),
    (game(targets=["nope.png"]), "targets: names images outside the context: nope.png"),
    (game(prob_action=[0.5]), "prob_action: 1 probabilities for 3 turns"),
    (game(prob_action=[0.5, 0.0, 1.0]), "prob_action: expected probabilities in (0, 1]"),
    (game(context=CONTEXT[:9] + ["page-A.png"]), "context: an image appears twice"),
    # nulls are never "nothing": every list column, missing or holding a null entry
    (game(clicks=None), "clicks: missing (null)"),
    (game(context=None), "context: missing (null)"),
    (game(targets=None), "targets: missing (null)"),
    (game(chat=None), "chat: missing (null)"),
    ({k: v for k, v in game().items() if k != "clicks"}, "clicks: missing (null)"),
]
# Parquet keeps a null inside a list (JSON lines refuse it as the wrong type, tested below)
NULL_ENTRIES = [
    (game(clicks=[["page-A.png"], None, ["page-B.png"]]), "clicks: holds a null entry"),
    (game(clicks=[["page-A.png"], [None], ["page-B.png"]]), "clicks: holds a null entry"),
    (game(context=[None] + CONTEXT[1:]), "context: holds a null entry"),
    (game(chat=["the bird", None, "yes"]), "chat: holds a null entry"),
]


@pytest.mark.parametrize("row, message", NULL_ENTRIES)
def test_null_entries_in_parquet_lists_are_bad_rows(tmp_path, row, message):
    with pytest.raises(IngestError, match=re.escape(f"row 2: {message}")):
        ingest([write_parquet(tmp_path / "logs.parquet", [game("ok"), row])])


def test_turn_layout_rows_that_disagree_or_miss_their_utterances(tmp_path):
    logs = synthesize(4, seed=3, policies={"sft": 0.5}, rounds=[0])
    turn_layout = to_public_turn_layout(ingest([write_parquet(tmp_path / "i.parquet", logs.to_dicts())]).turns)
    rows = turn_layout.to_dicts()
    rows[1] = {**rows[1], "end": 1 - rows[1]["end"]}
    with pytest.raises(IngestError, match="end: the game's turn rows disagree on how it ended"):
        ingest([write_parquet(tmp_path / "t1.parquet", rows)])
    rows = turn_layout.to_dicts()
    rows[1] = {**rows[1], "chats": None}
    with pytest.raises(IngestError, match="chat: holds a null entry"):
        ingest([write_parquet(tmp_path / "t2.parquet", rows)])


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_ROWS)])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_row_is_refused_with_file_row_and_field(tmp_path, row, message, fmt):
    rows = [game("ok"), row]
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"logs.{fmt}", rows)
    with pytest.raises(IngestError) as info:
        ingest([path])
    assert str(info.value) == f"{path}: row 2: {message}"


def test_duplicate_game_ids_across_files(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [game("g1")])
    second = write_jsonl(tmp_path / "b.jsonl", [game("g2"), game("g1")])
    with pytest.raises(IngestError) as info:
        ingest([first, second])
    assert str(info.value) == f"{second}: row 2: game_id: duplicate game id g1, first seen in {first} row 1"


def test_round_above_the_manifest_round(tmp_path):
    path = write_jsonl(tmp_path / "logs.jsonl", [game(round=3)])
    with pytest.raises(IngestError, match="row 1: round: unknown round '3': expected an integer from 0 to 2"):
        ingest([path], max_round=2)


def test_extra_policies_are_accepted_when_named(tmp_path):
    path = write_jsonl(tmp_path / "logs.jsonl", [game(policy_name="b-fft")])
    assert ingest([path], policies=("b-fft",)).interactions["policy"].to_list() == ["b-fft"]


def test_jsonl_shape_errors_name_the_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_bytes(b'{"game_id": "a"\n[1, 2]\n' + b'{"game_id": "b", "clicks": "A"}\n{"game_id": "caf\xe9"}\n')
    result = ingest([path], quarantine=True)
    assert result.quarantine.select("row", "field", "reason").rows() == [
        (1, "line", "not valid JSON (Expecting ',' delimiter)"),
        (2, "line", "expected a JSON object"),
        (3, "clicks", "expected a list of lists of strings"),
        (4, "line", "not UTF-8 text (byte 0xe9 at column 17)"),
    ]
    assert result.rows_in == 4 and result.rows_out == 0


def test_quarantine_keeps_bad_rows_aside_with_accounting(tmp_path):
    rows = [game("g1"), game("g2", policy_name="gpt"), game("g3"), game("g1"), game("g4", chat=[], clicks=[],
                                                                                    prob_action=[])]
    path = write_parquet(tmp_path / "logs.parquet", rows)
    result = ingest([path], quarantine=True)
    assert result.interactions["game_id"].to_list() == ["g1", "g3"]
    assert result.quarantine.select("row", "game_id", "field").rows() == [
        (2, "g2", "policy_name"), (4, "g1", "game_id"), (5, "g4", "chat")]
    assert result.accounting() == "rows in 5 = rows out 2 + rows quarantined 3"
    assert result.turns.height == 6


def test_unreadable_sources(tmp_path):
    with pytest.raises(IngestError, match="no such file or folder"):
        ingest([tmp_path / "missing.parquet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="folder holds no .parquet or .jsonl files"):
        ingest([tmp_path / "empty"])
    bad = write_parquet(tmp_path / "other.parquet", [{"game_id": "x", "chat": ["a"]}])
    with pytest.raises(IngestError, match="missing columns clicks, context, end, policy_name, round, targets of the "
                                          "public interaction layout"):
        ingest([bad])
    wrong_type = write_parquet(tmp_path / "typed.parquet", [game(chat="one string")])
    with pytest.raises(IngestError, match="column chat: expected a list of strings, got String"):
        ingest([wrong_type])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_text("not parquet")
    with pytest.raises(IngestError, match="corrupt.parquet: cannot read as Parquet"):
        ingest([corrupt])
    csv = tmp_path / "logs.csv"
    csv.write_text("game_id,chat\nx,hello\n")
    with pytest.raises(IngestError, match=r"logs.csv: expected a .parquet or .jsonl \(JSON lines\) file of the public "
                                          r"layout, got a '.csv' file"):
        ingest([csv])


def test_folders_are_read_recursively(tmp_path):
    (tmp_path / "r0").mkdir()
    write_jsonl(tmp_path / "r0" / "a.jsonl", [game("a")])
    write_parquet(tmp_path / "b.parquet", [game("b")])
    assert sorted(ingest([tmp_path]).interactions["game_id"]) == ["a", "b"]


def test_a_turn_layout_file_of_kept_turns_only_is_completed_from_their_history(tmp_path):
    """The official D_0 and validation files hold only the good turns of each game; every row carries the game
    so far (its utterances and the images toggled in each turn), which rebuilds the turns left out."""
    from respect_hpc.data.datasets import is_good_action
    from respect_hpc.data.logs import selection_after

    logs = synthesize(12, seed=5, policies={"human": 0.6}, rounds=[0])
    full = ingest([write_parquet(tmp_path / "i.parquet", logs.to_dicts())]).turns
    turn_layout = to_public_turn_layout(full)
    good = set(full.filter(is_good_action())["game_turn_id"])
    kept = turn_layout.filter(pl.col("game_turn_id").is_in(list(good)))
    assert kept.height < turn_layout.height and kept.group_by("game_id").agg(
        (pl.col("turn_id").diff().drop_nulls() != 1).any())["turn_id"].any()  # gaps inside games
    for fmt in ("parquet", "jsonl"):
        path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"kept.{fmt}", kept.to_dicts())
        turns = ingest([path]).turns
        columns = ["game_turn_id", "chats", "currently_selected", "selected", "deselected", "action"]
        mine = turns.filter(pl.col("game_turn_id").is_in(list(good))).select(columns).sort("game_turn_id")
        assert mine.equals(full.filter(pl.col("game_turn_id").is_in(list(good))).select(columns)
                           .sort("game_turn_id")), fmt
    after_form = kept.with_columns(clicks=selection_after())  # no toggles: the turns left out cannot be rebuilt
    with pytest.raises(IngestError, match="turn_id: turn ids of the game are missing or not consecutive"):
        ingest([write_parquet(tmp_path / "after.parquet", after_form.to_dicts())])
    rows = kept.to_dicts()
    victim = next(i for i, r in enumerate(rows) if r["turn_id"] > 0 and r["selected"])
    rows[victim]["selected"], rows[victim]["deselected"] = rows[victim]["deselected"], rows[victim]["selected"]
    with pytest.raises(IngestError, match=r"clicks: turn \d+: clicks disagree"):
        ingest([write_parquet(tmp_path / "bad.parquet", rows)])
