"""The tree kernel against the loop reference on the same pre-drawn uniforms: identical tokens,
num_accepted and path, row by row (random forests with ragged node_valid, point-mass nodes, four
dtypes, full-size vocabulary), and a single chain against the token kernel."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_same, on_device, require_triton

from helpers import CASE_DTYPES, random_tree_case

require_triton()

from specsample import kernels  # noqa: E402
from specsample.rules import chain_parents, tree_parents  # noqa: E402
from specsample.rules.reference import reference_tree_rule  # noqa: E402

FIELDS = ("tokens", "num_accepted", "path")


def check(case):
    expected = reference_tree_rule(*case)
    assert_same(kernels.tree_rule(*on_device(case)), expected, FIELDS)
    return expected


@pytest.mark.parametrize("seed", range(8))
def test_tree_kernel_equals_reference_on_random_forests(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 13, (1,), generator=g))
    vocab = [2, 5, 50, 1025][seed % 4]
    dtype = CASE_DTYPES[seed % len(CASE_DTYPES)]
    check(random_tree_case(seed, batch=5, n=n, vocab=vocab, dtype=dtype, point_mass=seed % 3 == 2))


@pytest.mark.parametrize(
    ("dtype", "point_mass"), [(torch.float32, False), (torch.bfloat16, True)], ids=str
)
def test_tree_kernel_equals_reference_on_a_tree_exercising_every_outcome(dtype, point_mass):
    """Three children at the root: a row that rejects two of them tests the third against the
    residual the kernel wrote to its workspace."""
    parents = tree_parents((3, 2, 2))
    case = random_tree_case(
        7, batch=20, n=len(parents), vocab=6, dtype=dtype, point_mass=point_mass, parents=parents
    )
    expected = check(case)
    assert {0, 1, 2, 3} <= set(expected.num_accepted.tolist())
    assert bool((expected.path[:, 0] == 2).any())  # the third root child, after two rejections


def test_tree_kernel_equals_reference_on_a_full_size_vocabulary():
    parents = tree_parents((3, 1)).narrow(0, 0, 5)
    case = random_tree_case(300, batch=2, n=5, vocab=151936, dtype=torch.bfloat16, parents=parents)
    check(case)


def test_a_chain_makes_the_same_decisions_as_the_token_kernel():
    k = 4
    case = random_tree_case(
        11, batch=12, n=k, vocab=40, dtype=torch.float32, parents=chain_parents(1, k)
    )
    draft_tokens, _, draft_probs, target_probs, node_valid, accept, sample = on_device(case)
    draft_lengths = node_valid.sum(dim=1)  # a chain's valid nodes are a prefix
    tree = kernels.tree_rule(*on_device(case))
    token = kernels.token_rule(
        draft_tokens, draft_probs, target_probs, draft_lengths, accept, sample
    )
    assert torch.equal(tree.tokens, token.tokens)
    assert torch.equal(tree.num_accepted, token.num_accepted)
    assert 0 < int(tree.num_accepted.sum()) < int(draft_lengths.sum())


def test_a_tree_without_nodes_emits_one_token_from_the_root():
    case = random_tree_case(
        3, batch=4, n=0, vocab=9, dtype=torch.float32, parents=torch.zeros(0, dtype=torch.int64)
    )
    expected = check(case)
    assert expected.tokens.shape == (4, 1)


def test_a_different_draw_changes_the_result():
    """Negative control: 1 - u instead of u changes some row, so equality is not vacuous."""
    parents = tree_parents((2, 2))
    case = random_tree_case(
        5, batch=8, n=len(parents), vocab=6, dtype=torch.float32, parents=parents
    )
    flipped = case[:5] + (1 - case[5], 1 - case[6])
    result = kernels.tree_rule(*on_device(flipped))
    assert not torch.equal(result.tokens.cpu(), reference_tree_rule(*case).tokens)


def test_the_device_is_the_one_the_tests_claim():
    assert kernels.available()
    result = kernels.tree_rule(
        *on_device(random_tree_case(1, batch=1, n=2, vocab=3, dtype=torch.float32))
    )
    assert result.tokens.device.type == DEVICE.type
