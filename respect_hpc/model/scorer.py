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

The token budget is ``decoder.batch_tokens`` where the manifest sets it. Unset, it is 8192 on a CPU; on a GPU
the first batch runs at 8192 tokens and measures the memory a token takes (its peak over what was allocated
before it), and the budget becomes what fits in 80% of the memory torch can still use after it (free plus its
cached blocks), at most 262,144 tokens. A batch that runs out of GPU memory anyway is split: the budget halves and the
batch runs again, so nothing is lost or scored twice.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from respect_hpc.core.errors import RespectError
from respect_hpc.domain.prompts import DecoderTemplate, text
from respect_hpc.model.chat import decoder_text, render, token_ids

_PROBE = "Answer a single word."
CPU_BATCH_TOKENS = 8192      # the budget on a CPU, and a GPU's first (measuring) batch
MAX_BATCH_TOKENS = 262_144   # a GPU's budget at most (past 65,536 an H200 gains little: benchmarks/RESULTS.md)
MEMORY_SHARE = 0.8           # of the memory torch can still use, what a batch may take


class GpuMemory:
    """The CUDA allocator's readings a sized budget needs (one GPU: the scorer's device)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        """Bytes the work since :meth:`start` took at its peak."""
        return torch.cuda.max_memory_allocated(self.device) - self.base

    def usable(self) -> int:
        """Bytes torch can still use: the device's free memory and its own cached, unused blocks."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def sized_budget(usable_bytes: int, bytes_per_token: float) -> int:
    """The token budget that fits in :data:`MEMORY_SHARE` of ``usable_bytes``, at most :data:`MAX_BATCH_TOKENS`
    (a batch holds one prompt at least, whatever the budget)."""
    return max(1, min(MAX_BATCH_TOKENS, int(MEMORY_SHARE * usable_bytes / max(bytes_per_token, 1.0))))


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
    while order:
        batches.append(first_batch(order, lengths, batch_tokens))
        order = order[len(batches[-1]):]
    return batches


def first_batch(order: list[int], lengths: list[int], batch_tokens: int) -> list[int]:
    """The longest start of ``order`` (longest first) with rows x its first length <= batch_tokens (one row at
    least)."""
    rows = max(1, batch_tokens // lengths[order[0]]) if order else 0
    return order[:rows]


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

    def __init__(self, model, tokenizer, template: DecoderTemplate, batch_tokens: int | None = None,
                 prefix_cache: bool = True, memory: GpuMemory | None = None):
        """``batch_tokens`` None: sized to the device (module docstring); ``memory``: the readings that size it
        (default: the CUDA allocator's, on a GPU)."""
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.prefix_cache = prefix_cache
        self.label_ids = label_token_ids(tokenizer, template.labels)
        self.device = next(model.parameters()).device
        # the key/value cache's name in and out of forward: ``cache`` where transformers has renamed it (the old
        # ``past_key_values`` then warns, and goes in 5.40), ``past_key_values`` before
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if memory is None and batch_tokens is None and self.device.type == "cuda":
            memory = GpuMemory(self.device)
        self.memory = memory if batch_tokens is None else None  # set until the first batch has sized the budget
        self.batch_tokens = batch_tokens or CPU_BATCH_TOKENS

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
                                use_cache=True, logits_to_keep=1)[self.cache_name]
        suffixes = [e[prefix:] for e in encoded]
        lengths = [len(s) for s in suffixes]
        order = sorted(range(len(suffixes)), key=lambda i: -lengths[i])
        while order:
            batch = first_batch(order, lengths, self.batch_tokens)
            inputs = self._padded([suffixes[i] for i in batch], prefix)
            if cached is not None:
                inputs[self.cache_name] = cache = copy.deepcopy(cached)
                cache.batch_repeat_interleave(len(batch))
            if self.memory is not None:
                self.memory.start()
            try:
                logits = self.model(**inputs, logits_to_keep=1, use_cache=cached is not None).logits[:, -1, :].float()
            except torch.cuda.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                del inputs
                torch.cuda.empty_cache()
                self.memory, self.batch_tokens = None, len(batch) * lengths[batch[0]] // 2
                continue
            if self.memory is not None:  # the first batch: the budget from the memory a token took
                per_token = self.memory.peak() / (len(batch) * lengths[batch[0]])
                self.batch_tokens, self.memory = sized_budget(self.memory.usable(), per_token), None
            order = order[len(batch):]
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
