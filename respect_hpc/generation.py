"""How the policy generates an action, wherever it does (validation, deployment): the official settings
(OFFICIAL-RECIPE.md (g)). Only the legal action tokens may be generated (the letters, the pieces of
``select``/``deselect``, the end tokens; every other logit is suppressed and the rest renormalised),
sampled at temperature 1 or greedily, and optionally constrained to the legal actions of each game's
state (:func:`multiref.action_prefix`): a verb first, letters after a verb, no letter twice, ``deselect``
only for selected images, ``select`` only for the others, an end token only after a complete action.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respect_hpc.multiref import LETTERS, action_prefix
from respect_hpc.policy_data import PolicyEncoder, PolicyView


@dataclass(frozen=True)
class GameState:
    """What the grammar needs of a turn: its number of images and the letters selected before it."""

    n_images: int
    selected: frozenset[str]


def legal_token_ids(encoder: PolicyEncoder, view: PolicyView) -> list[int]:
    """The tokens actions are made of, as the policy's answers tokenize in context, and the end tokens."""
    letters = " ".join(LETTERS[:len(view.images) or 10])
    every = PolicyView(view.messages, view.images, f"deselect {letters} select {letters}")
    encoded = encoder.encode(every)
    (start, length), = encoded.answers
    ends = {encoder.end_id, encoder.tokenizer.eos_token_id} - {None}
    return sorted(set(encoded.input_ids[start:start + length]) | ends)


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
