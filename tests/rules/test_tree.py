"""Tree verification against its oracles on the same pre-drawn randomness, and its edge cases.

- `tree_rule` against the loop `reference_tree_rule`: identical tokens, num_accepted and path on
  random forests with ragged node_valid (float64, float32, bfloat16; vocab up to 151936).
- A single chain (m = 1) against `token_rule`: the same decisions and final token.
- `greedy_tree_rule`: the emitted tokens are the target's greedy continuation, and equal
  `tree_rule` on the one-hot distributions of temperature 0.
- Edge cases: no nodes, rows with every node invalid, duplicated siblings.
- `draw_children` in its three modes, and the tree shapes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import drop_subtrees, random_forest, random_tree_case
from specsample.drafters.children import draw_children
from specsample.rules import (
    chain_parents,
    greedy_tree_rule,
    node_depths,
    token_rule,
    tree_parents,
    tree_rule,
    verify_tree,
)
from specsample.rules.reference import reference_tree_rule
from specsample.rules.sampling import sample_from_weights

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def assert_same_result(case):
    fast = tree_rule(*case)
    reference = reference_tree_rule(*case)
    assert torch.equal(fast.tokens, reference.tokens)
    assert torch.equal(fast.num_accepted, reference.num_accepted)
    assert torch.equal(fast.path, reference.path)
    return fast


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_rule_equals_reference_on_random_forests(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 13, (1,), generator=g))
    vocab = [2, 5, 50, 1025][seed % 4]
    case = random_tree_case(seed, batch=48, n=n, vocab=vocab, dtype=dtype, point_mass=seed % 3 == 2)
    assert_same_result(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_tree_rule_equals_reference_on_a_deep_tree_exercising_every_outcome(dtype, point_mass):
    parents = tree_parents((3, 2, 2))
    case = random_tree_case(
        7, batch=256, n=len(parents), vocab=6, dtype=dtype, point_mass=point_mass, parents=parents
    )
    result = assert_same_result(case)
    accepted = result.num_accepted.tolist()
    assert {0, 1, 2, 3} <= set(accepted)  # rejections at the root, and bonus tokens after leaves
    assert bool((result.path[:, 0] > 0).any())  # a later sibling kept after a rejection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_rule_equals_reference_on_a_full_size_vocabulary(dtype):
    """V = 151936 (Qwen2.5): the residual rows and the two-level sampler at full size."""
    for seed, point_mass in [(300, False), (301, True)]:
        case = random_tree_case(
            seed,
            batch=3,
            n=5,
            vocab=151936,
            dtype=dtype,
            point_mass=point_mass,
            parents=tree_parents((3, 1)).narrow(0, 0, 5),
        )
        assert_same_result(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_a_single_chain_makes_the_same_decisions_as_token_rule(dtype, point_mass):
    k = 4
    parents = chain_parents(1, k)
    case = random_tree_case(
        11, batch=256, n=k, vocab=40, dtype=dtype, point_mass=point_mass, parents=parents
    )
    draft_tokens, _, draft_probs, target_probs, node_valid, accept, sample = case
    draft_lengths = node_valid.sum(dim=1)  # a chain's valid nodes are a prefix
    tree = tree_rule(*case)
    token = token_rule(draft_tokens, draft_probs, target_probs, draft_lengths, accept, sample)
    assert torch.equal(tree.tokens, token.tokens)
    assert torch.equal(tree.num_accepted, token.num_accepted)
    assert 0 < int(tree.num_accepted.sum()) < int(draft_lengths.sum())


# Greedy.


def greedy_tree_case(seed, batch=128, vocab=5):
    """Integer target logits (many ties); node tokens are the parent's target argmax 60% of the
    time, otherwise arbitrary (so duplicates and misses happen)."""
    g = torch.Generator().manual_seed(seed)
    parents = random_forest(10, g)
    n = len(parents)
    target_logits = torch.randint(-2, 3, (batch, n + 1, vocab), generator=g).double()
    target_tokens = target_logits.argmax(dim=-1)  # [batch, n+1]
    arbitrary = torch.randint(0, vocab, (batch, n), generator=g)
    agree = torch.rand(batch, n, generator=g) < 0.6
    draft_tokens = torch.where(agree, target_tokens[:, parents + 1], arbitrary)
    node_valid = drop_subtrees(torch.ones(batch, n, dtype=torch.bool), parents, g, 0.1)
    return draft_tokens, parents, target_logits, target_tokens, node_valid, g


def greedy_walk(draft_tokens, parents, target_tokens, node_valid):
    """The target's greedy continuation along the tree, row by row: (tokens, path)."""
    node, emitted, path = -1, [], []
    while True:
        wanted = int(target_tokens[node + 1])
        children = [
            j
            for j, parent in enumerate(parents.tolist())
            if parent == node and bool(node_valid[j]) and int(draft_tokens[j]) == wanted
        ]
        emitted.append(wanted)
        if not children:
            return emitted, path
        node = children[0]
        path.append(node)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_tree_rule_emits_the_target_greedy_continuation(seed):
    draft_tokens, parents, _, target_tokens, node_valid, _ = greedy_tree_case(seed)
    result = greedy_tree_rule(draft_tokens, parents, target_tokens, node_valid)
    for b in range(len(draft_tokens)):
        tokens, path = greedy_walk(draft_tokens[b], parents, target_tokens[b], node_valid[b])
        assert result.tokens[b, : len(tokens)].tolist() == tokens
        assert bool((result.tokens[b, len(tokens) :] == -1).all())
        assert result.path[b, : len(path)].tolist() == path
    assert int(result.num_accepted.max()) >= 2
    assert result.rule_used == "greedy"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("point_mass", [False, True], ids=["one-hot-draft", "point-mass"])
