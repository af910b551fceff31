"""Policy inputs: training examples and validation turns -> token ids, action masks and pixels.

An example is one row of a training set (:data:`datasets.EXAMPLE_COLUMNS`) or of a
turns table. Its images are shown in an order drawn per (seed, epoch, example)
when shuffling is asked for (image order carries no meaning), and every letter in
the context, the earlier actions and the target action is renamed to match.
Texts are the official policy format through the model's chat template; the answer
(action and end of utterance) is what the policy is trained on. Batches are
left-padded so that all actions end at the last position: the model then
computes logits for the action tokens only (``logits_to_keep``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from respect_hpc.chat import PolicyText, policy_text, token_ids, without_images
from respect_hpc.multiref import LETTERS, Action, format_action, letters_of, parse_action
from respect_hpc.prompts import PolicyTemplate, policy_messages


class PolicyDataError(ValueError):
    """An example that cannot be shown to the policy (a missing image, say)."""


def image_order(context: list[str], seed: int, epoch: int, game_turn_id: str) -> list[str]:
    """The context in the order the policy sees it: shuffled per (seed, epoch, example)."""
    order = list(context)
    random.Random(f"{seed}/{epoch}/{game_turn_id}").shuffle(order)
    return order


def rename_action(text: str, before: list[str], after: list[str]) -> str:
    """An action in the letters of ``before`` rewritten in the letters of ``after``."""
    if not text:
        return text
    action = parse_action(text, len(before))
    rename = {LETTERS[i]: LETTERS[after.index(image)] for i, image in enumerate(before)}
    return format_action(Action(frozenset(rename[x] for x in action.deselect),
                                frozenset(rename[x] for x in action.select)))


@dataclass(frozen=True)
class PolicyView:
    """What the policy sees for one example, and the action it should answer."""

    messages: list[dict]
    images: list[str]   # in the order the messages show them
    action: str


def policy_view(row: dict, template: PolicyTemplate, order: list[str] | None = None) -> PolicyView:
    """The chat for ``row`` with its images in ``order`` (default: the logged order)."""
    context = row["context"]
    order = order or context
    selections = [*row["previous_selections"], row["currently_selected"]]
    messages = policy_messages(template, len(order), list(row["chats"]),
                               [letters_of(s, order) for s in selections],
                               [rename_action(a, context, order) for a in row["previous_actions"]])
    return PolicyView(messages, order, rename_action(row["action"], context, order))


@dataclass(frozen=True)
class Encoded:
    """One example as token ids; the last ``action_tokens`` ids are the answer (action and end of utterance)."""

    input_ids: list[int]
    action_tokens: int
    images: list[str]


class PolicyEncoder:
    """Turns policy views into model inputs as the model's processor does, each image's pixels processed once.

    Texts come from the model's chat template (:mod:`respect_hpc.chat`); the processor
    adds BOS and expands each ``<image>`` into its image tokens (``image_seq_len`` per
    crop; five crops with image splitting), and :meth:`check` makes sure the pixels
    carry exactly as many crops as the text has image tokens for.
    """

    def __init__(self, processor, tokenizer, image_folder: Path | None, multimodal: bool):
        self.processor, self.tokenizer = processor, tokenizer
        self.image_folder, self.multimodal = image_folder, multimodal
        self._pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        self.end_id = end if end is not None and end != tokenizer.unk_token_id else tokenizer.eos_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>") if multimodal else None

    def texts(self, view: PolicyView, with_action: bool = True) -> PolicyText:
        messages = view.messages if self.multimodal else without_images(view.messages)
        return policy_text(self.tokenizer, messages, view.action if with_action else None)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.multimodal:
            return self.processor(text=texts)["input_ids"]
        return token_ids(self.tokenizer, texts)

    def prompt_ids(self, view: PolicyView) -> list[int]:
        return self._ids([self.texts(view, with_action=False).prompt])[0]

    def encode(self, view: PolicyView) -> Encoded:
        text = self.texts(view)
        prompt, full = self._ids([text.prompt, text.prompt + text.target])
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise PolicyDataError(f"the tokens of the answer {text.target!r} do not continue the prompt's tokens; "
                                  "the answer's tokens cannot be told apart")
        return Encoded(full, len(full) - len(prompt), view.images if self.multimodal else [])

    def pixels(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's crops (one, or five with splitting) and their pixel masks."""
        if image not in self._pixels:
            from PIL import Image

            path = self.image_folder / image
            if not path.is_file():
                raise PolicyDataError(f"data.images: no file '{image}' in '{self.image_folder}'")
            with Image.open(path) as picture:
                out = self.processor.image_processor(images=[[picture.convert("RGB")]], return_tensors="pt")
            self._pixels[image] = (out["pixel_values"][0], out["pixel_attention_mask"][0].bool())
        return self._pixels[image]

    def check(self, item: Encoded) -> None:
        """Refuses an example whose text has image tokens for another number of crops than its pixels have."""
        if not self.multimodal:
            return
        tokens = item.input_ids.count(self.image_token_id)
        crops = sum(self.pixels(name)[0].shape[0] for name in item.images)
        per_crop = self.processor.image_seq_len
        if tokens != crops * per_crop:
            raise PolicyDataError(
                f"image tokens do not match the pixels: the prompt has {tokens} <image> tokens, the "
                f"{len(item.images)} images give {crops} crops x {per_crop} = {crops * per_crop} (check "
                "model.image_splitting and the processor's image_seq_len)")

    def collate(self, items: list[Encoded], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Left-padded ids (to the longest item, or to ``pad_to``); ``targets``/``target_mask`` cover the
        action positions (the last ``max(action_tokens)``)."""
        width = max(pad_to or 0, *(len(e.input_ids) for e in items))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in items])
        attention_mask = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in items])
        keep = max(e.action_tokens for e in items)
        lengths = torch.tensor([e.action_tokens for e in items])
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "targets": input_ids[:, -keep:],
            "target_mask": torch.arange(keep).unsqueeze(0) >= (keep - lengths).unsqueeze(1),
        }
        if self.multimodal:
            batch.update(self._image_batch(items))
        return batch

    def _image_batch(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Every example's crops in prompt order, zero-padded to the most crops (the model drops padding crops)."""
        crops = [[(v, m) for name in e.images for v, m in zip(*self.pixels(name))] for e in items]
        n = max(len(c) for c in crops)
        height = max(v.shape[-2] for c in crops for v, _ in c)
        width = max(v.shape[-1] for c in crops for v, _ in c)
        values = torch.zeros(len(items), n, 3, height, width)
        masks = torch.zeros(len(items), n, height, width, dtype=torch.bool)
        for i, example in enumerate(crops):
            for j, (value, mask) in enumerate(example):
                values[i, j, :, :value.shape[-2], :value.shape[-1]] = value
                masks[i, j, :mask.shape[-2], :mask.shape[-1]] = mask
        return {"pixel_values": values, "pixel_attention_mask": masks}


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits at the positions that predict each example's answer tokens (the last ``targets`` columns)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        inputs["pixel_attention_mask"] = batch["pixel_attention_mask"]
    keep = batch["targets"].shape[1]
    return model(**inputs, logits_to_keep=keep + 1).logits[:, :-1]


def epoch_batches(lengths: list[int], micro_batch: int, per_step: int, seed: int, epoch: int,
                  group: int | None = 50, tasks: list[str] | None = None) -> list[list[int]]:
    """One epoch's micro-batches, a whole number of optimizer steps' worth, in a seeded order.

    With ``tasks`` (one name per example), a micro-batch holds examples of one task only, as the official
    code batches D_0 apart from the logged turns; every task's micro-batches run once an epoch, randomly
    interleaved. Each task's examples are shuffled and wrapped around to fill its last micro-batch; with
    ``group``, they are cut into spans of ``group`` micro-batches and sorted by length inside each span (a
    micro-batch's rows have similar lengths: little padding, while every epoch still differs). The shuffled
    micro-batches are wrapped around to fill the last step (``per_step`` examples).
    """
    rng = random.Random(f"{seed}/{epoch}/batches")
    tasks = tasks or [""] * len(lengths)
    batches = []
    for task in sorted(set(tasks)):
        order = [i for i, t in enumerate(tasks) if t == task]
        rng.shuffle(order)
        filled = -(-len(order) // micro_batch) * micro_batch
        order = (order * -(-filled // len(order)))[:filled]
        span_size = len(order) if group is None else micro_batch * group
        for start in range(0, len(order), span_size):
            span = order[start:start + span_size]
            if group is not None:
                span.sort(key=lambda i: -lengths[i])
            batches += [span[i:i + micro_batch] for i in range(0, len(span), micro_batch)]
    rng.shuffle(batches)
    per_step_batches = per_step // micro_batch
    steps = -(-len(batches) // per_step_batches)
    return (batches * -(-steps * per_step_batches // len(batches)))[:steps * per_step_batches]
