"""Typical acceptance (Medusa) is LOSSY: its keep test follows the formula exactly, and exact
enumeration shows by how much its output differs from the target, next to the exact token rule."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import specsample.lossy
from helpers import ConstantModel, TablePrefixModel
from specsample.analysis.exact import (
    exact_token_rule_distribution,
    expected_accepted,
    prefix_errors,
)
from specsample.lossy import (
    exact_typical_distribution,
    typical_distance,
    typical_keep_mask,
    typical_rule,
)
from specsample.rules.result import PAD
from specsample.rules.token import token_rule

EXACT = 1e-12


def small_pair():
    """The pair the negative controls of the token-rule enumeration use: vocab 4."""
    return TablePrefixModel(4, seed=5, sharpness=2.0), TablePrefixModel(4, seed=6, sharpness=2.0)


def formula_keeps(p: list[float], token: int, epsilon: float, delta: float) -> bool:
    """The keep test written out in plain Python: p(x) > min(epsilon, delta * exp(-H(p)))."""
    entropy = -sum(v * math.log(v) for v in p if v > 0)
    return p[token] > min(epsilon, delta * math.exp(-entropy))


def oracle_distribution(target, draft, *, k, epsilon, delta):
    """Plain-loop oracle of one step, by the definition: for every draft sequence, keep while the
    formula holds, then emit each v with probability p_n(v)."""
    vocab = int(target(()).shape[0])
    distribution: dict[tuple[int, ...], float] = {}
    for drafts in itertools.product(range(vocab), repeat=k):
        weight = math.prod(float(draft(drafts[:i])[drafts[i]]) for i in range(k))
        if weight <= 0:
            continue
        n = 0
        while n < k and formula_keeps(target(drafts[:n]).tolist(), drafts[n], epsilon, delta):
            n += 1
        for v, p in enumerate(target(drafts[:n]).tolist()):
            if p > 0:
                key = drafts[:n] + (v,)
                distribution[key] = distribution.get(key, 0.0) + weight * p
    return distribution


def largest_difference(a: dict, b: dict) -> float:
    return max(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in set(a) | set(b))


def test_package_docstring_says_lossy_first():
    assert "LOSSY" in specsample.lossy.__doc__.splitlines()[0]
    assert "NOT distributed as the target" in specsample.lossy.__doc__.splitlines()[0]


def test_typical_is_measurably_lossy_where_token_rule_is_exact_and_accepts_more():
    target, draft = small_pair()
    exact = exact_token_rule_distribution(token_rule, target, draft, k=2)
    assert max(prefix_errors(exact, target)) < EXACT

    distance = typical_distance(target, draft, k=2)
    assert distance.mass_error < EXACT
    assert distance.max_prefix_error > 1e-2
    assert distance.first_token_total_variation > 1e-2
    # Measured on this pair (epsilon 0.09, delta 0.3): prefix error 0.341, first-token TV 0.270,
    # E[accepted] 1.658 for typical vs 1.175 for the token rule.
    assert distance.max_prefix_error == pytest.approx(0.3414, abs=1e-3)
    assert distance.token_rule_expected_accepted == pytest.approx(expected_accepted(exact))
    assert distance.expected_accepted == pytest.approx(1.6576, abs=1e-3)
    assert distance.acceptance_gain > 0.4


@pytest.mark.parametrize(
    ("vocab", "k", "zeros", "epsilon", "delta"),
    [(4, 2, 0, 0.09, 0.3), (3, 3, 1, 0.3, 0.09), (4, 0, 0, 0.09, 0.3), (5, 2, 2, 1.0, 2.0)],
)
def test_enumeration_of_the_rule_equals_the_plain_loop_oracle(vocab, k, zeros, epsilon, delta):
    target = TablePrefixModel(vocab, seed=11, sharpness=1.5, zeros=zeros)
    draft = TablePrefixModel(vocab, seed=12, sharpness=1.0)
    enumerated = exact_typical_distribution(target, draft, k=k, epsilon=epsilon, delta=delta)
    oracle = oracle_distribution(target, draft, k=k, epsilon=epsilon, delta=delta)
    assert abs(sum(enumerated.values()) - 1) < EXACT
    assert largest_difference(enumerated, oracle) < EXACT


def test_token_rule_enumeration_sums_to_one_but_does_not_fit_typical():
    """Why the lossy module enumerates itself: `exact_token_rule_distribution` cuts the final
    uniform at the token rule's residual, not at the row typical acceptance draws from. Its
    weights still sum to 1, but the distribution it reports for this rule is wrong."""
    target, draft = small_pair()
    rule = functools.partial(typical_rule, epsilon=0.09, delta=0.3)
    misfit = exact_token_rule_distribution(rule, target, draft, k=2)
    oracle = oracle_distribution(target, draft, k=2, epsilon=0.09, delta=0.3)
    assert abs(sum(misfit.values()) - 1) < EXACT
    assert largest_difference(misfit, oracle) > 1e-2


# Hand-made target rows (vocab 4) with their entropies' thresholds at epsilon 0.09, delta 0.3.
UNIFORM = [0.25, 0.25, 0.25, 0.25]  # H = ln 4: threshold min(0.09, 0.075) = 0.075
ONE_HOT = [0.0, 0.0, 1.0, 0.0]  # H = 0: threshold min(0.09, 0.3) = 0.09
PEAKED = [0.05, 0.95, 0.0, 0.0]  # H = 0.199: threshold 0.09 (epsilon binds)
FLAT = [0.085, 0.305, 0.305, 0.305]  # H = 1.296: threshold 0.0821 (delta binds), 0.085 passes


@pytest.mark.parametrize(
    ("row", "token", "kept"),
    [
        (UNIFORM, 0, True),
        (ONE_HOT, 2, True),
        (ONE_HOT, 0, False),  # p(x) = 0 is never kept
        (PEAKED, 0, False),
        (PEAKED, 1, True),
        (FLAT, 0, True),  # below epsilon, above delta * exp(-H)
    ],
)
def test_keep_test_follows_the_formula_on_hand_made_rows(row, token, kept):
    assert formula_keeps(row, token, 0.09, 0.3) is kept
    for dtype in (torch.float64, torch.float32):
        target_probs = torch.tensor([[row, UNIFORM]], dtype=dtype)  # [1, k+1 = 2, 4]
        mask = typical_keep_mask(torch.tensor([[token]]), target_probs, epsilon=0.09, delta=0.3)
        assert mask.tolist() == [[kept]]


def test_ragged_batch_keeps_the_formula_prefix_and_draws_from_the_stopping_row():
    """Each target row puts its mass differently, and the sample uniform 0.999 picks the last
    token of positive probability (UNIFORM, FLAT: 3; PEAKED: 1; ONE_HOT: 2), so the final token
    names the row it was drawn from: the first rejected position, or the bonus row."""
    target_probs = torch.tensor(
        [
            [ONE_HOT, UNIFORM, PEAKED, FLAT],
            [UNIFORM, ONE_HOT, PEAKED, [0.0, 0.0, 0.0, 1.0]],
            [UNIFORM, ONE_HOT, PEAKED, FLAT],
            [UNIFORM, PEAKED, ONE_HOT, FLAT],
            [FLAT, PEAKED, ONE_HOT, UNIFORM],
            [UNIFORM, FLAT, PEAKED, ONE_HOT],
        ],
        dtype=torch.float64,
    )  # [batch 6, k+1 = 4, vocab 4]
    draft_tokens = torch.tensor([[3, 3, 3], [1, 2, 1], [0, 0, 0], [3, 0, 2], [0, 1, 0], [0, 1, 1]])
    draft_lengths = torch.tensor([0, 3, 3, 3, 3, 1])
    result = typical_rule(
        draft_tokens,
        None,
        target_probs,
        draft_lengths,
        torch.zeros(6, 3, dtype=torch.float64),
        torch.full((6,), 0.999, dtype=torch.float64),
    )
    assert result.rule_used == "typical"
    assert result.num_accepted.tolist() == [0, 3, 1, 1, 2, 1]
    assert result.tokens.tolist() == [
        [2, PAD, PAD, PAD],  # draft length 0: drawn from row 0
        [1, 2, 1, 3],  # all kept (the one-hot row too): bonus from row 3
        [0, 2, PAD, PAD],  # p(x) = 0 in a one-hot row: rejected, drawn from that row
        [3, 1, PAD, PAD],  # p(x) = 0.05 < 0.09: rejected, drawn from that row (not its residual)
        [0, 1, 2, PAD],  # FLAT keeps p(x) = 0.085 on the entropy term
        [0, 3, PAD, PAD],  # draft length 1 caps a run that would continue
    ]


def test_keep_decisions_ignore_accept_uniforms_and_draft_probs():
    generator = torch.Generator().manual_seed(0)
    batch, k, vocab = 64, 3, 6
    target_probs = torch.softmax(torch.randn(batch, k + 1, vocab, generator=generator), dim=-1)
    draft_probs = torch.softmax(torch.randn(batch, k, vocab, generator=generator), dim=-1)
    draft_tokens = torch.randint(vocab, (batch, k), generator=generator)
    draft_lengths = torch.randint(k + 1, (batch,), generator=generator)
    sample_uniforms = torch.rand(batch, generator=generator, dtype=torch.float64)
    results = [
        typical_rule(
            draft_tokens,
            probs,
            target_probs,
            draft_lengths,
            torch.rand(batch, k, generator=generator, dtype=torch.float64),
            sample_uniforms,
        )
        for probs in (None, draft_probs)
    ]
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert torch.equal(results[0].num_accepted, results[1].num_accepted)
    # Row by row: the formula prefix, capped by draft_lengths.
    for b in range(batch):
        n = 0
        while n < int(draft_lengths[b]) and formula_keeps(
            target_probs[b, n].double().tolist(), int(draft_tokens[b, n]), 0.09, 0.3
        ):
            n += 1
        assert int(results[0].num_accepted[b]) == n


def test_tiny_epsilon_keeps_every_draft_of_positive_probability():
    target_probs = torch.tensor(
        [[[1e-6, 1 - 2e-6, 1e-6, 0.0]] * 4, [[0.5, 0.5, 0.0, 0.0]] * 4], dtype=torch.float64
    )
    draft_tokens = torch.tensor([[0, 2, 1], [1, 0, 3]])  # row 1 drafts a p = 0 token last
    result = typical_rule(
        draft_tokens,
        None,
        target_probs,
        torch.tensor([3, 3]),
        torch.zeros(2, 3, dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        epsilon=1e-300,
    )
    assert result.num_accepted.tolist() == [3, 2]


def test_every_draft_kept_when_the_target_rates_it_above_the_threshold():
    same = ConstantModel([0.02, 0.9, 0.04, 0.04])
    distance = typical_distance(same, ConstantModel([0.0, 1.0, 0.0, 0.0]), k=2)
    assert distance.expected_accepted == pytest.approx(2.0, abs=EXACT)


def call_rule(**thresholds):
    return typical_rule(
        torch.zeros(1, 1, dtype=torch.int64),
        None,
        torch.full((1, 2, 2), 0.5),
        torch.tensor([1]),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        **thresholds,
    )


@pytest.mark.parametrize("epsilon", [0.0, -0.1, 1.5, float("nan")])
def test_epsilon_outside_zero_one_is_rejected_by_name(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        call_rule(epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        typical_keep_mask(
            torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 2, 1), epsilon=epsilon
        )
    with pytest.raises(ValueError, match="epsilon"):
        typical_distance(*small_pair(), k=1, epsilon=epsilon)


@pytest.mark.parametrize("delta", [0.0, -1.0, float("nan"), float("inf")])
def test_delta_not_positive_and_finite_is_rejected_by_name(delta):
    with pytest.raises(ValueError, match="delta"):
        call_rule(delta=delta)
    with pytest.raises(ValueError, match="delta"):
        typical_distance(*small_pair(), k=1, delta=delta)


def test_epsilon_one_is_allowed():
    assert call_rule(epsilon=1.0, delta=0.5).rule_used == "typical"