def test_greedy_tree_rule_equals_tree_rule_on_temperature_zero_distributions(seed, point_mass):
    draft_tokens, parents, _, target_tokens, node_valid, g = greedy_tree_case(seed)
    batch, n = draft_tokens.shape
    vocab = 5
    target_probs = torch.nn.functional.one_hot(target_tokens, vocab).double()
    draft_probs = None if point_mass else torch.nn.functional.one_hot(draft_tokens, vocab).double()
    expected = greedy_tree_rule(draft_tokens, parents, target_tokens, node_valid)
    uniforms = (torch.rand(batch, n, generator=g, dtype=torch.float64),)
    uniforms += (torch.rand(batch, generator=g, dtype=torch.float64),)
    actual = tree_rule(draft_tokens, parents, draft_probs, target_probs, node_valid, *uniforms)
    assert torch.equal(actual.tokens, expected.tokens)
    assert torch.equal(actual.path, expected.path)
    # Deterministic: any generator gives the same result through verify_tree.
    through_verify = verify_tree(
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        generator=torch.Generator().manual_seed(seed + 99),
        node_valid=node_valid,
    )
    assert torch.equal(through_verify.tokens, expected.tokens)


# Edge cases.


def test_a_tree_without_nodes_emits_one_token_from_the_root_distribution():
    g = torch.Generator().manual_seed(0)
    target_probs = torch.softmax(torch.randn(64, 1, 7, generator=g), dim=-1)
    uniforms = torch.rand(64, generator=g, dtype=torch.float64)
    empty = torch.zeros(64, 0, dtype=torch.int64)
    result = tree_rule(
        empty, tree_parents(()), None, target_probs, empty.bool(), empty.double(), uniforms
    )
    assert result.tokens.shape == (64, 1) and result.path.shape == (64, 0)
    assert torch.equal(result.tokens[:, 0], sample_from_weights(target_probs[:, 0], uniforms))
    assert int(result.num_accepted.abs().sum()) == 0
    through_verify = verify_tree(
        empty, tree_parents(()), None, target_probs, generator=torch.Generator().manual_seed(1)
    )
    assert through_verify.tokens.shape == (64, 1)


def test_rows_with_every_node_invalid_emit_from_the_root_and_leave_other_rows_alone():
    parents = tree_parents((2, 2))
    case = random_tree_case(5, batch=64, n=6, vocab=9, dtype=torch.float32, parents=parents)
    draft_tokens, _, draft_probs, target_probs, node_valid, accept, sample = case
    inactive = torch.arange(64) % 3 == 0
    node_valid[inactive] = False
    result = tree_rule(*case)
    root_draws = sample_from_weights(target_probs[:, 0], sample)
    assert torch.equal(result.tokens[inactive, 0], root_draws[inactive])
    assert bool((result.tokens[inactive, 1:] == -1).all())
    assert bool((result.path[inactive] == -1).all())
    # The other rows decide as they would alone.
    active = torch.nonzero(~inactive)[:, 0]
    alone = tree_rule(
        draft_tokens[active],
        parents,
        draft_probs[active],
        target_probs[active],
        node_valid[active],
        accept[active],
        sample[active],
    )
    assert torch.equal(result.tokens[active], alone.tokens)
    assert int(alone.num_accepted.max()) == 2


