"""Policy inputs: training examples and validation turns -> token ids, answer spans and pixels.

An example is one row of a training set (:data:`datasets.EXAMPLE_COLUMNS`) or of a
turns table. Its images are shown in an order drawn per (seed, epoch, key) when
shuffling is asked for (image order carries no meaning), and every letter in the
context, the earlier actions and the target action is renamed to match. Texts are
the official policy format through the model's chat template; the answer (action and
end of utterance) is what the policy is trained on.

A sequence holds one example, or several turns of one game (game packing): in the
official format a turn's prompt and answer are the start of the next turn's prompt,
so the last turn's sequence shows every earlier answer at its place, each attending
only to what precedes it. Batches are left-padded; the model computes logits only at
the positions that predict answer tokens (``logits_to_keep`` as a mask).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from respect_hpc.core.errors import RespectError
from respect_hpc.domain.multiref import LETTERS, Action, format_action, letters_of, parse_action
from respect_hpc.domain.prompts import PolicyTemplate, policy_messages
from respect_hpc.model.chat import PolicyText, policy_text, token_ids, without_images
from respect_hpc.model.families import Family
from respect_hpc.model.vision_cache import crop_key, known_crops


class PolicyDataError(RespectError, ValueError):
    """An example that cannot be shown to the policy (a missing image, say)."""


MAX_IMAGE_PIXELS = 4096 * 4096  # a tangram is a few hundred pixels a side; far larger is a decompression bomb


def image_problem(path: Path) -> str | None:
    """What keeps an image file from being shown to the policy (missing, not an image, damaged, too large to
    decode safely), or None; reads the header, and the pixels of an image of a sane size."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as picture:
            if picture.width * picture.height > MAX_IMAGE_PIXELS:
                return (f"{picture.width} x {picture.height} pixels, more than {MAX_IMAGE_PIXELS:,} (a "
                        "decompression bomb, or not a tangram)")
            picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    return None


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
    """One sequence as token ids; ``answers`` are the (start, length) spans of the answers trained or scored
    in it, in order (one example: its answer, the last ids)."""

    input_ids: list[int]
    answers: tuple[tuple[int, int], ...]
    images: list[str]


