"""Edge cases of `specsample.verify` (docs/exactness.md) and of its two primitives,
`acceptance_probability` and `residual`.

Frequency checks draw ROWS rows of one batch with a fixed seed and allow 6 standard deviations per
token (false-failure rate about 2e-9 per token for a correct rule and a random seed).
"""

from __future__ import annotations

import math

import pytest
import torch

from specsample import SamplingConfig, acceptance_rate, logits_to_probs, verify
from specsample.rules import PAD, acceptance_probability, draw_uniforms, residual, token_rule
from specsample.rules.reference import reference_token_rule

ROWS = 100_000
SIGMAS = 6


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def repeat(probs, rows=ROWS):
    """probs: n distributions [vocab] -> [rows, n, vocab] (float64)."""
    stacked = torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in probs])
    return stacked.expand(rows, -1, -1)


def draws(probs, rows, seed):
    """rows draft tokens from one distribution probs [vocab]."""
    return torch.multinomial(probs.expand(rows, -1), 1, replacement=True, generator=generator(seed))


def assert_frequencies_match(tokens, probs):
    """tokens int64 [rows] against probs [vocab]: never a zero-probability id, and every
    frequency within SIGMAS standard deviations."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    rows = tokens.numel()
    assert bool((tokens >= 0).all()) and bool((tokens < len(probs)).all())
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert bool((counts[probs == 0] == 0).all())
    bound = SIGMAS * torch.sqrt(probs * (1 - probs) / rows)
    assert bool(((counts / rows - probs).abs() <= bound).all()), (counts / rows, probs)


def assert_valid_layout(result, draft_tokens, vocab, draft_lengths=None):
    """tokens[b, :num_accepted+1] are ids in [0, vocab), the first num_accepted of them the drafts;
    everything after is PAD."""
    batch, k = draft_tokens.shape
    assert result.tokens.shape == (batch, k + 1) and result.tokens.dtype == torch.int64
    assert result.num_accepted.shape == (batch,) and result.num_accepted.dtype == torch.int64
    lengths = torch.full((batch,), k) if draft_lengths is None else draft_lengths
    assert bool((result.num_accepted >= 0).all()) and bool((result.num_accepted <= lengths).all())
    slots = torch.arange(k + 1)[None, :]
    emitted = slots <= result.num_accepted[:, None]
    assert bool((result.tokens[~emitted] == PAD).all())
    assert bool((result.tokens[emitted] >= 0).all()) and bool(
        (result.tokens[emitted] < vocab).all()
    )
    accepted = slots[:, :k] < result.num_accepted[:, None]
    assert torch.equal(result.tokens[:, :k][accepted], draft_tokens[accepted])
    assert torch.equal(result.num_emitted, result.num_accepted + 1)


def test_equal_distributions_keep_every_draft_and_draw_the_bonus_from_the_last_target_row():
    same = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], dtype=torch.float64)
    bonus = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, 0.7], dtype=torch.float64)
    k = 3
    draft_tokens = draws(same, ROWS * k, seed=1).reshape(ROWS, k)
    result = verify(
        draft_tokens, repeat([same] * k), repeat([same] * k + [bonus]), generator=generator(2)
    )
    assert bool((result.num_accepted == k).all())
    assert torch.equal(result.tokens[:, :k], draft_tokens)
    assert_frequencies_match(result.tokens[:, k], bonus)


def test_disjoint_supports_keep_nothing_and_recover_from_the_target():
    draft = torch.tensor([0.7, 0.3, 0.0, 0.0], dtype=torch.float64)
    target = torch.tensor([0.0, 0.0, 0.4, 0.6], dtype=torch.float64)
    k = 2
    draft_tokens = draws(draft, ROWS * k, seed=3).reshape(ROWS, k)
    result = verify(draft_tokens, repeat([draft] * k), repeat([target] * 3), generator=generator(4))
    assert bool((result.num_accepted == 0).all())
    assert bool((result.tokens[:, 1:] == PAD).all())
    assert_frequencies_match(result.tokens[:, 0], target)


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_zero_drafts_emit_one_bonus_token_distributed_as_the_target(point_mass):
    target = torch.tensor([0.05, 0.0, 0.25, 0.1, 0.6], dtype=torch.float64)
    draft_probs = None if point_mass else torch.zeros(ROWS, 0, 5, dtype=torch.float64)
    draft_tokens = torch.zeros(ROWS, 0, dtype=torch.int64)
    result = verify(draft_tokens, draft_probs, repeat([target]), generator=generator(5))
    assert result.tokens.shape == (ROWS, 1)
    assert bool((result.num_accepted == 0).all())
    assert_frequencies_match(result.tokens[:, 0], target)


def garbage_padding(draft_tokens, draft_probs, target_probs, draft_lengths, vocab):
    """Copies with every position a row does not use overwritten: ids -1 or vocab + 3, draft rows
    NaN, zeros or large values, target rows past the bonus row NaN or -5."""
    draft_tokens, draft_probs, target_probs = (
        draft_tokens.clone(),
        draft_probs.clone(),
        target_probs.clone(),
    )
    k = draft_tokens.shape[1]
    unused = torch.arange(k)[None, :] >= draft_lengths[:, None]  # [batch, k]
    rows = torch.arange(len(draft_lengths))
    draft_tokens[unused] = torch.where(rows % 2 == 0, -1, vocab + 3)[:, None].expand(-1, k)[unused]
    fill = torch.tensor([float("nan"), 0.0, 1e30, float("inf")], dtype=draft_probs.dtype)
    draft_probs[unused] = fill[rows % 4][:, None, None].expand(-1, k, vocab)[unused]
    past_bonus = torch.arange(k + 1)[None, :] > draft_lengths[:, None]  # [batch, k+1]
    target_fill = torch.tensor([float("nan"), -5.0], dtype=target_probs.dtype)
    target_probs[past_bonus] = target_fill[rows % 2][:, None, None].expand(-1, k + 1, vocab)[
        past_bonus
    ]
    return draft_tokens, draft_probs, target_probs


def ragged_batch(batch, k, vocab, seed):
    g = generator(seed)
    target_probs = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g) * 2, dim=-1)
    draft_probs = torch.softmax(
        target_probs[:, :k].log() + torch.randn(batch, k, vocab, generator=g), dim=-1
    )
    draft_tokens = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g)
    draft_lengths = torch.arange(batch) % (k + 1)  # every length 0..k
    return draft_tokens.reshape(batch, k), draft_probs, target_probs, draft_lengths


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_ragged_lengths_ignore_whatever_the_padding_holds(point_mass):
    """Rows with every length 0..k in one batch. The result must not depend on the padding: the
    same seed on clean inputs and on inputs with garbage padding gives the same tokens."""
    batch, k, vocab = 400, 4, 9
    clean = ragged_batch(batch, k, vocab, seed=6)
    draft_lengths = clean[3]
    dirty = garbage_padding(*clean, vocab)
    results = []
    for draft_tokens, draft_probs, target_probs in [clean[:3], dirty]:
        results.append(
            verify(
                draft_tokens,
                None if point_mass else draft_probs,
                target_probs,
                generator=generator(7),
                draft_lengths=draft_lengths,
            )
        )
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert torch.equal(results[0].num_accepted, results[1].num_accepted)
    assert_valid_layout(results[0], clean[0], vocab, draft_lengths)
    assert bool((results[0].num_accepted[draft_lengths == 0] == 0).all())
    kept_all = results[0].num_accepted == draft_lengths
    assert bool(kept_all.any()) and bool((~kept_all).any())


def test_residual_without_mass_still_emits_a_valid_token():
    """q equals p except at the drafted token, where q is larger by an amount inside float16's
    sum tolerance: a rejection has probability 1/3 but max(0, p - q) has no mass. The rule falls
    back to p; no NaN, no invalid id."""
    target = torch.tensor([0.01, 0.49, 0.5, 0.0])
    draft = torch.tensor([0.015, 0.49, 0.5, 0.0])
    rows = 30_000
    draft_tokens = torch.zeros(rows, 1, dtype=torch.int64)
    result = verify(
        draft_tokens,
        repeat([draft], rows).half(),
        repeat([target, target], rows).half(),
        generator=generator(8),
    )
    assert_valid_layout(result, draft_tokens, 4)
    rejected = result.num_accepted == 0
    assert abs(float(rejected.double().mean()) - 1 / 3) < SIGMAS * math.sqrt(2 / 9 / rows)
    assert bool((result.tokens[rejected, 0] != 3).all())


def test_equal_distributions_never_reject_even_at_the_largest_uniform():
    probs = torch.tensor([[[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]], dtype=torch.float64)
    accept = torch.tensor([[1 - 2**-53]], dtype=torch.float64)
    result = token_rule(
        torch.tensor([[0]]), probs[:, :1], probs, torch.tensor([1]), accept, torch.tensor([0.5])
    )
    assert result.num_accepted.tolist() == [1]


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_a_drafted_token_the_target_rules_out_is_never_kept(point_mass):
    target = torch.tensor([0.3, 0.0, 0.7], dtype=torch.float64)
    draft = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    rows = 20_000
    draft_tokens = torch.ones(rows, 2, dtype=torch.int64)
    result = verify(
        draft_tokens,
        None if point_mass else repeat([draft, draft], rows),
        repeat([target] * 3, rows),
        generator=generator(9),
    )
    assert bool((result.num_accepted == 0).all())
    # The recovered token comes from the residual, which has no mass on the ruled-out token.
    expected = residual(target, draft) if not point_mass else target
    assert_frequencies_match(result.tokens[:, 0], expected)


@pytest.mark.parametrize(
    "config", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)]
)
def test_minus_infinity_logits_get_probability_zero_and_are_never_emitted(config):
    vocab, k, rows = 6, 3, 20_000
    g = generator(10)
    target_logits = torch.randn(rows, k + 1, vocab, generator=g)
    target_logits[..., [1, 4]] = float("-inf")
    draft_logits = torch.randn(rows, k, vocab, generator=g)
    draft_logits[..., 0] = float("-inf")
    target_probs = logits_to_probs(target_logits, config)
    draft_probs = logits_to_probs(draft_logits, config)
    assert bool((target_probs[..., [1, 4]] == 0).all()) and bool((draft_probs[..., 0] == 0).all())
    assert not bool(target_probs.isnan().any()) and not bool(draft_probs.isnan().any())
    draft_tokens = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g)
    draft_tokens = draft_tokens.reshape(rows, k)
    result = verify(draft_tokens, draft_probs, target_probs, generator=g)
    assert_valid_layout(result, draft_tokens, vocab)
    emitted = result.tokens[result.tokens != PAD]
    assert not bool(torch.isin(emitted, torch.tensor([1, 4])).any())
    assert bool((result.num_accepted > 0).any())


def test_worked_example_with_two_tokens():
    """Q = (1/2, 1/2), P = (1/4, 3/4): draft A is kept iff u < (1/4)/(1/2) = 1/2, draft B always;
    a rejected A is replaced by B, the residual's only token; acceptance 3/4."""
    target = torch.tensor([0.25, 0.75], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(acceptance_rate(target, draft)) == 0.75
    assert residual(target, draft).tolist() == [0.0, 1.0]
    draft_tokens = torch.tensor([[0], [0], [1], [1]])
    accept = torch.tensor([[0.4999], [0.5], [0.0], [1 - 2**-53]], dtype=torch.float64)
    sample = torch.tensor([0.0, 0.0, 0.1, 0.9], dtype=torch.float64)
    result = token_rule(
        draft_tokens,
        repeat([draft], 4),
        repeat([target, target], 4),
        torch.ones(4, dtype=torch.int64),
        accept,
        sample,
    )
    assert result.num_accepted.tolist() == [1, 0, 1, 1]
    assert result.tokens.tolist() == [[0, 0], [1, PAD], [1, 0], [1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_full_size_vocabulary_gives_the_reference_result_on_the_same_draws(dtype, point_mass):
    """V = 151936 with the ids from 100000 on ruled out, a batch of 8 rows (more than one chunk
    of residual rows: 6), ragged: the result of `verify` is the loop reference's on the uniforms
    its generator draws, and no ruled-out id is emitted."""
    vocab, batch, k = 151936, 8, 3
    g = generator(11)
    target_logits = torch.randn(batch, k + 1, vocab, generator=g) * 3
    target_logits[..., 100_000:] = float("-inf")
    target_probs = torch.softmax(target_logits, dim=-1).to(dtype)
    draft_probs = torch.softmax(
        target_logits[:, :k] + torch.randn(batch, k, vocab, generator=g), -1
    ).to(dtype)
    draft_tokens = torch.multinomial(draft_probs.float().reshape(-1, vocab), 1, generator=g)
    draft_tokens = draft_tokens.reshape(batch, k)
    if point_mass:
        draft_probs = None
    lengths = torch.tensor([k, 1, 0, 2, k, k, 1, k])
    result = verify(
        draft_tokens, draft_probs, target_probs, generator=generator(12), draft_lengths=lengths
    )
    accept, sample = draw_uniforms(batch, k, generator(12), torch.device("cpu"))
    in_draft = torch.arange(k)[None, :] < lengths[:, None]
    expected = reference_token_rule(
        torch.where(in_draft, draft_tokens, 0), draft_probs, target_probs, lengths, accept, sample
    )
    assert torch.equal(result.tokens, expected.tokens)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert_valid_layout(result, draft_tokens, vocab, lengths)
    emitted = result.tokens[result.tokens != PAD]
    assert bool((emitted < 100_000).all())


def test_result_layout_pads_after_the_last_emitted_token():
    batch, k, vocab = 256, 5, 11
    draft_tokens, draft_probs, target_probs, draft_lengths = ragged_batch(batch, k, vocab, seed=12)
    result = verify(
        draft_tokens,
        draft_probs,
        target_probs,
        generator=generator(13),
        draft_lengths=draft_lengths,
    )
    assert_valid_layout(result, draft_tokens, vocab, draft_lengths)
    for b in range(batch):
        n = int(result.num_accepted[b])
        assert (result.tokens[b, n + 1 :] == PAD).all()
        assert (result.tokens[b, : n + 1] != PAD).all()
    assert len(set(result.num_accepted.tolist())) == k + 1  # every count 0..k occurred


def test_verify_never_touches_the_global_rng(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("verify must not save, fork or reseed the global RNG")

    draft_tokens, draft_probs, target_probs, draft_lengths = ragged_batch(64, 3, 7, seed=14)
    before = torch.get_rng_state()
    # Equal states before and after would also hold for code that forks or restores the global
    # RNG; forbid that too.
    for name in ["fork_rng", "set_rng_state", "manual_seed", "seed"]:
        monkeypatch.setattr(torch.random, name, forbidden)
    for name in ["set_rng_state", "manual_seed", "seed"]:
        monkeypatch.setattr(torch, name, forbidden)
    for point_mass in [False, True]:
        verify(
            draft_tokens,
            None if point_mass else draft_probs,
            target_probs,
            generator=generator(15),
            draft_lengths=draft_lengths,
        )
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), before)


def test_same_generator_seed_gives_the_same_result():
    draft_tokens, draft_probs, target_probs, draft_lengths = ragged_batch(512, 4, 13, seed=16)
    results = [
        verify(
            draft_tokens,
            draft_probs,
            target_probs,
            generator=generator(seed),
            draft_lengths=draft_lengths,
        )
        for seed in [17, 17, 18]
    ]
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert torch.equal(results[0].num_accepted, results[1].num_accepted)
    assert not torch.equal(results[0].tokens, results[2].tokens)


def test_verify_uses_the_uniforms_draw_uniforms_documents():
    """verify draws accept uniforms [batch, k] then sample uniforms [batch] from the generator, so
    the pure rule on draw_uniforms from the same seed reproduces it."""
    draft_tokens, draft_probs, target_probs, draft_lengths = ragged_batch(128, 3, 5, seed=19)
    result = verify(
        draft_tokens,
        draft_probs,
        target_probs,
        generator=generator(20),
        draft_lengths=draft_lengths,
    )
    uniforms = draw_uniforms(128, 3, generator(20), torch.device("cpu"))
    direct = token_rule(draft_tokens, draft_probs, target_probs, draft_lengths, *uniforms)
    assert torch.equal(result.tokens, direct.tokens)


NEG_INF = float("-inf")


@pytest.mark.parametrize(
    ("target_logprob", "draft_logprob", "expected"),
    [
        (math.log(0.25), math.log(0.5), 0.5),
        (math.log(0.75), math.log(0.5), 1.0),
        (math.log(0.3), math.log(0.3), 1.0),
        (0.0, math.log(1e-3), 1.0),
        (NEG_INF, math.log(0.5), 0.0),  # the target rules the token out: never kept
        (NEG_INF, 0.0, 0.0),
        (math.log(0.5), NEG_INF, 1.0),  # cannot have been drafted: 1 by convention
        (NEG_INF, NEG_INF, 1.0),  # -inf - -inf would be NaN
    ],
)
def test_acceptance_probability_is_min_one_ratio_and_never_nan(
    target_logprob, draft_logprob, expected
):
    value = acceptance_probability(torch.tensor(target_logprob), torch.tensor(draft_logprob))
    assert not bool(value.isnan())
    assert float(value) == pytest.approx(expected, rel=1e-6, abs=0)


def test_acceptance_probability_broadcasts_and_keeps_float64():
    target = torch.tensor(
        [[math.log(0.1), NEG_INF], [math.log(0.9), math.log(0.2)]], dtype=torch.float64
    )
    draft = torch.tensor([math.log(0.2), NEG_INF], dtype=torch.float64)
    value = acceptance_probability(target, draft)
    assert value.dtype == torch.float64 and value.shape == (2, 2)
    expected = torch.tensor([[0.5, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(value, expected, rtol=1e-12, atol=0)
    assert acceptance_probability(torch.tensor(-1.0).half(), torch.tensor(0.0).half()).dtype == (
        torch.float32
    )


@pytest.mark.parametrize(
    ("target", "draft", "expected"),
    [
        ([0.25, 0.75], [0.5, 0.5], [0.0, 1.0]),
        ([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [1.0, 0.0, 0.0]),
        ([0.4, 0.4, 0.2], [0.1, 0.3, 0.6], [0.75, 0.25, 0.0]),
        ([0.0, 0.0, 0.4, 0.6], [0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]),
        ([0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7]),  # P = Q: P itself
    ],
)
def test_residual_matches_hand_computed_values(target, draft, expected):
    value = residual(
        torch.tensor(target, dtype=torch.float64), torch.tensor(draft, dtype=torch.float64)
    )
    assert torch.allclose(value, torch.tensor(expected, dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_residual_of_equal_distributions_is_the_target_without_nan(dtype):
    g = generator(21)
    probs = torch.softmax(torch.randn(3, 4, 50, generator=g), dim=-1)
    probs[0, 0, :10] = 0
    probs = (probs / probs.sum(-1, keepdim=True)).to(dtype)
    other = torch.softmax(torch.randn(3, 4, 50, generator=g), dim=-1).to(dtype)
    mixed = torch.where(torch.arange(4)[None, :, None] % 2 == 0, probs, other)
    value = residual(probs, mixed)  # equal at even positions, different at odd ones
    assert value.shape == (3, 4, 50)
    assert value.dtype == torch.promote_types(dtype, torch.float32)
    assert not bool(value.isnan().any())
    assert torch.allclose(value.sum(-1), torch.ones(3, 4, dtype=value.dtype), atol=1e-5)
    same = probs.to(value.dtype)
    assert torch.allclose(value[:, 0::2], same[:, 0::2] / same[:, 0::2].sum(-1, keepdim=True))
    assert bool((value[0, 0, :10] == 0).all())


def test_a_row_without_residual_mass_next_to_an_ordinary_rejection():
    """Row 0's rejection leaves max(0, p - q) without mass (q exceeds p at the drafted token by a
    rounding-sized amount): it is redrawn alone from p; row 1, rejected with residual mass, is
    not disturbed. The same as the loop reference."""
    target = torch.tensor(
        [
            [[0.25, 0.25, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]],
            [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    draft = torch.tensor(
        [[[0.25 + 1e-9, 0.25, 0.5, 0.0]], [[0.0, 0.0, 0.5, 0.5]]], dtype=torch.float64
    )
    case = (
        torch.tensor([[0], [2]]),
        draft,
        target,
        torch.tensor([1, 1]),
        torch.tensor([[1 - 2**-40], [0.5]], dtype=torch.float64),
        torch.tensor([0.6, 0.6], dtype=torch.float64),
    )
    fast, reference = token_rule(*case), reference_token_rule(*case)
    assert fast.num_accepted.tolist() == [0, 0]
    assert torch.equal(fast.tokens, reference.tokens)
    # Row 0 from p = (1/4, 1/4, 1/2, 0): u = 0.6 gives 2; row 1 from (1/2, 1/2, 0, 0): 1.
    assert fast.tokens[:, 0].tolist() == [2, 1]
