"""The theory of docs/theory.md against brute force and against the exact enumeration of the
token rule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import ConstantModel
from specsample import (
    acceptance_rate,
    best_draft_length,
    expected_speedup,
    expected_tokens_per_pass,
)
from specsample.analysis.exact import exact_token_rule_distribution
from specsample.analysis.theory import step_speedup
from specsample.rules.token import token_rule

ALPHAS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]


def brute_force_tokens(alpha, k):
    """sum over the number of accepted drafts n of P(n) (n + 1): n < k accepted means n keeps and
    one rejection (alpha^n (1 - alpha)), n = k means k keeps (alpha^k)."""
    total = sum(alpha**n * (1 - alpha) * (n + 1) for n in range(k))
    return total + alpha**k * (k + 1)


def brute_force_speedup(alpha, k, cost_ratio, verify_cost=1.0):
    return brute_force_tokens(alpha, k) / (k * cost_ratio + verify_cost)


def brute_force_best(alpha, cost_ratio, max_k, verify_cost=lambda k: 1.0):
    """The smallest k with the largest speedup."""
    speedups = [brute_force_speedup(alpha, k, cost_ratio, verify_cost(k)) for k in range(max_k + 1)]
    best = max(speedups)
    return min(k for k in range(max_k + 1) if speedups[k] >= best * (1 - 1e-12))


def test_acceptance_rate_of_the_worked_example_is_three_quarters():
    target = torch.tensor([0.25, 0.75], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(acceptance_rate(target, draft)) == 0.75
    assert float(acceptance_rate(draft, target)) == 0.75  # symmetric: 1 - TV


def test_acceptance_rate_is_one_minus_total_variation_per_position():
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(3, 4, 20, generator=g, dtype=torch.float64), -1)
    draft = torch.softmax(torch.randn(3, 4, 20, generator=g, dtype=torch.float64), -1)
    beta = acceptance_rate(target, draft)
    assert beta.shape == (3, 4)
    total_variation = (target - draft).abs().sum(-1) / 2
    assert torch.allclose(beta, 1 - total_variation, atol=1e-12)
    assert torch.allclose(acceptance_rate(target, target), torch.ones(3, 4, dtype=torch.float64))


def test_acceptance_rate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="draft_probs"):
        acceptance_rate(torch.ones(2, 5) / 5, torch.ones(2, 4) / 4)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8, 16])
def test_expected_tokens_per_pass_equals_the_geometric_sum(alpha, k):
    assert expected_tokens_per_pass(alpha, k) == pytest.approx(brute_force_tokens(alpha, k), 1e-12)


@pytest.mark.parametrize("k", [0, 1, 4, 10])
def test_expected_tokens_per_pass_at_the_extremes(k):
    assert expected_tokens_per_pass(1.0, k) == k + 1
    assert expected_tokens_per_pass(1, k) == k + 1
    assert expected_tokens_per_pass(0.0, k) == 1
    assert expected_tokens_per_pass(0.7, 0) == 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(
    ("target", "draft"),
    [
        ([0.25, 0.75], [0.5, 0.5]),
        ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]),
        ([0.0, 0.5, 0.2, 0.3, 0.0], [0.3, 0.3, 0.0, 0.2, 0.2]),
        ([0.2, 0.2, 0.6], [0.2, 0.2, 0.6]),  # beta = 1
    ],
)
def test_exact_mean_emitted_tokens_of_the_token_rule_equals_the_formula(target, draft, k):
    """With the same p and q after every prefix each draft is kept with probability beta,
    independently, so the enumerated mean length is exactly expected_tokens_per_pass(beta, k)."""
    target_model, draft_model = ConstantModel(target), ConstantModel(draft)
    distribution = exact_token_rule_distribution(token_rule, target_model, draft_model, k=k)
    mean_emitted = sum(len(sequence) * weight for sequence, weight in distribution.items())
    beta = float(acceptance_rate(target_model.probs, draft_model.probs))
    assert mean_emitted == pytest.approx(expected_tokens_per_pass(beta, k), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("cost_ratio", [0.0, 0.05, 0.5])
def test_expected_speedup_without_a_verify_cost_curve(alpha, k, cost_ratio):
    expected = brute_force_speedup(alpha, k, cost_ratio)
    assert expected_speedup(alpha, k, cost_ratio) == pytest.approx(expected, rel=1e-12)


def test_expected_speedup_of_no_drafting_is_one():
    for alpha in ALPHAS:
        assert expected_speedup(alpha, 0, 0.3) == 1.0


def test_step_speedup_divides_tokens_by_the_step_cost_in_target_passes():
    """3 tokens from 2 draft passes at c = 0.25 and a target pass costing 1.5 one-token passes:
    3 / (2 * 0.25 + 1.5) = 1.5; one token per 1-token pass and no drafting is 1."""
    assert step_speedup(3.0, 2, 0.25, 1.5) == 1.5
    assert step_speedup(1.0, 0, 0.4) == 1.0
    with pytest.raises(ValueError, match="cost_ratio"):
        step_speedup(3.0, 2, -0.1)


def verify_cost_curves():
    """The same measured curve v(k) = 1 + 0.1 k (v(0) = 1) as a sequence, mapping and callable."""
    values = [1 + 0.1 * k for k in range(9)]
    return [values, tuple(values), dict(enumerate(values)), lambda k: 1 + 0.1 * k]


@pytest.mark.parametrize("curve", verify_cost_curves(), ids=["list", "tuple", "dict", "callable"])
def test_expected_speedup_with_a_verify_cost_curve(curve):
    for k in range(9):
        expected = brute_force_speedup(0.8, k, 0.05, 1 + 0.1 * k)
        assert expected_speedup(0.8, k, 0.05, curve) == pytest.approx(expected, rel=1e-12)
    # A pass over more tokens costing more lowers the speedup.
    assert expected_speedup(0.8, 4, 0.05, curve) < expected_speedup(0.8, 4, 0.05)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan, math.inf])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_pass(alpha, 2)
    with pytest.raises(ValueError, match="alpha"):
        expected_speedup(alpha, 2, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        best_draft_length(alpha, 0.1)


@pytest.mark.parametrize("k", [-1, 1.0, 2.5, True, "3", None])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match="^k:"):
        expected_tokens_per_pass(0.5, k)
    with pytest.raises(ValueError, match="^k:"):
        expected_speedup(0.5, k, 0.1)
    with pytest.raises(ValueError, match="^max_k:"):
        best_draft_length(0.5, 0.1, max_k=k)


@pytest.mark.parametrize("cost_ratio", [-0.1, math.nan])
def test_bad_cost_ratio_is_rejected(cost_ratio):
    with pytest.raises(ValueError, match="cost_ratio"):
        expected_speedup(0.5, 2, cost_ratio)
    with pytest.raises(ValueError, match="cost_ratio"):
        best_draft_length(0.5, cost_ratio)


@pytest.mark.parametrize(
    "curve",
    [[1.0, 1.1], {0: 1.0, 1: 1.1}, [1.0, 1.1, 0.0, 1.3], [1.0, 1.1, -2.0], lambda k: 0.0],
    ids=["short-list", "missing-key", "zero", "negative", "callable-zero"],
)
def test_bad_verify_cost_is_rejected(curve):
    with pytest.raises(ValueError, match="verify_cost"):
        expected_speedup(0.5, 2, 0.1, curve)
    with pytest.raises(ValueError, match="verify_cost"):
        best_draft_length(0.5, 0.1, max_k=3, verify_cost=curve)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.5, 0.79])
@pytest.mark.parametrize("cost_ratio", [0.8, 0.9, 1.0, 2.0])
def test_drafting_never_pays_when_alpha_is_below_the_cost_ratio(alpha, cost_ratio):
    """1 + alpha + ... + alpha^k <= 1 + k alpha < 1 + k c for every k >= 1, so every speedup is
    below 1 and the best draft length is 0."""
    assert alpha < cost_ratio
    for k in range(1, 17):
        assert expected_speedup(alpha, k, cost_ratio) < 1
    assert best_draft_length(alpha, cost_ratio) == 0


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_alpha_equal_to_the_cost_ratio_ties_at_one_and_prefers_no_drafting(alpha):
    """At alpha = c, k = 1 gives exactly speedup 1 (dyadic values: no rounding) and larger k less;
    the tie goes to the smaller k."""
    assert expected_speedup(alpha, 1, alpha) == 1.0
    assert all(expected_speedup(alpha, k, alpha) < 1 for k in range(2, 17))
    assert best_draft_length(alpha, alpha) == 0


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("cost_ratio", [0.0, 0.01, 0.05, 0.1, 0.19])
@pytest.mark.parametrize("max_k", [1, 8, 16])
def test_best_draft_length_is_the_brute_force_argmax_when_alpha_exceeds_the_cost(
    alpha, cost_ratio, max_k
):
    assert alpha > cost_ratio
    best = best_draft_length(alpha, cost_ratio, max_k=max_k)
    assert best == brute_force_best(alpha, cost_ratio, max_k)
    assert best >= 1  # alpha > c: k = 1 already beats no drafting
    assert expected_speedup(alpha, 1, cost_ratio) > 1


def test_best_draft_length_with_alpha_one_and_free_drafts_is_max_k():
    assert best_draft_length(1.0, 0.0, max_k=7) == 7
    assert best_draft_length(0.9, 0.0, max_k=16) == 16  # free drafts: more is always better


@pytest.mark.parametrize("curve", verify_cost_curves(), ids=["list", "tuple", "dict", "callable"])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_best_draft_length_with_a_verify_cost_curve_is_the_brute_force_argmax(curve, alpha):
    best = best_draft_length(alpha, 0.05, max_k=8, verify_cost=curve)
    assert best == brute_force_best(alpha, 0.05, 8, lambda k: 1 + 0.1 * k)
    # Verification that grows with k favours shorter drafts.
    assert best <= best_draft_length(alpha, 0.05, max_k=8)
