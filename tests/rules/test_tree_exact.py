"""Proof by enumeration: for every token assignment of a draft tree (children drawn i.i.d.,
without replacement or as the top-m tokens) and every piece of the randomness, tree verification
emits tokens whose distribution equals the target at every prefix, to 1e-12 in float64.
Negative controls (deterministic children verified as if sampled; the final token drawn from p
instead of the residual) fail the same check by a wide margin. The expected number of accepted
tokens of a tree is computed exactly and compared with a single chain of the same depth.
"""

from __future__ import annotations

import pytest
import torch

from helpers import ConstantModel, TablePrefixModel
from specsample.analysis.exact import (
    exact_tree_rule_distribution,
    expected_accepted,
    prefix_errors,
)
from specsample.rules import chain_parents, tree_parents, tree_rule
from specsample.rules.reference import reference_tree_rule
from specsample.rules.result import assemble_tokens
from specsample.rules.sampling import sample_from_weights
from specsample.rules.tree import TreeResult

EXACT = 1e-12
MODES = ["iid", "without_replacement", "top"]
TREES = {  # name: (parents, vocab): 4 nodes enumerate over vocab 4, 6 nodes over vocab 3
    "2-chains-depth-2": (chain_parents(2, 2), 4),
    "branching-2-2": (tree_parents((2, 2)), 3),
    "branching-3-1": (tree_parents((3, 1)), 3),
    "branching-2-1-1": (tree_parents((2, 1, 1)), 3),
}


def assert_exact(distribution, target):
    worst, mass_error = prefix_errors(distribution, target)
    assert mass_error < EXACT
    assert worst < EXACT
    return worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tree", sorted(TREES))
def test_tree_rule_output_equals_target_at_every_prefix(tree, mode):
    """The target has an exact zero in every row, so some drafted tokens have p(x) = 0."""
    parents, vocab = TREES[tree]
    target = TablePrefixModel(vocab, seed=1, sharpness=2.0, zeros=1)
    draft = TablePrefixModel(vocab, seed=2, sharpness=2.0)
    distribution = exact_tree_rule_distribution(
        tree_rule, target, draft, parents=parents, mode=mode
    )
    assert_exact(distribution, target)


@pytest.mark.parametrize("mode", MODES)
def test_reference_tree_rule_output_equals_target_at_every_prefix(mode):
    target = TablePrefixModel(4, seed=3, sharpness=1.5, zeros=1)
    draft = TablePrefixModel(4, seed=4, sharpness=1.5)
    distribution = exact_tree_rule_distribution(
        reference_tree_rule, target, draft, parents=chain_parents(2, 2), mode=mode
    )
    assert_exact(distribution, target)


@pytest.mark.parametrize("mode", MODES)
def test_tree_rule_is_exact_when_target_and_draft_disagree_strongly(mode):
    """Sharp tables with different seeds: the drafter's favourite is rarely the target's."""
    target = TablePrefixModel(4, seed=5, sharpness=5.0, zeros=1)
    draft = TablePrefixModel(4, seed=6, sharpness=5.0)
    distribution = exact_tree_rule_distribution(
        tree_rule, target, draft, parents=tree_parents((2, 1)), mode=mode
    )
    assert_exact(distribution, target)


@pytest.mark.parametrize("mode", MODES)
def test_tree_rule_is_exact_when_every_drafted_token_has_target_probability_zero(mode):
    target = ConstantModel([0.0, 0.0, 0.4, 0.6])
    draft = ConstantModel([0.7, 0.3, 0.0, 0.0])
    distribution = exact_tree_rule_distribution(
        tree_rule, target, draft, parents=tree_parents((2, 1)), mode=mode
    )
    assert all(len(sequence) == 1 for sequence in distribution)  # nothing is ever accepted
    assert_exact(distribution, target)


def test_point_mass_children_from_a_lookup_are_exact():
    """Children fixed by a lookup table (the ranking of a constant "draft", not a model of the
    text), verified as point masses (draft_probs=None); token 3 has target probability 0."""
    target = TablePrefixModel(4, seed=7, sharpness=1.0)
    lookup = ConstantModel([0.1, 0.2, 0.3, 0.4])
    for parents in [tree_parents((3, 2)), chain_parents(2, 3)]:

        def target_with_zero(prefix):
            p = target(prefix).clone()
            p[3] = 0.0
            return p / p.sum()

        distribution = exact_tree_rule_distribution(
            tree_rule, target_with_zero, lookup, parents=parents, mode="top"
        )
        assert_exact(distribution, target_with_zero)


def test_duplicated_iid_siblings_are_exact():
    """A draft concentrated on one token makes i.i.d. siblings mostly duplicates."""
    target = TablePrefixModel(3, seed=8, sharpness=1.0)
    draft = ConstantModel([0.9, 0.05, 0.05])
    distribution = exact_tree_rule_distribution(
        tree_rule, target, draft, parents=tree_parents((3, 1)), mode="iid"
    )
    assert_exact(distribution, target)


def test_a_tree_without_nodes_emits_one_token_from_the_target():
    target = TablePrefixModel(3, seed=9)
    distribution = exact_tree_rule_distribution(
        tree_rule, target, target, parents=tree_parents(()), mode="iid"
    )
    assert all(len(sequence) == 1 for sequence in distribution)
    assert_exact(distribution, target)


# The expected number of accepted tokens, exactly.


def halfway(target, other):
    """A drafter between the target and an unrelated table: q = (p + other) / 2."""
    return lambda prefix: 0.5 * target(prefix) + 0.5 * other(prefix)


