"""The token and block kernels against the loop references on the same pre-drawn uniforms:
identical tokens and num_accepted, row by row.

On CPU the kernels run in Triton's interpreter (about 0.05 s per batch row), so the cases are
small batches but many shapes: ragged draft lengths (0..k), point-mass drafts, exact zeros,
p = q, disjoint supports, four dtypes, vocabularies around the kernel's block size and at full
size (151936). Every sum and comparison is float64 on both sides; they could differ only where a
uniform falls within float64 rounding of a boundary, which random uniforms do not hit (the
boundary test checks that even there no zero-weight id comes out).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_same, on_device, require_triton

from helpers import CASE_DTYPES, random_case

require_triton()

from specsample import kernels  # noqa: E402
from specsample.rules import draw_uniforms  # noqa: E402
from specsample.rules.reference import reference_block_rule, reference_token_rule  # noqa: E402

RULES = {
    "token": (kernels.token_rule, reference_token_rule),
    "block": (kernels.block_rule, reference_block_rule),
}


def check(rule, case):
    kernel, reference = RULES[rule]
    expected = reference(*case)
    result = kernel(*on_device(case))
    assert_same(result, expected)
    assert result.rule_used == expected.rule_used
    return expected


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_reference_on_random_cases(rule, seed):
    check(rule, random_case(seed, batch=5))


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dtype", CASE_DTYPES)
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_kernel_equals_reference_for_every_dtype(rule, dtype, point_mass):
    case = random_case(100, batch=8, k=4, vocab=300, dtype=dtype, point_mass=point_mass)
    expected = check(rule, case)
    # Both outcomes occur, or the comparison proves little.
    draft_lengths = case[3]
    assert bool((expected.num_accepted < draft_lengths).any())
    assert bool((expected.num_accepted == draft_lengths).any())


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("vocab", [2, 2049, 8193])
def test_kernel_equals_reference_around_the_block_sizes(rule, vocab):
    check(rule, random_case(vocab, batch=4, k=3, vocab=vocab, dtype=torch.float32))


@pytest.mark.parametrize(
    ("rule", "dtype", "point_mass"),
    [("token", torch.float32, True), ("block", torch.bfloat16, False)],
)
def test_kernel_equals_reference_on_a_full_size_vocabulary(rule, dtype, point_mass):
    """V = 151936 (Qwen2.5): 19 blocks of the interpreter's 8192 ids, 75 of CUDA's 2048."""
    case = random_case(200, batch=2, k=3, vocab=151936, dtype=dtype, point_mass=point_mass)
    check(rule, case)


def chain_case(target_probs, draft_probs, draft_tokens, seed):
    batch, k = draft_tokens.shape
    g = torch.Generator().manual_seed(seed)
    accept, sample = draw_uniforms(batch, k, g, torch.device("cpu"))
    lengths = torch.full((batch,), k, dtype=torch.int64)
    return draft_tokens, draft_probs, target_probs, lengths, accept, sample


@pytest.mark.parametrize("rule", sorted(RULES))
def test_equal_distributions_keep_every_draft(rule):
    """p = q: every keep test passes (u < 1) and the residual is never needed."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, 4, 50, generator=g, dtype=torch.float64), dim=-1)
    tokens = torch.multinomial(probs[:, :3].reshape(-1, 50), 1, generator=g).reshape(6, 3)
    case = chain_case(probs, probs[:, :3].clone(), tokens, 2)
    expected = check(rule, case)
    assert expected.num_accepted.tolist() == [3] * 6


@pytest.mark.parametrize("rule", sorted(RULES))
def test_disjoint_supports_reject_at_once_and_recover_from_the_target(rule):
    """q lives on even ids, p on odd ids: the first draft is always rejected and the recovered
    token is drawn from p itself (the residual max(0, p - q) is p)."""
    vocab, batch, k = 40, 6, 3
    g = torch.Generator().manual_seed(3)
    even = torch.arange(vocab) % 2 == 0
    target = torch.rand(batch, k + 1, vocab, generator=g, dtype=torch.float64) * ~even
    draft = torch.rand(batch, k, vocab, generator=g, dtype=torch.float64) * even
    target, draft = target / target.sum(-1, keepdim=True), draft / draft.sum(-1, keepdim=True)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    case = chain_case(target.float(), draft.float(), tokens, 4)
    expected = check(rule, case)
    assert expected.num_accepted.tolist() == [0] * batch
    assert bool((expected.tokens[:, 0] % 2 == 1).all())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_uniforms_on_the_boundaries_never_give_a_zero_weight_id(rule):
    """sample uniforms at 0, just below 1 and exactly on the reference's cumulative sums (where
    float rounding decides between neighbours): the kernel may pick either neighbour there, but
    never an id the emitting distribution gives weight 0."""
    vocab = 24
    g = torch.Generator().manual_seed(11)
    row = torch.rand(vocab, generator=g, dtype=torch.float64)
    row[::3] = 0  # exact zeros between positive ids
    row = (row / row.sum()).float()
    cdf = torch.cumsum(row.double(), dim=0) / row.double().sum()
    uniforms = torch.cat([cdf[:-1], torch.tensor([0.0, 1.0])]).clamp(max=1 - 2**-53)
    batch = len(uniforms)
    # No drafts (draft length 0): every row's token comes from its target row 0.
    target = row.expand(batch, 2, vocab).contiguous()
    draft = row.expand(batch, 1, vocab).contiguous()
    tokens = torch.zeros(batch, 1, dtype=torch.int64)
    lengths = torch.zeros(batch, dtype=torch.int64)
    accept = torch.zeros(batch, 1, dtype=torch.float64)
    case = (tokens, draft, target, lengths, accept, uniforms)
    chosen = RULES[rule][0](*on_device(case)).tokens[:, 0].cpu()
    assert bool((row[chosen] > 0).all()), chosen.tolist()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_different_draw_changes_the_result(rule):
    """Negative control: the comparison is sensitive to the uniforms (1 - u instead of u gives a
    different outcome on some row), so equality above is not vacuous."""
    case = random_case(5, batch=8, k=4, vocab=30, dtype=torch.float32, point_mass=False)
    flipped = case[:4] + (1 - case[4], 1 - case[5])
    kernel, reference = RULES[rule]
    result = kernel(*on_device(flipped))
    expected = reference(*case)
    assert not torch.equal(result.tokens.cpu(), expected.tokens)
