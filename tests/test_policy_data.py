"""Policy inputs: image-order shuffling renames every letter consistently; batches and padding."""

from collections import Counter

import pytest

from respect_hpc.multiref import image_of, parse_action
from respect_hpc.policy_data import epoch_batches, image_order, policy_view, rename_action
from respect_hpc.prompts import policy_template

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


@pytest.mark.parametrize("group", [None, 50])
def test_epoch_batches_fill_whole_steps_and_cover_every_example(group):
    lengths = [(i * 37) % 101 for i in range(45)]
    batches = epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=0, group=group)
    assert all(len(b) == 4 for b in batches) and len(batches) * 4 == 48
    counts = Counter(i for b in batches for i in b)
    assert set(counts) == set(range(45)) and sum(counts.values()) == 48
    assert batches == epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=0, group=group)
    assert batches != epoch_batches(lengths, micro_batch=4, per_step=16, seed=1, epoch=1, group=group)


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 101 + 20 for i in range(400)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, 64, seed=0, epoch=0, group=50)
    plain = epoch_batches(lengths, 8, 64, seed=0, epoch=0, group=None)
    assert padding(grouped) * 5 < padding(plain)
