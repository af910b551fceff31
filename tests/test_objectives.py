"""Objectives against hand computations (plain math on small logits), and their gradient paths."""

import math

import pytest
import torch

from respect_hpc.objectives import fft_loss, kto_loss, reinforce_loss, score_actions

# One vocabulary of 3 tokens; two sequences of up to 2 action tokens (the second has one).
LOGITS = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                       [[0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
TARGETS = torch.tensor([[0, 1], [2, 0]])
MASK = torch.tensor([[1, 1], [1, 0]])


def softmax(row):
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def log_p(row, i):
    return math.log(softmax(row)[i])


def entropy(row):
    return -sum(p * math.log(p) for p in softmax(row))


LP = {  # log-probabilities of each target token, by hand
    (0, 0): log_p([2, 0, 0], 0), (0, 1): log_p([0, 1, 0], 1), (1, 0): log_p([0, 0, 3], 2)}
MEAN_LP = [(LP[0, 0] + LP[0, 1]) / 2, LP[1, 0]]
SUM_LP = [LP[0, 0] + LP[0, 1], LP[1, 0]]
ENTROPY = ((entropy([2, 0, 0]) + entropy([0, 1, 0])) / 2 + entropy([0, 0, 3])) / 2


def test_scores_are_length_normalised_and_masked():
    scores = score_actions(LOGITS, TARGETS, MASK)
    assert scores.logprob_sum.tolist() == pytest.approx(SUM_LP, rel=1e-5)
    assert scores.logprob_mean.tolist() == pytest.approx(MEAN_LP, rel=1e-5)
    assert scores.entropy.mean().item() == pytest.approx(ENTROPY, rel=1e-5)


def test_fft_cross_entropy_with_label_smoothing():
    eps, weight = 0.1, 0.01

    def smoothed(row, i):
        return (1 - eps) * -log_p(row, i) + eps * sum(-log_p(row, j) for j in range(3)) / 3

    per_sequence = [(smoothed([2, 0, 0], 0) + smoothed([0, 1, 0], 1)) / 2, smoothed([0, 0, 3], 2)]
    expected = sum(per_sequence) / 2
    parts = fft_loss(LOGITS, TARGETS, MASK, label_smoothing=eps, entropy_weight=weight)
    assert parts.objective.item() == pytest.approx(expected, rel=1e-5)
    assert parts.total.item() == pytest.approx(expected - weight * ENTROPY, rel=1e-5)


def test_reinforce_with_inverse_propensity_on_negative_rewards():
    reward, propensity = torch.tensor([1.0, -0.1]), torch.tensor([0.5, 0.02])
    c_negative = max(math.exp(SUM_LP[1]), 1e-4) / 0.02
    expected = -(1.0 * 1.0 * MEAN_LP[0] + c_negative * -0.1 * MEAN_LP[1]) / 2
    parts = reinforce_loss(LOGITS, TARGETS, MASK, reward, propensity, entropy_weight=0.0)
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)


def test_reinforce_clamps_tiny_probabilities_and_passes_no_gradient_through_c():
    logits = LOGITS.clone().requires_grad_(True)
    reward, propensity = torch.tensor([-0.1, -0.1]), torch.tensor([0.0, 1e-9])  # unlogged-small p
    parts = reinforce_loss(logits, TARGETS, MASK, reward, propensity, entropy_weight=0.0)
    assert torch.isfinite(parts.total)
    parts.total.backward()
    # With c detached, d/dlogits = -c R / n * d(mean log p)/dlogits: recompute with c as a constant.
    c = torch.tensor([max(math.exp(s), 1e-4) / 1e-4 for s in SUM_LP])
    manual = LOGITS.clone().requires_grad_(True)
    scores = score_actions(manual, TARGETS, MASK)
    (-(c * reward * scores.logprob_mean).mean()).backward()
    assert torch.allclose(logits.grad, manual.grad)


def test_kto_by_hand():
    reference = torch.tensor([-1.0, -0.5])
    desirable = torch.tensor([True, False])
    weight = torch.tensor([1.0, 0.1])
    beta, lam_d, lam_u, ew = 0.5, 4.0, 1.0, 0.1
    r = [MEAN_LP[0] - -1.0, MEAN_LP[1] - -0.5]
    z = max(0.0, (r[0] + r[1]) / 2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [lam_d - lam_d * sig(beta * (r[0] - z)), lam_u - lam_u * sig(beta * (z - r[1]))]
    expected = (1.0 * losses[0] + 0.1 * losses[1]) / 1.1
    parts = kto_loss(LOGITS, TARGETS, MASK, reference, desirable, weight, beta=beta, lambda_desirable=lam_d,
                     lambda_undesirable=lam_u, entropy_weight=ew)
    assert parts.objective.item() == pytest.approx(expected, rel=1e-5)
    assert parts.total.item() == pytest.approx(expected - ew * ENTROPY, rel=1e-5)


def test_a_few_steps_lower_each_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    for make in (lambda lg: fft_loss(lg, TARGETS, MASK),
                 lambda lg: reinforce_loss(lg, TARGETS, MASK, torch.tensor([1.0, -0.1]), torch.tensor([0.5, 0.5])),
                 lambda lg: kto_loss(lg, TARGETS, MASK, torch.tensor([-1.0, -1.0]), torch.tensor([True, False]),
                                     torch.tensor([1.0, 0.1]))):
        logits = torch.randn(2, 2, 3, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=0.5)
        first = make(logits).total.item()
        for _ in range(20):
            optimizer.zero_grad()
            make(logits).total.backward()
            optimizer.step()
        assert make(logits).total.item() < first