def test_a_duplicated_sibling_is_never_kept_after_its_twin_was_rejected():
    """Once c is rejected the residual has r(c) = 0, so a second draw of c is rejected too."""
    g = torch.Generator().manual_seed(3)
    batch = 20_000
    target_probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).expand(batch, 3, 3)
    draft_probs = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64).expand(batch, 2, 3)
    draft_tokens = torch.zeros(batch, 2, dtype=torch.int64)  # both children drew token 0
    valid = torch.ones(batch, 2, dtype=torch.bool)
    result = verify_tree(
        draft_tokens, chain_parents(2, 1), draft_probs, target_probs, generator=g, node_valid=valid
    )
    assert set(result.path[:, 0].tolist()) == {-1, 0}
    rejected = result.num_accepted == 0
    assert bool((result.tokens[rejected, 0] != 0).all())  # recovered from (0, 0.3, 0.2) / 0.5
    kept = float((~rejected).double().mean())
    assert abs(kept - 0.5 / 0.8) < 6 * (0.625 * 0.375 / batch) ** 0.5


def test_verify_tree_and_draw_children_never_touch_the_global_rng():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(8, 6, generator=g), dim=-1)
    parents = tree_parents((2, 2))
    for mode in ["iid", "without_replacement", "top"]:
        draw_children(q, 3, mode, g)
    case = random_tree_case(1, batch=8, n=6, vocab=6, dtype=torch.float32, parents=parents)
    verify_tree(case[0], parents, case[2], case[3], generator=g, node_valid=case[4])
    assert torch.equal(torch.get_rng_state(), before)


def test_verify_tree_draws_its_uniforms_in_the_documented_order():
    case = random_tree_case(2, batch=16, n=6, vocab=8, dtype=torch.float64)
    draft_tokens, parents, draft_probs, target_probs, node_valid = case[:5]
    g = torch.Generator().manual_seed(9)
    accept = torch.rand(16, 6, generator=g, dtype=torch.float64)
    sample = torch.rand(16, generator=g, dtype=torch.float64)
    expected = tree_rule(
        draft_tokens, parents, draft_probs, target_probs, node_valid, accept, sample
    )
    actual = verify_tree(
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        generator=torch.Generator().manual_seed(9),
        node_valid=node_valid,
    )
    assert torch.equal(actual.tokens, expected.tokens)
    assert torch.equal(actual.path, expected.path)


# Tree shapes.


def test_tree_parents_orders_nodes_level_by_level_with_siblings_contiguous():
    assert tree_parents((2, 2)).tolist() == [-1, -1, 0, 0, 1, 1]
    assert tree_parents((3, 1)).tolist() == [-1, -1, -1, 0, 1, 2]
    assert len(tree_parents((4, 2, 1))) == 4 + 8 + 8
    assert tree_parents(()).tolist() == []
    assert node_depths(tree_parents((4, 2, 1))).tolist() == [1] * 4 + [2] * 8 + [3] * 8


def test_chain_parents_are_independent_chains_under_the_root():
    assert chain_parents(2, 2).tolist() == [-1, -1, 0, 1]
    assert chain_parents(1, 3).tolist() == [-1, 0, 1]
    assert chain_parents(3, 0).tolist() == []
    assert chain_parents(3, 0).dtype == chain_parents(3, 2).dtype == torch.int64
    assert torch.equal(chain_parents(3, 4), tree_parents((3, 1, 1, 1)))
    assert node_depths(chain_parents(2, 3)).tolist() == [1, 1, 2, 2, 3, 3]


def test_the_result_is_as_wide_as_the_deepest_node():
    parents = torch.tensor([-1, -1, 1, 2, 0])  # depths 1, 1, 2, 3, 2
    case = random_tree_case(4, batch=4, n=5, vocab=5, dtype=torch.float32, parents=parents)
    result = tree_rule(*case)
    assert result.tokens.shape == (4, 4) and result.path.shape == (4, 3)
    assert torch.equal(result.num_emitted, result.num_accepted + 1)
    assert result.rule_used == "tree"


# draw_children.


