"""The simulated speaker: seeded games on the KiloGram descriptions, reactions that follow the truth of each
action (approve good ones, reject bad ones) up to the misleading rate, success and the turn limit end a game."""

import random

import pytest

from respect_hpc.domain.multiref import parse_action
from respect_hpc.domain.simulator import APPROVALS, SimulatedGame, SpeakerSettings, action_images, description_pool
from respect_hpc.domain.synthetic import load_image_bank


@pytest.fixture(scope="module")
def descriptions():
    bank = load_image_bank(dense="dense.json")  # the simulator speaks dense.json's descriptions
    if bank.source != "kilogram":
        pytest.skip("../shared/data/kilogram is absent: the simulator is tested on the real descriptions")
    return bank.descriptions


def play(descriptions, seed, settings, listener):
    rng = random.Random(seed)
    game = SimulatedGame.new(rng, description_pool(descriptions, settings.pool), settings)
    while not game.over:
        game.act(*listener(game, rng))
    return game


def oracle(game, rng):
    """Selects the target the speaker asked for."""
    return frozenset(), frozenset({game.asked})


def wrong(game, rng):
    """Selects a non-target not yet selected; once none is left, selects one again (which does nothing)."""
    free = sorted(set(game.context) - game.targets - game.selection)
    return frozenset(), frozenset({free[0] if free else sorted(game.selection)[0]})


def test_games_are_seeded_and_an_oracle_listener_always_wins(descriptions):
    settings = SpeakerSettings(silent=0, misleading=0)
    a, b = play(descriptions, 3, settings, oracle), play(descriptions, 3, settings, oracle)
    assert (a.chat, a.context, a.targets) == (b.chat, b.context, b.targets)
    assert len(a.context) == 10 and 3 <= len(a.targets) <= 5 and a.targets <= set(a.context)
    assert a.selection == a.targets and a.truths == [1] * len(a.targets)
    assert len(a.chat) == len(a.truths)  # one utterance before each action
    asked_first = a.chat[0].removeprefix("the ")
    assert any(asked_first in descriptions[t] for t in a.targets)  # a human description of a target


def test_a_listener_that_is_always_wrong_is_rejected_and_stops_at_the_turn_limit(descriptions):
    settings = SpeakerSettings(silent=0, misleading=0, implicit=0, max_turns=10)
    game = play(descriptions, 5, settings, wrong)
    assert len(game.truths) == 10 and game.selection != game.targets
    assert set(game.truths) == {-1, 0}  # wrong selections, then selections that change nothing
    assert not any(u.split(",")[0] in APPROVALS for u in game.chat[1:])


def test_misleading_and_silent_reactions_come_at_their_rates(descriptions):
    settings = SpeakerSettings(silent=0.2, misleading=0.2, implicit=0)
    approvals = silent = reactions = 0
    for seed in range(200):
        game = play(descriptions, seed, settings, wrong)
        for utterance in game.chat[1:]:
            reactions += 1
            silent += utterance in ("", "hmm", "ok let me see", "wait")
            approvals += utterance.split(",")[0] in APPROVALS
    assert 0.15 < silent / reactions < 0.25
    assert 0.12 < approvals / reactions < 0.20  # misleading 0.2 of the 0.8 that speak


def test_description_pools_split_each_images_descriptions(descriptions):
    spoken = description_pool(descriptions, "all")
    seed, deploy = description_pool(descriptions, "seed"), description_pool(descriptions, "deploy")
    assert all(seed[i] == spoken[i][0::2] and deploy[i] == spoken[i][1::2] for i in spoken)
    assert not set().union(*seed.values()) & set().union(*deploy.values())
    said = [t.lower() for texts in spoken.values() for t in texts]
    assert len(said) == len(set(said))  # no description names two tangrams
    assert sum(map(len, spoken.values())) > 20 * len(spoken)  # of KiloGram's about 50 a tangram
    with pytest.raises(ValueError, match="simulation.pool: one of seed, deploy, all"):
        SpeakerSettings(pool="train")
    with pytest.raises(ValueError, match=r"simulation.misleading: a probability in \[0, 1\]"):
        SpeakerSettings(misleading=1.5)


def test_a_description_another_tangram_in_play_has_is_never_spoken():
    bank = {f"t{i}.png": [f"shape {i}", "Bird", f"form {i}", f"figure {i}", "man"] for i in range(12)}
    bank["t0.png"] += [" shape 0", "kite"]  # a repeat, then one of its own
    assert description_pool(bank, "all", tangrams=10)["t0.png"] == ["shape 0", "form 0", "figure 0", "kite"]
    assert description_pool(bank, "seed", tangrams=10, per_image=3)["t0.png"] == ["shape 0", "figure 0"]
    assert description_pool(bank, "deploy", tangrams=10)["t0.png"] == ["form 0", "kite"]
    bank["t1.png"] = ["shape 1", "bird", "kite"]
    with pytest.raises(ValueError, match="tangram t1.png has fewer than 2 descriptions no other tangram in play"):
        description_pool(bank, "seed", tangrams=10)


