"""Objectives against hand computations (plain math on small logits, OFFICIAL-RECIPE.md (e)), and their gradient
paths."""

import math

import pytest
import torch

from respect_hpc.training.objectives import cross_entropy_loss, kto_loss, reference_point, reinforce_loss, score_actions

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


LP = {  # log-probabilities of each target token, by hand
    (0, 0): log_p([2, 0, 0], 0), (0, 1): log_p([0, 1, 0], 1), (1, 0): log_p([0, 0, 3], 2)}
SUM_LP = [LP[0, 0] + LP[0, 1], LP[1, 0]]
LENGTH = [2, 1]


def uniform(row):
    """Cross-entropy against the uniform distribution: minus the mean log-probability over the vocabulary."""
    return -sum(log_p(row, j) for j in range(3)) / 3


U = [(uniform([2, 0, 0]) + uniform([0, 1, 0])) / 2, uniform([0, 0, 3])]


def test_scores_sum_log_probabilities_and_average_the_entropy_term_over_answer_tokens():
    scores = score_actions(LOGITS, TARGETS, MASK)
    assert scores.logprob.tolist() == pytest.approx(SUM_LP, rel=1e-5)
    assert scores.length.tolist() == LENGTH
    assert scores.uniform.tolist() == pytest.approx(U, rel=1e-5)


def test_cross_entropy_is_label_smoothing_over_the_vocabulary():
    eps = 0.1

    def smoothed(row, i):
        return (1 - eps) * -log_p(row, i) + eps * uniform(row)

    expected = [(smoothed([2, 0, 0], 0) + smoothed([0, 1, 0], 1)) / 2, smoothed([0, 0, 3], 2)]
    loss = cross_entropy_loss(score_actions(LOGITS, TARGETS, MASK), label_smoothing=eps)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_reinforce_as_the_official_code_computes_it():
    """(1 - e)(-c R log P / n) + e |R| U; c = 1 for R > 0, else P / max(p, 0.01), P never clamped."""
    eps = 0.01
    reward, propensity = torch.tensor([1.0, -0.1]), torch.tensor([0.5, 0.002])  # p below the floor
    c_negative = math.exp(SUM_LP[1]) / 0.01
    expected = [(1 - eps) * -SUM_LP[0] / 2 + eps * 1.0 * U[0],
                (1 - eps) * -(c_negative * -0.1 * SUM_LP[1]) + eps * 0.1 * U[1]]
    loss = reinforce_loss(score_actions(LOGITS, TARGETS, MASK), reward, propensity, entropy_weight=eps)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    tiny = torch.full((2, 2, 3), 0.0)
    tiny[1, 0] = torch.tensor([20.0, 20.0, 0.0])  # P of the second action about 1e-9: its c stays about 1e-7
    loss = reinforce_loss(score_actions(tiny, TARGETS, MASK), reward, torch.tensor([0.5, 0.5]), entropy_weight=0.0)
    p_now = math.exp(log_p([20, 20, 0], 2))
    assert loss[1].item() == pytest.approx(-(p_now / 0.5) * -0.1 * log_p([20, 20, 0], 2), rel=1e-4)


def test_reinforce_passes_no_gradient_through_c():
    logits = LOGITS.clone().requires_grad_(True)
    reward, propensity = torch.tensor([-0.1, -0.1]), torch.tensor([0.0, 1e-9])
    loss = reinforce_loss(score_actions(logits, TARGETS, MASK), reward, propensity, entropy_weight=0.0)
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    c = torch.tensor([math.exp(s) / 0.01 for s in SUM_LP])  # both p floored at 0.01
    manual = LOGITS.clone().requires_grad_(True)
    scores = score_actions(manual, TARGETS, MASK)
    (-(c * reward * scores.logprob / scores.length)).mean().backward()
    assert torch.allclose(logits.grad, manual.grad)


def test_kto_by_hand():
    """r = log P - log max(p, 0.01) (summed, not length-normalised), weights lambda_d / lambda_u, e U on top."""
    propensity = torch.tensor([0.3, 0.001])
    desirable = torch.tensor([True, False])
    weight = torch.tensor([4.0, 1.0])
    beta, eps, z = 0.5, 0.1, 0.7
    r = [SUM_LP[0] - math.log(0.3), SUM_LP[1] - math.log(0.01)]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    kto = [4.0 * (1 - sig(beta * (r[0] - z))), 1.0 * (1 - sig(beta * (z - r[1])))]
    expected = [(1 - eps) * kto[i] + eps * U[i] for i in range(2)]
    loss = kto_loss(score_actions(LOGITS, TARGETS, MASK), propensity, desirable, weight, z=torch.tensor(z),
                    beta=beta, entropy_weight=eps)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_kto_length_normalised_divides_r_by_the_answer_tokens():
    """The paper's text (length normalisation for all three objectives): r / n, n = 2 and 1 answer tokens."""
    propensity, desirable, weight = torch.tensor([0.3, 0.2]), torch.tensor([True, False]), torch.tensor([1.0, 1.0])
    beta, eps, z = 0.5, 0.01, 0.2
    r = [(SUM_LP[0] - math.log(0.3)) / 2, SUM_LP[1] - math.log(0.2)]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [(1 - eps) * (1 - sig(beta * (r[0] - z))) + eps * U[0],
                (1 - eps) * (1 - sig(beta * (z - r[1]))) + eps * U[1]]
    scores = score_actions(LOGITS, TARGETS, MASK)
    loss = kto_loss(scores, propensity, desirable, weight, z=torch.tensor(z), beta=beta, entropy_weight=eps,
                    length_normalised=True)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    summed = kto_loss(scores, propensity, desirable, weight, z=torch.tensor(z), beta=beta, entropy_weight=eps)
    assert summed[0].item() != pytest.approx(loss[0].item(), rel=1e-3)  # the two-token action differs
    assert summed[1].item() == pytest.approx(loss[1].item(), rel=1e-6)  # n = 1: the same


def test_kto_reference_point_is_the_clamped_mean_log_ratio_of_the_mismatched_clicks():
    now = torch.tensor([-2.0, -1.0, -4.0], requires_grad=True)
    reference = torch.tensor([-3.0, -1.5, -3.0])
    z = reference_point(now, reference)
    assert z.item() == pytest.approx((1.0 + 0.5 - 1.0) / 3) and not z.requires_grad
    assert reference_point(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0  # never below zero
    assert reference_point(torch.tensor([]), torch.tensor([])).item() == 0.0


def test_a_few_steps_lower_each_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    for make in (lambda s: cross_entropy_loss(s, label_smoothing=0.1),
                 lambda s: reinforce_loss(s, torch.tensor([1.0, -0.1]), torch.tensor([0.5, 0.5]),
                                          entropy_weight=0.01),
                 lambda s: kto_loss(s, torch.tensor([0.5, 0.5]), torch.tensor([True, False]),
                                    torch.tensor([1.0, 1.0]), z=torch.tensor(0.0), beta=0.5, entropy_weight=0.1)):
        logits = torch.randn(2, 2, 3, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=0.5)
        first = make(score_actions(logits, TARGETS, MASK)).mean().item()
        for _ in range(20):
            optimizer.zero_grad()
            make(score_actions(logits, TARGETS, MASK)).mean().backward()
            optimizer.step()
        assert make(score_actions(logits, TARGETS, MASK)).mean().item() < first
