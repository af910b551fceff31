"""The feedback decoder: label words scored in one forward pass per prompt.

Each decoder prompt is put under the model's chat template as a user message
with the generation prompt after it. One forward pass gives the next-token
distribution; a label's score is the log-probability mass of its first token in
context, summed over its spellings (``Positive``, ``positive``, `` Positive``...).
Labels are compared on the token that greedy decoding would emit first, so a
label word that tokenises into several pieces (``Ne`` + ``utral``) is decided by
its first piece, which must differ from every other label's.

Throughput: prompts are tokenised once, sorted by length, cut into batches that
fit a token budget, left-padded to the longest prompt of their batch, and the
language-model head runs on the last position only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from respect_hpc.prompts import DecoderTemplate

_PROBE = "Answer a single word."


class DecoderError(ValueError):
    """A tokenizer that cannot score the template's label words."""


@dataclass(frozen=True)
class Scored:
    """The decoder's answer for one prompt: the label index and every label's log-probability."""

    index: int
    label: int
    logprobs: tuple[float, ...]
    tokens: int


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def label_token_ids(tokenizer, labels: tuple[str, ...]) -> list[list[int]]:
    """First token ids, in context after the generation prompt, of each label's spellings."""
    prefix = chat_prompt(tokenizer, _PROBE)
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids: list[list[int]] = []
    owner: dict[int, str] = {}
    for label in labels:
        firsts = []
        for spelling in dict.fromkeys((label, label.lower(), " " + label, " " + label.lower())):
            full = tokenizer(prefix + spelling, add_special_tokens=False)["input_ids"]
            if full[:len(base)] != base or len(full) == len(base):
                raise DecoderError(f"label word {spelling!r} does not tokenise after the chat template's "
                                   "generation prompt; the decoder cannot score it")
            first = full[len(base)]
            if owner.get(first, label) != label:
                token = tokenizer.convert_ids_to_tokens(first)
                raise DecoderError(f"label words {owner[first]!r} and {label!r} share their first token "
                                   f"{token!r} under this tokenizer; the decoder cannot tell them apart")
            owner[first] = label
            firsts.append(first)
        ids.append(sorted(set(firsts)))
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


class FeedbackScorer:
    """Scores decoder prompts with a causal LM (or the LM of a multimodal model)."""

    def __init__(self, model, tokenizer, template: DecoderTemplate, batch_tokens: int = 8192):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_tokens = batch_tokens
        self.label_ids = label_token_ids(tokenizer, template.labels)
        self.device = next(model.parameters()).device

    def encode(self, prompts: list[str]) -> list[list[int]]:
        texts = [chat_prompt(self.tokenizer, p) for p in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return {"input_ids": ids, "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    @torch.inference_mode()
    def score(self, prompts: list[str]) -> Iterator[list[Scored]]:
        """Yields the scored prompts batch by batch (in length order, each with its input index)."""
        encoded = self.encode(prompts)
        for batch in token_budget_batches([len(e) for e in encoded], self.batch_tokens):
            inputs = self._padded([encoded[i] for i in batch])
            logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
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
            for i, text in zip(batch, texts):
                answers[i] = parse_label(text, self.template.labels)
        return answers
