"""Learning objectives on logged actions, as the official ReSpect code computes them (OFFICIAL-RECIPE.md (e)),
pure torch.

Inputs are the logits the policy gives the answer's tokens (the action and its end-of-utterance token):
``logits`` (B, T, V) at the positions that predict ``targets`` (B, T), with ``mask`` (B, T) marking the answer
tokens. Per action, log P is the sum of the answer tokens' log-probabilities (full-vocabulary softmax), n their
number, and U the entropy term: the cross-entropy against the uniform distribution (minus the mean over the
vocabulary of the log-softmax), averaged over the answer positions. Every function returns one loss per action;
a batch's loss is their mean.

- cross-entropy (FFT, and D_0 in every variant): (1 - e) (-log P / n) + e U, label smoothing e;
- REINFORCE: (1 - e) (-c R log P / n) + e |R| U, with c = 1 for R > 0 and otherwise
  c = exp(log P - log max(p, 0.01)), without gradient and without an upper clamp (p: the probability the
  deployed policy gave the action when it acted);
- KTO: r = log P - log max(p, 0.01); desirable actions lose lambda_d (1 - sigmoid(beta (r - z))), undesirable
  ones lambda_u (1 - sigmoid(beta (z - r))) (the weights come with the examples, datasets.py); the loss is
  (1 - e) KTO + e U, not length-normalised (the official code; ``length_normalised``: r / n, the paper's
  text); z, the reference point, is max(0, mean of log pi(a'|x) - log pi_ref(a'|x)) over a mismatched
  single click a' of each logged action (each term over its n too where length-normalised; the trainer
  measures it once per optimizer step, before the update), without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROPENSITY_FLOOR = 0.01  # p is floored here; P, the current probability, never is


@dataclass(frozen=True)
class ActionScores:
    """Per action: summed log-probability, number of answer tokens, entropy term U."""

    logprob: torch.Tensor
    length: torch.Tensor
    uniform: torch.Tensor


def score_actions(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> ActionScores:
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits in fp32; fp64 stays fp64
    mask = mask.to(dtype)
    logprobs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    length = mask.sum(-1).clamp(min=1)
    uniform = (-logprobs.mean(-1) * mask).sum(-1) / length
    return ActionScores(picked.sum(-1), length, uniform)


def cross_entropy_loss(scores: ActionScores, *, label_smoothing: float) -> torch.Tensor:
    return (1 - label_smoothing) * (-scores.logprob / scores.length) + label_smoothing * scores.uniform


def log_ratio(scores: ActionScores, propensity: torch.Tensor) -> torch.Tensor:
    """log P - log max(p, 0.01): how much likelier the action is now than when the policy acted."""
    return scores.logprob - propensity.to(scores.logprob.dtype).clamp(min=PROPENSITY_FLOOR).log()


def reinforce_loss(scores: ActionScores, reward: torch.Tensor, propensity: torch.Tensor, *,
                   entropy_weight: float) -> torch.Tensor:
    reward = reward.to(scores.logprob.dtype)
    coefficient = torch.where(reward > 0, torch.ones_like(reward), log_ratio(scores, propensity).detach().exp())
    objective = -coefficient * reward * scores.logprob / scores.length
    return (1 - entropy_weight) * objective + entropy_weight * reward.abs() * scores.uniform


def reference_point(logprob_now: torch.Tensor, logprob_reference: torch.Tensor) -> torch.Tensor:
    """KTO's z: max(0, mean of log pi(a'|x) - log pi_ref(a'|x)) over mismatched actions a', without gradient."""
    if not logprob_now.numel():
        return torch.zeros(())
    return (logprob_now.detach() - logprob_reference.to(logprob_now.dtype)).mean().clamp(min=0)


def kto_loss(scores: ActionScores, propensity: torch.Tensor, desirable: torch.Tensor, weight: torch.Tensor, *,
             z: torch.Tensor, beta: float, entropy_weight: float, length_normalised: bool = False) -> torch.Tensor:
    """``weight``: lambda_d or lambda_u of each action; ``z``: the reference point (:func:`reference_point`);
    ``length_normalised``: r divided by the action's n."""
    r = log_ratio(scores, propensity)
    if length_normalised:
        r = r / scores.length
    z = z.to(r.dtype)
    objective = weight.to(r.dtype) * torch.where(desirable, 1 - torch.sigmoid(beta * (r - z)),
                                                 1 - torch.sigmoid(beta * (z - r)))
    return (1 - entropy_weight) * objective + entropy_weight * scores.uniform