class PolicyEncoder:
    """Turns policy views into model inputs as the model's processor does, each image's pixels processed once.

    Texts come from the model's chat template (:mod:`respect_hpc.model.chat`); the processor
    adds BOS and expands each image placeholder into its image tokens (the family's tokens per
    crop; with IDEFICS2 five crops with image splitting), or, in a family whose processor expands
    images only when given them (Idefics3), the family writes each image's tokens from its tiles
    first; :meth:`check` makes sure the pixels carry exactly as many crops as the text has image
    tokens for.
    """

    def __init__(self, processor, tokenizer, image_folder: Path | None, family: Family):
        self.processor, self.tokenizer, self.family = processor, tokenizer, family
        self.image_folder, self.multimodal = image_folder, family.multimodal
        self._pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tiles: dict[str, tuple[int, int]] = {}  # image -> (rows, cols) of its tiles, where the family asks
        self.digests = False  # whether batches carry their crops' digests ("crop_keys", for the vision cache)
        self._digests: dict[tuple[str, int, int, int], str] = {}  # (image, crop, padded height, width) -> digest
        end = tokenizer.convert_tokens_to_ids(family.end_of_turn) if family.end_of_turn else None
        self.end_id = end if end is not None and end != tokenizer.unk_token_id else tokenizer.eos_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids(family.image_token) if self.multimodal else None

    def texts(self, view: PolicyView, with_action: bool = True) -> PolicyText:
        messages = view.messages if self.multimodal else without_images(view.messages)
        return policy_text(self.tokenizer, messages, view.action if with_action else None)

    def _ids(self, texts: list[str], images: list[str]) -> list[list[int]]:
        if self.multimodal and self.family.image_text is not None:
            return self.tokenizer([self._expanded(text, images) for text in texts])["input_ids"]
        if self.multimodal:
            return self.processor(text=texts)["input_ids"]
        return token_ids(self.tokenizer, texts)

    def _expanded(self, text: str, images: list[str]) -> str:
        """``text`` with each image placeholder written out as the processor writes it when given ``images``
        (the family's :attr:`~Family.image_text`, from each image's tiles)."""
        parts = text.split(self.family.image_token)
        if len(parts) - 1 != len(images):
            raise PolicyDataError(f"the prompt has {len(parts) - 1} {self.family.image_token} placeholders for "
                                  f"{len(images)} images")
        out = [parts[0]]
        for image, part in zip(images, parts[1:]):
            self.pixels(image)
            out += [self.family.image_text(self.processor, *self._tiles[image]), part]
        return "".join(out)

    def prompt_ids(self, view: PolicyView) -> list[int]:
        return self._ids([self.texts(view, with_action=False).prompt], view.images)[0]

    def _prompt_and_full(self, view: PolicyView) -> tuple[list[int], list[int]]:
        text = self.texts(view)
        prompt, full = self._ids([text.prompt, text.prompt + text.target], view.images)
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise PolicyDataError(f"the tokens of the answer {text.target!r} do not continue the prompt's tokens; "
                                  "the answer's tokens cannot be told apart")
        return prompt, full

    def encode(self, view: PolicyView) -> Encoded:
        prompt, full = self._prompt_and_full(view)
        return Encoded(full, ((len(prompt), len(full) - len(prompt)),), view.images if self.multimodal else [])

    def encode_game(self, views: list[PolicyView]) -> Encoded:
        """Turns of one game, in turn order and one image order, as one sequence: the last turn's, holding
        every earlier turn's prompt and answer as its start (checked token by token)."""
        spans, sequence = [], None
        for view in reversed(views):
            prompt, full = self._prompt_and_full(view)
            if sequence is None:
                sequence = full
            elif sequence[:len(full)] != full:
                raise PolicyDataError(
                    "game packing: a turn's prompt and answer are not the start of a later turn's prompt under "
                    "this model's chat template and tokenizer (set training.packing: turn)")
            spans.append((len(prompt), len(full) - len(prompt)))
        return Encoded(sequence, tuple(reversed(spans)), views[-1].images if self.multimodal else [])

    def pixels(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's crops (one, or five with splitting) and their pixel masks, or in a family of flattened
        patches (Qwen2-VL) its patches and their (t, h, w) grid."""
        if image not in self._pixels:
            from PIL import Image

            path = self.image_folder / image
            problem = image_problem(path)
            if problem:
                raise PolicyDataError(f"data.images: '{path}': {problem}")
            with Image.open(path) as picture:
                picture = picture.convert("RGB")
            if self.family.grid_tokens is not None:
                out = self.processor.image_processor(images=[picture], return_tensors="pt")
                self._pixels[image] = (out["pixel_values"], out["image_grid_thw"][0])
                self._tiles[image] = tuple(out["image_grid_thw"][0].tolist())
                return self._pixels[image]
            tiles = {"return_row_col_info": True} if self.family.image_text is not None else {}
            out = self.processor.image_processor(images=[[picture]], return_tensors="pt", **tiles)
            self._pixels[image] = (out["pixel_values"][0], out["pixel_attention_mask"][0].bool())
            if tiles:
                self._tiles[image] = (out["rows"][0][0], out["cols"][0][0])
        return self._pixels[image]

    def image_tokens(self, image: str) -> int:
        """How many image tokens ``image`` becomes in the text."""
        values, layout = self.pixels(image)
        if self.family.grid_tokens is not None:
            return self.family.grid_tokens(self.processor, layout)
        return values.shape[0] * self.family.image_tokens_per_crop(self.processor)

    def check(self, item: Encoded) -> None:
        """Refuses an example whose text has image tokens for another number of crops than its pixels have."""
        if not self.multimodal:
            return
        tokens = item.input_ids.count(self.image_token_id)
        expected = sum(self.image_tokens(name) for name in item.images)
        if tokens != expected:
            raise PolicyDataError(
                f"image tokens do not match the pixels: the prompt has {tokens} {self.family.image_token} tokens, the "
                f"{len(item.images)} images give {expected} (check model.image_splitting and the processor's "
                "image settings)")

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded ids (to the longest item) and, per answer (all answers of all items,
        in order): ``targets`` (A, T) and ``target_mask`` (A, T); ``answer_mask`` (B, L) marks the positions
        that predict answer tokens, ``answer_index`` (A, T) where each target's logits are among them."""
        width = max(len(e.input_ids) for e in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in items])
        attention_mask = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in items])
        spans = [(row, width - len(e.input_ids) + start, length)
                 for row, e in enumerate(items) for start, length in e.answers]
        keep = max(length for _, _, length in spans)
        answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        targets = torch.full((len(spans), keep), pad)
        answer_index = torch.zeros((len(spans), keep), dtype=torch.long)
        target_mask = torch.zeros((len(spans), keep), dtype=torch.bool)
        for a, (row, start, length) in enumerate(spans):
            answer_mask[row, start - 1:start + length - 1] = True
            targets[a, :length] = input_ids[row, start:start + length]
            target_mask[a, :length] = True
        flat = torch.zeros_like(input_ids)  # row-major rank of each kept position: the order the model returns
        flat[answer_mask] = torch.arange(int(answer_mask.sum()))
        for a, (row, start, length) in enumerate(spans):
            answer_index[a, :length] = flat[row, start - 1:start + length - 1]
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "answer_mask": answer_mask, "answer_index": answer_index,
            "targets": targets, "target_mask": target_mask,
        }
        if self.family.grid_tokens is None:  # a family of patch grids has 3-D positions the model computes
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if self.multimodal:
            batch.update(self.image_inputs(input_ids, [e.images for e in items]))
        return batch

    def image_inputs(self, input_ids: torch.Tensor, images: list[list[str]]) -> dict[str, torch.Tensor]:
        """The model's image inputs for a batch of ids (each row's images in prompt order). A family of patch
        grids (Qwen2-VL) also gets ``mm_token_type_ids``, from which the model computes its 3-D positions (left
        padding skipped)."""
        if self.family.grid_tokens is None:
            return self.image_batch(images)
        pixels = [self.pixels(name) for names in images for name in names]
        return {"pixel_values": torch.cat([values for values, _ in pixels]),
                "image_grid_thw": torch.stack([grid for _, grid in pixels]),
                "mm_token_type_ids": (input_ids == self.image_token_id).int()}

    def image_batch(self, images: list[list[str]]) -> dict[str, torch.Tensor]:
        """Every sequence's crops in prompt order, zero-padded to the most crops (the model drops padding
        crops)."""
        crops = [[(v, m) for name in names for v, m in zip(*self.pixels(name))] for names in images]
        n = max(len(c) for c in crops)
        height = max(v.shape[-2] for c in crops for v, _ in c)
        width = max(v.shape[-1] for c in crops for v, _ in c)
        values = torch.zeros(len(images), n, 3, height, width)
        masks = torch.zeros(len(images), n, height, width, dtype=torch.bool)
        for i, example in enumerate(crops):
            for j, (value, mask) in enumerate(example):
                values[i, j, :, :value.shape[-2], :value.shape[-1]] = value
                masks[i, j, :mask.shape[-2], :mask.shape[-1]] = mask
        batch = {"pixel_values": values, "pixel_attention_mask": masks}
        if self.digests:  # each real crop's, in the order the model gives them to the vision model
            places = [(name, j) for names in images for name in names for j in range(len(self.pixels(name)[0]))]
            rows = [(i, j) for i, example in enumerate(crops) for j in range(len(example))]
            for (name, j), (row, col) in zip(places, rows):
                if (name, j, height, width) not in self._digests:
                    self._digests[name, j, height, width] = crop_key(values[row, col], masks[row, col])
            batch["crop_keys"] = [self._digests[name, j, height, width] for name, j in places]
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_attention_mask",
                "image_grid_thw", "mm_token_type_ids")


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What of a batch the model reads (pixels in the model's dtype)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(A, T, V): the logits that predict each answer's tokens, computed at those positions only (the crops'
    digests handed to a vision cache, where the batch has them)."""
    with known_crops(batch.get("crop_keys")):
        logits = model(**model_inputs(model, batch), logits_to_keep=batch["answer_mask"]).logits
    return logits[batch["answer_index"]]
