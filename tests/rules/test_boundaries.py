"""The keep tests at their boundaries, on pre-drawn uniforms passed straight to the rule functions.

Every keep test is strict: a draft is kept when u < h, where h is its keep probability (the token
rule's min(1, p/q), written u q < p; the block rule's pass threshold h_i; the tree rule's
u q r-mass < r-weight). For u uniform on [0, 1) that has probability exactly h, and:

- u = 0 never keeps a token the target gives probability 0 (h = 0), and always keeps one it gives
  any positive probability;
- u exactly at the threshold is a rejection, the next double below it a keep.

Probabilities are powers of two so that every threshold is exact in float64 (asserted where the
fast rule computes it through logarithms). Each case runs the fast rule and its loop reference.
The final token is drawn with u = 0, so it is the lowest id of positive weight in the distribution
it is drawn from: that pins down which distribution was used.
"""

from __future__ import annotations

import math

import pytest
import torch

from specsample.rules.block import block_rule, cumulative_log_acceptance, pass_thresholds
from specsample.rules.reference import (
    reference_block_rule,
    reference_token_rule,
    reference_tree_rule,
)
from specsample.rules.token import token_rule
from specsample.rules.tree import tree_rule

BELOW = math.nextafter  # BELOW(h, 0): the largest double below h


def as_tree(tree_implementation):
    """A chain rule with the token rule's contract, run by a tree rule on a one-node-per-level
    chain (which makes the token rule's decisions)."""

    def rule(draft_tokens, draft_probs, target_probs, draft_lengths, accept, sample):
        batch, k = draft_tokens.shape
        parents = torch.arange(-1, k - 1, dtype=torch.int64)
        node_valid = torch.arange(k)[None, :] < draft_lengths[:, None]
        return tree_implementation(
            draft_tokens, parents, draft_probs, target_probs, node_valid, accept, sample
        )

    return rule


CHAIN_RULES = {
    "token": token_rule,
    "token-reference": reference_token_rule,
    "block": block_rule,
    "block-reference": reference_block_rule,
    "tree": as_tree(tree_rule),
    "tree-reference": as_tree(reference_tree_rule),
}