@pytest.mark.parametrize("mode", MODES)
def test_trees_accept_more_tokens_than_one_chain_of_the_same_depth(mode):
    """One chain of depth 2 <= two chains of depth 2 <= branching (2, 2), strictly here."""
    target = TablePrefixModel(3, seed=10, sharpness=1.5)
    draft = halfway(target, TablePrefixModel(3, seed=11, sharpness=1.5))
    accepted = []
    for parents in [chain_parents(1, 2), chain_parents(2, 2), tree_parents((2, 2))]:
        distribution = exact_tree_rule_distribution(
            tree_rule, target, draft, parents=parents, mode=mode
        )
        assert_exact(distribution, target)
        accepted.append(expected_accepted(distribution))
    one_chain, two_chains, tree = accepted
    # iid: 1.076 < 1.497 < 1.564; without replacement: 1.076 < 1.773 < 1.874;
    # top: 1.501 < 1.507 < 1.651.
    assert two_chains > one_chain + 1e-3
    assert tree > two_chains + 1e-3


def test_a_tree_accepts_as_many_tokens_as_a_chain_when_the_draft_is_the_target():
    """Equality case: the first child is always accepted, so the extra ones never matter."""
    same = TablePrefixModel(3, seed=12, sharpness=1.5)
    for parents in [chain_parents(1, 2), tree_parents((2, 2))]:
        distribution = exact_tree_rule_distribution(
            tree_rule, same, same, parents=parents, mode="iid"
        )
        assert expected_accepted(distribution) == pytest.approx(2.0, abs=EXACT)


def test_worked_example_on_two_tokens():
    """P = (1/4, 3/4), Q = (1/2, 1/2), two children of the root. One draft is kept with
    probability 3/4. Two i.i.d. drafts: the first is rejected only if it is token 0 (probability
    1/2 * 1/2); the residual is then (0, 1) and the second draft is kept iff it is token 1: 3/4 +
    1/4 * 1/2 = 7/8. Without replacement the second draft is token 1 for sure: always kept. The
    first token is (1/4, 3/4) in every case."""
    target, draft = ConstantModel([0.25, 0.75]), ConstantModel([0.5, 0.5])
    expected = {(1, "iid"): 0.75, (2, "iid"): 0.875, (2, "without_replacement"): 1.0}
    for (m, mode), kept in expected.items():
        distribution = exact_tree_rule_distribution(
            tree_rule, target, draft, parents=chain_parents(m, 1), mode=mode
        )
        assert expected_accepted(distribution) == pytest.approx(kept, abs=EXACT)
        first = torch.zeros(2, dtype=torch.float64)
        for sequence, weight in distribution.items():
            first[sequence[0]] += weight
        assert torch.allclose(first, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=EXACT)


# Negative controls.


def recover_from_target_rule(
    draft_tokens, parents, draft_probs, target_probs, node_valid, accept_uniforms, sample_uniforms
):
    """Negative control: the right walk, but the final token is drawn from p at the final node,
    not from the residual. (The enumeration cuts the final uniform at p's pieces too, so this
    rule's distribution is enumerated exactly.)"""
    result = tree_rule(
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        node_valid,
        accept_uniforms,
        sample_uniforms,
    )
    rows = torch.arange(draft_tokens.shape[0])
    last = result.path.gather(1, (result.num_accepted - 1).clamp(min=0)[:, None])[:, 0]
    final_node = torch.where(result.num_accepted > 0, last, -1)
    final = sample_from_weights(target_probs[rows, final_node + 1], sample_uniforms)
    path_tokens = draft_tokens.gather(1, result.path.clamp(min=0))
    tokens = assemble_tokens(path_tokens, result.num_accepted, final)
    return TreeResult(tokens, result.num_accepted, result.path)


@pytest.mark.parametrize("mode", ["top", "without_replacement"])
def test_children_verified_with_the_wrong_draft_distribution_fail_the_enumeration(mode):
    """Top-m children verified as if drawn from the softmax q; children drawn without
    replacement verified as if drawn from q (not renormalised)."""
    target = TablePrefixModel(4, seed=1, sharpness=2.0, zeros=1)
    draft = TablePrefixModel(4, seed=2, sharpness=2.0)
    distribution = exact_tree_rule_distribution(
        tree_rule,
        target,
        draft,
        parents=chain_parents(2, 2),
        mode=mode,
        passed_probs="parent_draft",
    )
    worst, mass_error = prefix_errors(distribution, target)
    assert mass_error < EXACT  # still a distribution, just not the target's
    assert worst > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_recovering_from_the_target_instead_of_the_residual_fails_the_enumeration(mode):
    target = TablePrefixModel(4, seed=1, sharpness=2.0, zeros=1)
    draft = TablePrefixModel(4, seed=2, sharpness=2.0)
    distribution = exact_tree_rule_distribution(
        recover_from_target_rule, target, draft, parents=chain_parents(2, 2), mode=mode
    )
    worst, _ = prefix_errors(distribution, target)
    assert worst > 1e-2


def test_a_rule_reading_the_uniform_of_an_unreached_node_is_reported():
    def reads_every_uniform(*args):
        result = tree_rule(*args)
        accept_uniforms = args[5]
        flipped = result.tokens.clone()
        flipped[:, 0] = torch.where(accept_uniforms[:, -1] == 0, flipped[:, 0], 0)
        return TreeResult(flipped, result.num_accepted, result.path)

    target = TablePrefixModel(3, seed=1)
    with pytest.raises(AssertionError, match="does not reach"):
        exact_tree_rule_distribution(
            reads_every_uniform, target, target, parents=chain_parents(2, 1), mode="iid"
        )
