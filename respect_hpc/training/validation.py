"""Scoring a checkpoint on the human-human validation turns: the official raw accuracy (exact match of the
generated action string, letter order included) and the mean action loss.

Actions are generated as the policy acts (model/generation.py: legal tokens, sampled at temperature 1 or
greedy, constrained to each turn's legal actions where asked), from a generator seeded by (seed, epoch),
apart from the training's random state, so reruns score the same. Turns are sharded over the processes.
"""

from __future__ import annotations

import torch

from respect_hpc.config.schema import ValidationSection
from respect_hpc.domain.multiref import letters_of
from respect_hpc.domain.prompts import PolicyTemplate
from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids
from respect_hpc.model.policy_inputs import PolicyEncoder, PolicyView, answer_logits, policy_view
from respect_hpc.training.batches import to_device
from respect_hpc.training.objectives import score_actions


class Validator:
    def __init__(self, turns: list[dict], encoder: PolicyEncoder, template: PolicyTemplate,
                 settings: ValidationSection, accelerator, batch_size: int, seed: int):
        self.turns, self.encoder, self.template, self.settings = turns, encoder, template, settings
        self.accelerator, self.batch_size, self.seed = accelerator, batch_size, seed
        self.legal: list[int] | None = None  # the action tokens, found at the first validation

    @torch.no_grad()
    def __call__(self, model, epoch: int) -> tuple[float, float]:
        """(exact match, mean action loss) of ``model`` (unwrapped) on the validation turns."""
        accelerator = self.accelerator
        model.eval()
        mine = list(range(accelerator.process_index, len(self.turns), accelerator.num_processes))
        exact = loss = 0.0
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000 + epoch)
            for start in range(0, len(mine), self.batch_size):
                rows = [self.turns[i] for i in mine[start:start + self.batch_size]]
                views = [policy_view(row, self.template) for row in rows]
                encoded = [self.encoder.encode(view) for view in views]
                batch = to_device(self.encoder.collate(encoded), accelerator.device)
                scores = score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"])
                loss -= (scores.logprob / scores.length).sum().item()
                aware = self.settings.constraint == "state_aware"
                states = [GameState(len(r["context"]),
                                    frozenset(letters_of(r["currently_selected"], r["context"])) if aware else None)
                          for r in rows]
                for view, answer in zip(views, self.generate(model, views, states)):
                    exact += answer.strip() == view.action
        model.train()
        exact, loss = accelerator.reduce(torch.tensor([exact, loss], device=accelerator.device), "sum").tolist()
        n = max(len(self.turns), 1)
        return exact / n, loss / n

    def generate(self, model, views: list[PolicyView], states: list[GameState]) -> list[str]:
        """Each view's action as the policy generates it, with the validation settings."""
        if self.legal is None:
            self.legal = legal_token_ids(self.encoder, views[0])
        return [g.text for g in generate_actions(model, self.encoder, views, states, legal=self.legal,
                                                 decoding=self.settings.decoding,
                                                 constrained=self.settings.constrained,
                                                 max_new_tokens=self.settings.max_new_tokens)]