def run(rule, drafts, draft_rows, target_rows, accept):
    """One row: drafts [k], draft_rows [k, vocab] or None, target_rows [k+1, vocab], accept [k];
    the final token is drawn with u = 0. Returns (emitted tokens, num_accepted)."""
    k = len(drafts)
    result = rule(
        torch.tensor([drafts], dtype=torch.int64),
        None if draft_rows is None else torch.tensor([draft_rows], dtype=torch.float64),
        torch.tensor([target_rows], dtype=torch.float64),
        torch.tensor([k]),
        torch.tensor([accept], dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
    )
    num_accepted = int(result.num_accepted[0])
    return result.tokens[0, : num_accepted + 1].tolist(), num_accepted


# Token 1 is ruled out by the target at every position; the draft gives it 1/2.
RULED_OUT_TARGET = [0.5, 0.0, 0.25, 0.25]
RULED_OUT_DRAFT = [0.25, 0.5, 0.125, 0.125]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
@pytest.mark.parametrize("name", sorted(CHAIN_RULES))
def test_u_zero_never_keeps_a_token_the_target_rules_out(name, point_mass, k):
    tokens, num_accepted = run(
        CHAIN_RULES[name],
        [1] * k,
        None if point_mass else [RULED_OUT_DRAFT] * k,
        [RULED_OUT_TARGET] * (k + 1),
        [0.0] * k,
    )
    assert num_accepted == 0
    # Recovered from max(0, p - q) = (1/4, 0, 1/8, 1/8), or from p without token 1 (point mass).
    assert tokens == [0]


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
@pytest.mark.parametrize("name", sorted(CHAIN_RULES))
def test_u_zero_keeps_a_token_of_tiny_positive_probability(name, point_mass):
    tiny = 2.0**-40
    target = [0.5 - tiny, tiny, 0.25, 0.25]
    tokens, num_accepted = run(
        CHAIN_RULES[name],
        [1],
        None if point_mass else [RULED_OUT_DRAFT],
        [target, [0.0, 0.0, 1.0, 0.0]],
        [0.0],
    )
    assert (tokens, num_accepted) == ([1, 2], 1)  # the bonus token comes from the second row


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
@pytest.mark.parametrize("name", sorted(CHAIN_RULES))
def test_u_exactly_at_the_keep_probability_rejects_and_just_below_keeps(name, point_mass):
    # Keep probability 1/2: p(x) = 1/4 against q(x) = 1/2, or p(x) = 1/2 for a point mass.
    target = [0.5, 0.5, 0.0, 0.0] if point_mass else [0.5, 0.25, 0.25, 0.0]
    draft = None if point_mass else [[0.25, 0.5, 0.125, 0.125]]
    bonus = [0.0, 0.0, 0.0, 1.0]
    rule = CHAIN_RULES[name]
    if name == "block" and not point_mass:
        log_kept = cumulative_log_acceptance(
            torch.tensor([[1]]),
            torch.tensor([draft], dtype=torch.float64),
            torch.tensor([[target, bonus]], dtype=torch.float64),
        )
        assert log_kept.exp().tolist() == [[0.5]]  # the threshold the fast rule compares with
    rejected = run(rule, [1], draft, [target, bonus], [0.5])
    # Recovered from max(0, p - q) = (1/4, 0, 1/8, 0), or from p without token 1.
    assert rejected == ([0], 0)
    assert run(rule, [1], draft, [target, bonus], [BELOW(0.5, 0.0)]) == ([1, 3], 1)


# Block verification, k = 2: P_1 = 1/2, R_1 = sum max(0, P_1 p_2 - q_2) = 1/2, so the pass
# threshold of position 1 is h_1 = R_1 / (R_1 + 1 - P_1) = 1/2; token 1 has p_2 = 0, so P_2 = 0
# and the threshold of position 2 is h_2 = 0.
BLOCK_DRAFTS = [1, 1]
BLOCK_DRAFT_ROWS = [[0.25, 0.5, 0.125, 0.125], [0.0, 0.5, 0.5, 0.0]]
BLOCK_TARGET_ROWS = [[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_block_thresholds_of_the_boundary_case_are_exact():
    draft_tokens = torch.tensor([BLOCK_DRAFTS])
    draft_probs = torch.tensor([BLOCK_DRAFT_ROWS], dtype=torch.float64)
    target_probs = torch.tensor([BLOCK_TARGET_ROWS], dtype=torch.float64)
    log_kept = cumulative_log_acceptance(draft_tokens, draft_probs, target_probs)
    thresholds = pass_thresholds(log_kept, draft_probs, target_probs, torch.tensor([2]))
    assert thresholds.tolist() == [[0.5, 0.0]]


@pytest.mark.parametrize("name", ["block", "block-reference"])
@pytest.mark.parametrize("last", [0.0, 0.5], ids=["u2=0", "u2=half"])
def test_block_pass_threshold_is_strict_before_the_last_position(name, last):
    rule = CHAIN_RULES[name]
    at = run(rule, BLOCK_DRAFTS, BLOCK_DRAFT_ROWS, BLOCK_TARGET_ROWS, [0.5, last])
    # No pass (h_2 = 0 is never passed, not even by u = 0): recovered from max(0, p_1 - q_1).
    assert at == ([0], 0)
    below = run(rule, BLOCK_DRAFTS, BLOCK_DRAFT_ROWS, BLOCK_TARGET_ROWS, [BELOW(0.5, 0.0), last])
    # tau = 1: recovered from max(0, P_1 p_2 - q_2) = (1/2, 0, 0, 0).
    assert below == ([1, 0], 1)


@pytest.mark.parametrize("implementation", [tree_rule, reference_tree_rule], ids=["fast", "ref"])
@pytest.mark.parametrize(
    ("second_uniform", "expected"),
    [(0.5, ([0], 0)), (BELOW(0.5, 0.0), ([2, 3], 1)), (0.0, ([2, 3], 1))],
    ids=["at", "below", "zero"],
)
def test_tree_second_sibling_keep_test_is_strict_against_the_residual(
    implementation, second_uniform, expected
):
    # Child 0 (token 1, p = 0) is always rejected: r = (1/4, 0, 1/8, 1/8) of mass 1/2, that is
    # (1/2, 0, 1/4, 1/4) normalised. Child 1 (token 2, q = 1/2) is kept iff u * 1/2 < 1/4.
    target = [[0.5, 0.0, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    draft = [[0.25, 0.5, 0.125, 0.125], [0.25, 0.0, 0.5, 0.25]]
    result = implementation(
        torch.tensor([[1, 2]]),
        torch.tensor([-1, -1]),
        torch.tensor([draft], dtype=torch.float64),
        torch.tensor([target], dtype=torch.float64),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[0.0, second_uniform]], dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
    )
    num_accepted = int(result.num_accepted[0])
    # After both rejections: max(0, r - q_1) is (1, 0, 0, 0) normalised: token 0.
    assert (result.tokens[0, : num_accepted + 1].tolist(), num_accepted) == expected
