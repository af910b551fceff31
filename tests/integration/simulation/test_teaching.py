"""Teaching tiny replicas the listener's task (the simulated setting's policy base): the examples carry the
right action of each game state, a replica with fewer image tokens keeps the real prompt layout, and
teaching makes the replica pick the described tangram far above chance."""

import random

import pytest
import torch

from respect_hpc.config.schema import ModelSection, SimulationSection
from respect_hpc.domain.multiref import images_of, parse_action
from respect_hpc.domain.prompts import policy_template
from respect_hpc.domain.simulator import SpeakerSettings, description_pool
from respect_hpc.domain.synthetic import DEFAULT_KILOGRAM, load_image_bank
from respect_hpc.model.loading import load_encoder
from respect_hpc.model.policy_inputs import answer_logits
from respect_hpc.model.replica import replica_like
from respect_hpc.simulation.teaching import listener_examples, teach_listener

TEMPLATE = policy_template("respect-listener@1")
IMAGES = DEFAULT_KILOGRAM / "tangram_pngs"


@pytest.fixture(scope="module")
def bank():
    bank = load_image_bank(dense="dense.json")
    if bank.source != "kilogram":
        pytest.skip("../shared/data/kilogram is absent: the listener is taught on the real descriptions")
    return bank


def test_each_example_ends_with_the_right_action_for_its_game_state(bank):
    settings = SpeakerSettings(order="fixed")
    examples = listener_examples(random.Random(0), description_pool(bank.descriptions, "seed", 12), settings,
                                 TEMPLATE, 200)
    undos = 0
    for game, view in examples:
        assert view.images == game.context == sorted(game.context)  # fixed order: the tangrams' name order
        assert set(game.context) <= set(sorted(bank.descriptions)[:12])  # only the tangrams in play
        action = parse_action(view.action)
        wrong = game.selection - game.targets
        if wrong:  # undo every wrong selection first
            assert set(images_of(action.deselect, game.context)) == wrong and not action.select
            undos += 1
        else:
            assert images_of(action.select, game.context) == [game.asked] and not action.deselect
    assert 0 < undos < 100
    assert examples[0][1].messages == listener_examples(
        random.Random(0), description_pool(bank.descriptions, "seed", 12), settings, TEMPLATE, 1)[0][1].messages


def test_a_replica_with_four_image_tokens_keeps_the_prompt_layout(bank, tmp_path):
    folder = replica_like("idefics2-8b", tmp_path / "replica", image_tokens=4)
    encoder = load_encoder(ModelSection(path=folder, dtype="fp32", image_size=112), IMAGES)
    processor = encoder.processor
    assert processor.image_seq_len == 4
    _, view = listener_examples(random.Random(1), description_pool(bank.descriptions, "seed"), SpeakerSettings(),
                                TEMPLATE, 1)[0]
    encoded = encoder.encode(view)
    assert encoded.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 10 * 4
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.perceiver_config.resampler_n_latents == 4
    assert answer_logits(model, encoder.collate([encoded])).shape[-1] == 32003


def accuracy(folder, bank, descriptions, settings) -> float:
    """Exact-action accuracy of the greedy answer, teacher-forced, on 64 held game states."""
    from transformers import AutoModelForImageTextToText

    encoder = load_encoder(ModelSection(path=folder, dtype="fp32", image_size=112), IMAGES)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    examples = listener_examples(random.Random("held"), descriptions, settings, TEMPLATE, 64)
    with torch.no_grad():
        batch = encoder.collate([encoder.encode(view) for _, view in examples])
        right = (answer_logits(model, batch).argmax(-1) == batch["targets"]) | ~batch["target_mask"]
    return right.all(-1).float().mean().item()


def test_teaching_makes_the_replica_pick_the_described_tangram(bank, tmp_path):
    settings = SpeakerSettings(order="fixed")
    descriptions = description_pool(bank.descriptions, "seed", 10, per_image=8)  # 4 descriptions a tangram
    folder = replica_like("idefics2-8b", tmp_path / "replica", image_tokens=4)
    before = accuracy(folder, bank, descriptions, settings)
    losses = teach_listener(folder, IMAGES, descriptions, settings, template="respect-listener@1",
                            image_size=112, steps=500)
    after = accuracy(folder, bank, descriptions, settings)
    assert sum(losses[-20:]) < 0.2 * sum(losses[:20])
    assert before < 0.1 and after > 0.25  # chance: about one in ten for a select, less with deselects


def test_the_simulated_settings_decoder_reads_the_speakers_feedback(bank, tmp_path):
    """The decoder loop builds (teach_decoder: label words on a weaker person's games) against the simulator's
    truth on other games: near the paper's precision of positive (above 0.9); what it cannot get right is
    what the speaker garbles (silent and misleading reactions, a bare description)."""
    import polars as pl

    import jobs.collect
    from respect_hpc.data.feedback import labels_frame
    from respect_hpc.data.logs import ingest
    from respect_hpc.domain.prompts import decoder_template
    from respect_hpc.domain.simulator import human_games
    from respect_hpc.model.loading import load_text_model, load_tokenizer
    from respect_hpc.model.scorer import FeedbackScorer, decoder_prompts
    from respect_hpc.report.audit import decoder_quality, simulated_truth_pairs
    from respect_hpc.simulation.teaching import DECODER_LESSON_SKILL, teach_decoder

    settings = SpeakerSettings(pool="seed", order="fixed", credit="asked")
    descriptions = description_pool(bank.descriptions, "seed", 10, per_image=4)
    folder = replica_like("idefics2-8b", tmp_path / "decoder")
    teach_decoder(folder, descriptions, settings, 200, SimulationSection.model_fields["decoder_steps"].default)
    spec = ModelSection(path=folder, dtype="fp32")
    model, tokenizer = load_text_model(spec).eval(), load_tokenizer(spec)
    template = decoder_template("respect-binary@2")
    games = pl.DataFrame(human_games(200, descriptions, settings, seed=9, skill=DECODER_LESSON_SKILL))
    games.drop("truth").write_parquet(tmp_path / "held.parquet")
    held = ingest([tmp_path / "held.parquet"], policies=None).turns.filter("has_follow_up")
    # as loop scores its decoder: the decode stage's prompts and labels against the simulator's truth
    scored = sorted((s for batch in FeedbackScorer(model, tokenizer, template).score(
        decoder_prompts(held, template, tokenizer)) for s in batch), key=lambda s: s.index)
    labels = labels_frame(template, held["game_turn_id"].to_list(), scored, 0)
    pairs = simulated_truth_pairs(labels.select(game_turn_id="key", label="label", kind=pl.lit("binary"),
                                                round=pl.lit(0)), jobs.collect.truth_table(games))
    quality = decoder_quality(pairs).row(0, named=True)
    assert pairs.height == held.height and 0.3 < (pairs["human"] == 1).mean() < 0.7  # the held games have both
    assert quality["precision_positive"] > 0.85
    assert quality["accuracy"] > 0.85