def test_iid_children_are_independent_draws_with_the_parent_distribution():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, 9, generator=g), dim=-1)
    q[5] = 0  # no children
    tokens, child_probs, valid = draw_children(q, 3, "iid", torch.Generator().manual_seed(1))
    uniforms = torch.rand(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for j in range(3):
        expected = sample_from_weights(q[:5], uniforms[:5, j])
        assert torch.equal(tokens[:5, j], expected)
    assert torch.equal(child_probs[:5], q[:5, None].expand(5, 3, 9))
    assert valid[:5].all() and not valid[5].any()
    assert tokens[5].tolist() == [0, 0, 0] and float(child_probs[5].abs().sum()) == 0


def test_children_without_replacement_are_distinct_with_renormalised_distributions():
    g = torch.Generator().manual_seed(2)
    q = torch.softmax(torch.randn(200, 6, generator=g, dtype=torch.float64), dim=-1)
    q[0] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # support 2 < m
    tokens, child_probs, valid = draw_children(q, 4, "without_replacement", g)
    assert valid[0].tolist() == [True, True, False, False]
    assert sorted(tokens[0, :2].tolist()) == [0, 2]
    assert valid[1:].all()
    for b in range(200):
        chosen = tokens[b, valid[b]].tolist()
        assert len(set(chosen)) == len(chosen)
        remaining = q[b].clone()
        for j, token in enumerate(chosen):
            assert torch.allclose(child_probs[b, j], remaining / remaining.sum(), atol=1e-15)
            assert float(child_probs[b, j, token]) > 0
            remaining[token] = 0
    assert float(child_probs[0, 2:].abs().sum()) == 0


def test_top_children_are_the_most_probable_tokens_lowest_id_first_on_ties():
    q = torch.tensor([[0.1, 0.3, 0.1, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0] * 6])
    tokens, child_probs, valid = draw_children(q, 3, "top", torch.Generator())
    assert child_probs is None
    assert tokens[0].tolist() == [1, 3, 4] and valid[0].all()
    assert tokens[1].tolist() == [4, 0, 0] and valid[1].tolist() == [True, False, False]
    assert not valid[2].any()
    wide, _, wide_valid = draw_children(q[:1], 8, "top", torch.Generator())
    assert (
        wide[0, :5].tolist() == [1, 3, 4, 0, 2]
        and wide_valid[0].tolist() == [True] * 5 + [False] * 3
    )


@pytest.mark.parametrize("mode", ["iid", "without_replacement"])
def test_children_are_reproducible_from_the_generator_seed(mode):
    q = torch.softmax(torch.randn(32, 50, generator=torch.Generator().manual_seed(3)), dim=-1)
    first = draw_children(q, 4, mode, torch.Generator().manual_seed(4))
    second = draw_children(q, 4, mode, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


def test_invalid_nodes_with_any_id_work_at_a_vocabulary_of_one():
    """Ids at invalid nodes are replaced by a valid index before anything is gathered: with one
    token in the vocabulary only id 0 is one."""
    parents = tree_parents((2, 1))
    draft_tokens = torch.tensor([[0, 7, 0, -3]])
    node_valid = torch.tensor([[True, False, True, False]])
    ones = torch.ones(1, len(parents) + 1, 1, dtype=torch.float64)
    result = verify_tree(
        draft_tokens,
        parents,
        ones[:, 1:],
        ones,
        generator=torch.Generator().manual_seed(0),
        node_valid=node_valid,
    )
    assert result.tokens.tolist() == [[0, 0, 0]]  # nodes 0 and 2 kept, then the bonus token
    assert result.path.tolist() == [[0, 2]]


@pytest.mark.parametrize("implementation", [tree_rule, reference_tree_rule], ids=["fast", "ref"])
def test_a_rejection_that_leaves_no_residual_keeps_the_residual_before_it(implementation):
    """q is larger than p at the first child's token (by a rounding-sized amount) and equal
    elsewhere: the rejection leaves max(0, p - q) without mass, so r stays p; the second child
    (token 1) is then tested against p, and the final token comes from p too."""
    target = torch.tensor([[[0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]])
    draft = torch.tensor([[[0.25 + 1e-9, 0.25, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    args = (torch.tensor([[0, 1]]), torch.tensor([-1, -1]), draft.double(), target.double())
    valid = torch.ones(1, 2, dtype=torch.bool)
    # u_0 rejects child 0 (u q >= p); child 1 is kept iff u_1 < r(1) = 1/4: 0.3 rejects it.
    result = implementation(*args, valid, torch.tensor([[1 - 2**-40, 0.3]]), torch.tensor([0.6]))
    assert result.num_accepted.tolist() == [0]
    # After both rejections: max(0, p - one-hot(1)) = (1/4, 0, 1/2, 0): u = 0.6 picks token 2.
    assert result.tokens[0, 0].item() == 2
    kept = implementation(*args, valid, torch.tensor([[1 - 2**-40, 0.2]]), torch.tensor([0.6]))
    assert kept.path.tolist() == [[1]] and kept.tokens[0].tolist() == [1, 3]
