"""How the policy generates an action, wherever it does (validation, deployment): the official settings
(OFFICIAL-RECIPE.md (g)). Only the legal action tokens may be generated (the letters, the pieces of
``select``/``deselect``, the end tokens; every other logit is suppressed and the rest renormalised),
sampled at temperature 1 or greedily, and optionally constrained to legal actions
(:func:`multiref.action_prefix`): a verb first, letters after a verb, no letter twice, an end token only
after a complete action; state-agnostic as the official regex, or state-aware (``deselect`` only for
selected images, ``select`` only for the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respect_hpc.domain.multiref import LETTERS, action_prefix
from respect_hpc.model.policy_inputs import PolicyEncoder, PolicyView, model_inputs
from respect_hpc.model.vision_cache import known_crops


@dataclass(frozen=True)
class GameState:
    """What the grammar needs of a turn: its number of images and the letters selected before it (None: the
    state-agnostic grammar, as the official regex)."""

    n_images: int
    selected: frozenset[str] | None


def legal_token_ids(encoder: PolicyEncoder, view: PolicyView) -> list[int]:
    """The tokens actions are made of, as the policy's answers tokenize in context (an answer opening with
    either verb: a tokenizer may split a verb at the start of the answer otherwise than after a space), and the
    end tokens."""
    letters = " ".join(LETTERS[:len(view.images) or 10])
    legal = {encoder.end_id, encoder.tokenizer.eos_token_id} - {None}
    for action in (f"deselect {letters} select {letters}", f"select {letters}"):
        encoded = encoder.encode(PolicyView(view.messages, view.images, action))
        (start, length), = encoded.answers
        legal |= set(encoded.input_ids[start:start + length])
    return sorted(legal)


class ActionLogits:
    """A logits processor for ``generate``: the legal tokens only, and with ``states`` only what keeps each
    row a prefix of a legal action of its state (an end token only once the action is complete)."""

    def __init__(self, tokenizer, legal: list[int], ends: set[int], prompt_width: int,
                 states: list[GameState] | None = None):
        self.tokenizer, self.legal, self.ends = tokenizer, legal, ends
        self.width, self.states = prompt_width, states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.full_like(scores, float("-inf"))
        allowed[:, self.legal] = 0
        if self.states is not None:
            for row, state in enumerate(self.states):
                generated = input_ids[row, self.width:].tolist()
                if self.ends & set(generated):
                    continue  # finished: generate pads it
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                for token in self.legal:
                    if not self._keeps_legal(generated, text, token, state):
                        allowed[row, token] = float("-inf")
                if torch.isinf(allowed[row]).all():  # no legal way on in these tokens: end the (empty) action
                    allowed[row, sorted(self.ends)] = 0
        return scores + allowed

    def _keeps_legal(self, generated: list[int], text: str, token: int, state: GameState) -> bool:
        """Whether ``token`` after ``generated`` (decoded: ``text``) keeps the row on a legal action."""
        if token in self.ends:
            return action_prefix(text, state.n_images, state.selected) == "complete"
        after = self.tokenizer.decode([*generated, token], skip_special_tokens=True)
        return action_prefix(after, state.n_images, state.selected) is not None


@dataclass(frozen=True)
class Generated:
    """A generated action and p, the probability the policy gave its tokens as it sampled (over the allowed
    tokens, or the whole vocabulary with ``full_vocabulary``)."""

    text: str
    probability: float


def generate_actions(model, encoder: PolicyEncoder, views: list[PolicyView], states: list[GameState], *,
                     legal: list[int], decoding: str = "sample", constrained: bool = True,
                     max_new_tokens: int = 10, full_vocabulary: bool = False) -> list[Generated]:
    """Each view's action as the policy generates it: the legal tokens only (and with ``constrained``, only
    legal actions of each state, :class:`GameState`), sampled at temperature 1 or greedy; p is the product
    of the generated tokens' probabilities through the end token, under the distribution sampled from, or
    with ``full_vocabulary`` under the model's raw full-vocabulary softmax (as the official bots log it)."""
    tokenizer = encoder.tokenizer
    prompts = [encoder.prompt_ids(view) for view in views]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
              "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}
    images = encoder.image_inputs(inputs["input_ids"], [v.images for v in views]) if encoder.multimodal else {}
    inputs = {k: v.to(device) for k, v in model_inputs(model, {**inputs, **images}).items()}
    ends = {encoder.end_id, tokenizer.eos_token_id} - {None}
    processor = ActionLogits(tokenizer, legal, ends, width, states if constrained else None)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": None} \
        if decoding == "sample" else {"do_sample": False}
    with known_crops(images.get("crop_keys")):  # the first step runs the vision model (a cache's digests)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(ends),
                             logits_processor=[processor], output_scores=True, output_logits=full_vocabulary,
                             return_dict_in_generate=True, **sampling)
    tokens = out.sequences[:, width:]
    steps = out.logits if full_vocabulary else out.scores
    logprobs = torch.stack(steps, 1).float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ended = torch.isin(tokens, torch.tensor(sorted(ends), device=tokens.device))
    live = (ended.cumsum(1) - ended.long()) == 0  # every token through the first end token
    probabilities = (logprobs.nan_to_num(neginf=-1e4) * live).sum(1).exp().tolist()
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [Generated(text, p) for text, p in zip(texts, probabilities)]