def test_an_action_in_letters_names_images_in_the_listeners_order():
    context = [f"img-{i}.png" for i in range(10)]
    assert action_images(parse_action("deselect B select A J"), context) == (
        frozenset({"img-1.png"}), frozenset({"img-0.png", "img-9.png"}))


def test_human_games_mostly_succeed_and_ingest_as_human_human_games(descriptions, tmp_path):
    import polars as pl

    from respect_hpc.data.logs import ingest
    from respect_hpc.domain.simulator import human_games

    rows = human_games(40, description_pool(descriptions, "seed"), SpeakerSettings(), seed=1)
    assert rows == human_games(40, description_pool(descriptions, "seed"), SpeakerSettings(), seed=1)
    path = tmp_path / "human.parquet"
    pl.DataFrame(rows).drop("truth").write_parquet(path)
    result = ingest([path])
    assert set(result.interactions["policy"]) == {"human"} and result.turns["prob_action"].is_null().all()
    success = result.interactions["success"].mean()
    assert success >= 0.8  # skilled people: most games end with exactly the targets selected


def test_the_tangrams_in_play_and_a_fixed_order(descriptions):
    in_play = description_pool(descriptions, "deploy", tangrams=10)
    assert sorted(in_play) == sorted(descriptions)[:10]
    settings = SpeakerSettings(order="fixed")
    contexts = {tuple(play(descriptions, seed, settings, oracle).context) for seed in range(5)}
    assert all(list(c) == sorted(c) for c in contexts) and len(contexts) > 1  # 10 of 74, in name order
    game = SimulatedGame.new(random.Random(0), in_play, settings)
    assert game.context == sorted(in_play)  # ten in play: every game shows them, always in the same order
    assert SimulatedGame.new(random.Random(0), in_play, SpeakerSettings()).context != game.context
    few = description_pool(descriptions, "deploy", tangrams=10, per_image=8)
    spoken = description_pool(descriptions, "all", tangrams=10)
    assert all(few[image] == spoken[image][1:8:2] for image in few)  # 4 of each tangram's first 8
    with pytest.raises(ValueError, match="simulation.descriptions: at least 2 a tangram"):
        description_pool(descriptions, "seed", per_image=1)
    with pytest.raises(ValueError, match="simulation.tangrams: a game shows 10 tangrams, 9 are in play"):
        description_pool(descriptions, "seed", tangrams=9)
    with pytest.raises(ValueError, match="simulation.order: one of shuffled, fixed"):
        SpeakerSettings(order="sorted")


def other_target(game, rng):
    """Selects a target other than the one asked for while one is left, else the one asked for."""
    others = sorted(game.targets - game.selection - {game.asked})
    return frozenset(), frozenset({others[0] if others else game.asked})


@pytest.mark.parametrize("credit", ["target", "asked"])
def test_credit_says_whether_another_target_than_the_one_asked_for_is_approved(descriptions, credit):
    settings = SpeakerSettings(silent=0, misleading=0, implicit=0, credit=credit)
    game = play(descriptions, 4, settings, other_target)
    assert game.selection == game.targets  # another target stays selected either way: the game is won
    first_reaction = game.chat[1].split(",")[0]
    if credit == "target":
        assert game.truths == [1] * len(game.targets) and first_reaction in APPROVALS
    else:  # corrected, and asked for again until it is the last one left
        assert game.truths == [-1] * (len(game.targets) - 1) + [1] and first_reaction not in APPROVALS
    with pytest.raises(ValueError, match="simulation.credit: one of target, asked"):
        SpeakerSettings(credit="any")


def test_the_label_words_a_taught_decoder_learns_read_the_speakers_reactions():
    """The simulated setting's decoder is taught follow_up_label's words, read as the decoder prompts ask:
    every approval, explicit or just the next request, reads positive; every rejection that says so (a
    correction, "I meant ...", "the other one", an undo, try again) negative; a bare description or a silent
    reaction sounds neutral: neutral where that is a label, negative in the binary prompt ("Lean towards
    negative if it sounds neutral")."""
    from respect_hpc.domain.simulator import CORRECTIONS, IMPLICIT_CORRECTIONS, NEXT, SILENT, TRY_AGAIN, UNDO
    from respect_hpc.domain.synthetic import follow_up_label

    fill = {"wrong": "bird on a rock", "target": "tall man"}
    approvals = [f"{a}, {n} the tall man" for a in APPROVALS for n in NEXT] + [f"{n} the tall man" for n in NEXT]
    rejections = [t.format(**fill) for t in CORRECTIONS + UNDO + TRY_AGAIN + IMPLICIT_CORRECTIONS
                  if t != "the {target}"]
    neutral = ["the tall man", *SILENT]
    binary, ternary = ("Positive", "Negative"), ("Positive", "Neutral", "Negative")
    for labels in (binary, ternary):
        assert {a: follow_up_label(a, labels) for a in approvals} == {a: "Positive" for a in approvals}
        assert {r: follow_up_label(r, labels) for r in rejections} == {r: "Negative" for r in rejections}
    assert {follow_up_label(n, binary) for n in neutral} == {"Negative"}
    assert {follow_up_label(n, ternary) for n in neutral} == {"Neutral"}
