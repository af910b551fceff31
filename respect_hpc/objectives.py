"""Learning objectives on logged actions (RESPECT.md), pure torch.

Inputs are the logits the policy gives the action's tokens: ``logits`` (B, T, V)
at the positions that predict ``targets`` (B, T), with ``mask`` (B, T) marking the
action tokens; only they carry loss. Every objective uses length normalisation
(a sequence's log-probability is divided by its number of action tokens) and
subtracts an entropy bonus (``entropy_weight`` x mean token entropy).

- FFT: cross-entropy with label smoothing on positive actions.
- REINFORCE: -c R log P(a|x), with c = 1 for R >= 0 and otherwise
  c = max(P(a|x), eps) / max(p, eps), the inverse-propensity ratio of the current
  probability to the logged one, without gradient.
- KTO: with r = log pi(a|x) - log pi_ref(a|x) and a reference point z, the batch
  mean of r clamped at 0 and without gradient (an estimate of the KL to the
  reference policy), desirable actions score lambda_d sigmoid(beta (r - z)),
  undesirable ones lambda_u sigmoid(beta (z - r)); the loss is lambda_y - score,
  averaged with weights |R|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_PROB = 1e-4


@dataclass(frozen=True)
class LossParts:
    """The loss to minimise and its parts, for logging."""

    total: torch.Tensor
    objective: torch.Tensor
    entropy: torch.Tensor


@dataclass(frozen=True)
class ActionScores:
    """Per sequence: summed and length-normalised log-probability, mean token entropy."""

    logprob_sum: torch.Tensor
    logprob_mean: torch.Tensor
    entropy: torch.Tensor
    token_logprobs: torch.Tensor  # (B, T, V) log-softmax, for label smoothing


def score_actions(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> ActionScores:
    mask = mask.to(logits.dtype)
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    lengths = mask.sum(-1).clamp(min=1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return ActionScores(picked.sum(-1), picked.sum(-1) / lengths, (entropy * mask).sum(-1) / lengths, logprobs)


def _with_entropy(objective: torch.Tensor, scores: ActionScores, entropy_weight: float) -> LossParts:
    entropy = scores.entropy.mean()
    return LossParts(objective - entropy_weight * entropy, objective.detach(), entropy.detach())


def fft_loss(logits, targets, mask, *, label_smoothing: float = 0.1, entropy_weight: float = 0.01,
             temperature: float = 1.0) -> LossParts:
    scores = score_actions(logits, targets, mask, temperature)
    mask = mask.to(scores.token_logprobs.dtype)
    target_nll = -scores.token_logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    uniform_nll = -scores.token_logprobs.mean(-1)
    per_token = (1 - label_smoothing) * target_nll + label_smoothing * uniform_nll
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return _with_entropy(per_sequence.mean(), scores, entropy_weight)


def reinforce_loss(logits, targets, mask, reward: torch.Tensor, propensity: torch.Tensor, *,
                   entropy_weight: float = 0.01, temperature: float = 1.0, min_prob: float = MIN_PROB) -> LossParts:
    """REINFORCE on logged actions; ``propensity`` is p, the probability logged when the policy acted."""
    scores = score_actions(logits, targets, mask, temperature)
    current = scores.logprob_sum.detach().exp().clamp(min=min_prob)
    ratio = current / propensity.to(current.dtype).clamp(min=min_prob)
    coefficient = torch.where(reward >= 0, torch.ones_like(ratio), ratio)
    objective = -(coefficient * reward.to(current.dtype) * scores.logprob_mean).mean()
    return _with_entropy(objective, scores, entropy_weight)


def kto_loss(logits, targets, mask, reference_logprob: torch.Tensor, desirable: torch.Tensor,
             weight: torch.Tensor, *, beta: float = 0.5, lambda_desirable: float = 4.0,
             lambda_undesirable: float = 1.0, entropy_weight: float = 0.1, temperature: float = 1.0) -> LossParts:
    """KTO; ``reference_logprob`` is the reference policy's length-normalised log-probability of each action."""
    scores = score_actions(logits, targets, mask, temperature)
    log_ratio = scores.logprob_mean - reference_logprob.to(scores.logprob_mean.dtype)
    z = log_ratio.detach().mean().clamp(min=0)
    value = torch.where(desirable, lambda_desirable * torch.sigmoid(beta * (log_ratio - z)),
                        lambda_undesirable * torch.sigmoid(beta * (z - log_ratio)))
    lam = torch.where(desirable, torch.full_like(value, lambda_desirable), torch.full_like(value, lambda_undesirable))
    weight = weight.to(value.dtype)
    objective = ((lam - value) * weight).sum() / weight.sum().clamp(min=1e-12)
    return _with_entropy(objective, scores, entropy_weight)
