"""Every fast path against its slow oracle on the same pre-drawn randomness.

- The vectorised `token_rule` against the loop `reference_token_rule`, on uniforms from
  `draw_uniforms`: identical tokens and num_accepted on many random cases (batch up to 64, k 0..5,
  vocab 2..3000 and 151936, ragged draft lengths, point-mass drafts, exact zeros, four dtypes).
- The two-level `sample_from_weights` against `reference_sample` around the block size.
- bfloat16 inputs against float32 inputs holding the same values, through `verify`.
- `greedy_rule` against the token rule on the one-hot distributions of temperature 0.
"""

from __future__ import annotations

import pytest
import torch

from helpers import random_case
from specsample import SamplingConfig, logits_to_probs, verify
from specsample.rules import draw_uniforms, greedy_rule, sample_from_weights, token_rule
from specsample.rules.reference import reference_sample, reference_token_rule
from specsample.rules.sampling import BLOCK

CPU = torch.device("cpu")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def assert_same_result(case):
    fast = token_rule(*case)
    reference = reference_token_rule(*case)
    assert torch.equal(fast.num_accepted, reference.num_accepted)
    assert torch.equal(fast.tokens, reference.tokens)
    return fast


@pytest.mark.parametrize("seed", range(48))
def test_token_rule_equals_reference_on_the_same_uniforms(seed):
    assert_same_result(random_case(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_token_rule_equals_reference_for_every_dtype(dtype, point_mass):
    case = random_case(100, batch=64, k=4, vocab=300, dtype=dtype, point_mass=point_mass)
    result = assert_same_result(case)
    # The case must exercise both outcomes, or the comparison proves little.
    draft_lengths = case[3]
    assert bool((result.num_accepted < draft_lengths).any())
    assert bool((result.num_accepted == draft_lengths).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_rule_equals_reference_on_a_full_size_vocabulary(dtype):
    """V = 151936 (Qwen2.5) runs the two-level sampler over 149 blocks."""
    for seed, point_mass in [(200, False), (201, True)]:
        case = random_case(seed, batch=2, k=3, vocab=151936, dtype=dtype, point_mass=point_mass)
        assert_same_result(case)


def weights_with_zeros(vocab, rows, generator, dtype):
    """[rows, vocab] non-negative weights, unnormalised, with about half exact zeros; row 0 has a
    single positive id at the end, row 1 a single one at the start."""
    weights = torch.rand(rows, vocab, generator=generator, dtype=torch.float64) * 3
    weights[torch.rand(rows, vocab, generator=generator) < 0.5] = 0
    weights[0] = 0
    weights[0, -1] = 0.25
    weights[1] = 0
    weights[1, 0] = 2.0
    weights[2, : vocab // 2] = 0  # a long run of zero blocks
    weights[3, BLOCK - 1 :: BLOCK] = 0  # zeros on every block boundary
    weights[3, 0] = 1.0
    return weights.to(dtype)


@pytest.mark.parametrize("vocab", [1023, 1024, 1025, 2048, 5000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_from_weights_equals_reference_around_the_block_size(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    rows = 32
    weights = weights_with_zeros(vocab, rows, g, dtype)
    uniforms = torch.rand(rows, generator=g, dtype=torch.float64)
    uniforms[:4] = torch.tensor([0.0, 1 - 2**-53, 0.5, 1 - 2**-53], dtype=torch.float64)
    fast = sample_from_weights(weights, uniforms)
    expected = [reference_sample(weights[b], float(uniforms[b])) for b in range(rows)]
    assert fast.tolist() == expected


@pytest.mark.parametrize("vocab", [1023, 1024, 1025, 2048, 5000])
def test_sample_from_weights_never_returns_a_zero_weight_id(vocab):
    """Uniforms at 0, just below 1 and exactly on the cumulative boundaries (where rounding
    could land on a zero-weight id) on top of random ones."""
    g = torch.Generator().manual_seed(7 * vocab)
    weights = weights_with_zeros(vocab, 8, g, torch.float64)
    cdf = torch.cumsum(weights, dim=-1)
    positive = torch.nonzero(weights[4] > 0)[:, 0]
    boundaries = cdf[4, positive[:: max(1, len(positive) // 64)]] / cdf[4, -1]
    boundary_uniforms = torch.cat([boundaries, torch.tensor([0.0, 1 - 2**-53])]).clamp(
        max=1 - 2**-53
    )
    uniforms = torch.cat([boundary_uniforms, torch.rand(256, generator=g, dtype=torch.float64)])
    rows = weights.shape[0]
    chosen = sample_from_weights(
        weights.repeat_interleave(len(uniforms), dim=0), uniforms.repeat(rows)
    )
    row_of = torch.arange(rows).repeat_interleave(len(uniforms))
    assert bool((weights[row_of, chosen] > 0).all())
    single = sample_from_weights(weights[:2], torch.tensor([1 - 2**-53, 1 - 2**-53]))
    assert single.tolist() == [vocab - 1, 0]


@pytest.mark.parametrize("vocab", [50, 3000, 151936])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_verify_on_bfloat16_equals_float32_holding_the_same_values(vocab, point_mass):
    batch = 2 if vocab > 10_000 else 64
    case = random_case(300 + vocab, batch=batch, k=3, vocab=vocab, dtype=torch.bfloat16)
    draft_tokens, draft_probs, target_probs, draft_lengths = case[:4]
    if point_mass:
        draft_probs = None
    results = []
    for dtype in [torch.bfloat16, torch.float32]:
        results.append(
            verify(
                draft_tokens,
                None if draft_probs is None else draft_probs.to(dtype),
                target_probs.to(dtype),
                generator=torch.Generator().manual_seed(5),
                draft_lengths=draft_lengths,
                # The bf16-rounded rows are off 1 by up to ~4e-3: inside bfloat16's tolerance,
                # outside float32's, so only the bfloat16 call validates the values.
                validate=dtype == torch.bfloat16,
            )
        )
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert torch.equal(results[0].num_accepted, results[1].num_accepted)


def greedy_case(seed, batch=64, k=4, vocab=7):
    """Integer logits (many ties) whose drafts agree with the target's argmax at most positions."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randint(-3, 4, (batch, k + 1, vocab), generator=g).double()
    target_logits[0, 0, 2] = float("-inf")
    draft_logits = torch.randint(-3, 4, (batch, k, vocab), generator=g).double()
    agree = torch.rand(batch, k, 1, generator=g) < 0.8
    draft_logits = torch.where(agree, target_logits[:, :k], draft_logits)
    draft_lengths = torch.randint(0, k + 1, (batch,), generator=g)
    return target_logits, draft_logits, draft_lengths, g


@pytest.mark.parametrize("point_mass", [False, True], ids=["one-hot-draft", "point-mass"])
def test_greedy_rule_equals_token_rule_on_temperature_zero_distributions(point_mass):
    greedy = SamplingConfig(temperature=0)
    for seed in range(4):
        target_logits, draft_logits, draft_lengths, g = greedy_case(seed)
        target_probs = logits_to_probs(target_logits, greedy)
        draft_probs = logits_to_probs(draft_logits, greedy)
        draft_tokens = draft_probs.argmax(dim=-1)
        batch, k = draft_tokens.shape
        expected = greedy_rule(draft_tokens, target_logits.argmax(dim=-1), draft_lengths)
        uniforms = draw_uniforms(batch, k, g, CPU)
        probs = None if point_mass else draft_probs
        actual = token_rule(draft_tokens, probs, target_probs, draft_lengths, *uniforms)
        assert torch.equal(actual.tokens, expected.tokens)
        assert torch.equal(actual.num_accepted, expected.num_accepted)
        assert expected.rule_used == "greedy"
        # Deterministic: any generator gives the same result through `verify`.
        through_verify = verify(
            draft_tokens,
            probs,
            target_probs,
            generator=torch.Generator().manual_seed(seed + 99),
            draft_lengths=draft_lengths,
        )
        assert torch.equal(through_verify.tokens, expected.tokens)
        assert 0 < int(expected.num_accepted.sum()) < int(draft_lengths.sum())
