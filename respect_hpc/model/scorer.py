"""The feedback decoder: label words scored in one forward pass per prompt.

Prompts arrive rendered through the model's chat template (:func:`chat.decoder_text`)
and are tokenised with BOS as the model's processor adds it. One forward pass gives
the next-token distribution after the generation prompt; a label's score is the
log-probability mass of the first token greedy decoding would emit for it, summed
over its spellings: after IDEFICS2's ``Assistant:`` the model answers `` Positive.``
= ``▁Pos itive .``, so ``▁Pos`` counts (and ``Pos``, ``▁pos``... where they are
first pieces too). A first piece that two labels share counts for neither.

Throughput: every decoder prompt starts with the same long question, so the
key/value cache of the prompts' shared token prefix is computed once and each
prompt runs only its own suffix. Suffixes are tokenised once, sorted by length,
cut into batches that fit a token budget, left-padded to the longest of their
batch, and the language-model head runs on the last position only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from respect_hpc.core.errors import RespectError
from respect_hpc.domain.prompts import DecoderTemplate, text
from respect_hpc.model.chat import decoder_text, render, token_ids

_PROBE = "Answer a single word."


def decoder_prompts(windows, template: DecoderTemplate, tokenizer) -> list[str]:
    """The decoder prompt of each window (rows with previous_action, utterance, action, follow_up; a Polars
    frame or a list of such dicts), rendered through the tokenizer's chat template."""
    rows = windows.iter_rows(named=True) if hasattr(windows, "iter_rows") else windows
    return [decoder_text(tokenizer, template, r["previous_action"], r["utterance"], r["action"], r["follow_up"])
            for r in rows]


class DecoderError(RespectError, ValueError):
    """A tokenizer that cannot score the template's label words."""


@dataclass(frozen=True)
class Scored:
    """The decoder's answer for one prompt: the label index and every label's log-probability."""

    index: int
    label: int
    logprobs: tuple[float, ...]
    tokens: int


def label_token_ids(tokenizer, labels: tuple[str, ...]) -> list[list[int]]:
    """Token ids whose probability counts for each label, in context after the generation prompt.

    Each spelling (`` Label``, ``Label``, `` label``, ``label``) counts by the first token it
    continues the generation prompt with; a token that begins spellings of two labels is
    dropped from both, and a label left with no token is refused.
    """
    prefix = render(tokenizer, [{"role": "user", "content": text(_PROBE)}], generation_prompt=True)
    base = token_ids(tokenizer, [prefix])[0]

    def first(spelling: str) -> int | None:
        full = token_ids(tokenizer, [prefix + spelling])[0]
        return full[len(base)] if len(full) > len(base) and full[:len(base)] == base else None

    firsts = [{first(s) for s in (" " + label, label, " " + label.lower(), label.lower())} - {None}
              for label in labels]
    ids: list[list[int]] = []
    for i, label in enumerate(labels):
        others = set().union(*(f for j, f in enumerate(firsts) if j != i))
        own = sorted(firsts[i] - others)
        if not own:
            shared = ", ".join(repr(tokenizer.convert_ids_to_tokens(t)) for t in sorted(firsts[i]))
            raise DecoderError(f"label word {label!r} starts with no token of its own after the chat template's "
                               f"generation prompt (its first tokens {shared or 'none'} are shared with other "
                               "labels); the decoder cannot tell the labels apart")
        ids.append(own)
    return ids


def parse_label(text: str, labels: tuple[str, ...]) -> int | None:
    """The label a generated answer names (first word, any case), or None."""
    words = text.strip().split()
    word = words[0].strip(".,!:;\"'").lower() if words else ""
    return next((i for i, label in enumerate(labels) if label.lower() == word), None)


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut so that rows x longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens that every row starts with, leaving at least one token of each row to run."""
    if not rows:
        return 0
    first, shortest = rows[0], min(map(len, rows))
    length = shortest - 1
    for row in rows[1:]:
        length = next((k for k in range(length) if row[k] != first[k]), length)
    return max(length, 0)


class FeedbackScorer:
    """Scores decoder prompts with a causal LM (or the LM of a multimodal model)."""

    def __init__(self, model, tokenizer, template: DecoderTemplate, batch_tokens: int = 8192,
                 prefix_cache: bool = True):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_tokens = batch_tokens
        self.prefix_cache = prefix_cache
        self.label_ids = label_token_ids(tokenizer, template.labels)
        self.device = next(model.parameters()).device

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, prompts)

    def _padded(self, rows: list[list[int]], prefix: int = 0) -> dict[str, torch.Tensor]:
        """Left-padded rows that continue ``prefix`` cached tokens (pads masked between the two)."""
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = prefix + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones(len(rows), prefix, dtype=mask.dtype, device=self.device), mask], dim=1)
        return {"input_ids": ids, "attention_mask": full_mask, "position_ids": positions}

    @torch.inference_mode()
    def score(self, prompts: list[str]) -> Iterator[list[Scored]]:
        """Yields the scored prompts (rendered texts) batch by batch, in length order, each with its input index."""
        encoded = self.encode(prompts)
        prefix = shared_prefix_length(encoded) if self.prefix_cache and len(encoded) > 1 else 0
        cached = None
        if prefix:
            cached = self.model(input_ids=torch.tensor([encoded[0][:prefix]], device=self.device),
                                use_cache=True, logits_to_keep=1).past_key_values
        suffixes = [e[prefix:] for e in encoded]
        for batch in token_budget_batches([len(s) for s in suffixes], self.batch_tokens):
            inputs = self._padded([suffixes[i] for i in batch], prefix)
            if cached is not None:
                inputs["past_key_values"] = cache = copy.deepcopy(cached)
                cache.batch_repeat_interleave(len(batch))
            logits = self.model(**inputs, logits_to_keep=1, use_cache=cached is not None).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            per_label = torch.stack([torch.logsumexp(logprobs[:, ids], dim=-1) for ids in self.label_ids], dim=-1)
            best = per_label.argmax(dim=-1).tolist()
            values = per_label.tolist()
            yield [Scored(i, best[k], tuple(values[k]), len(encoded[i])) for k, i in enumerate(batch)]

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 4) -> list[int | None]:
        """Greedy generation (the check mode): the label each answer names, in input order."""
        encoded = self.encode(prompts)
        answers: list[int | None] = [None] * len(prompts)
        for batch in token_budget_batches([len(e) for e in encoded], self.batch_tokens):
            inputs = self._padded([encoded[i] for i in batch])
            inputs.pop("position_ids")
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, answer in zip(batch, texts):
                answers[i] = parse_label(answer, self.template.labels)
        return answers
