"""Block verification: exact by enumeration at every prefix (1e-12), the same as its loop
reference on the same draws, never fewer accepted tokens than the token rule (strictly more on
the paper's example), equal to the token rule at temperature 0, and point-mass drafts reported as
verified by the token rule. Negative control: taking tau as the first failure (the number of
leading passes) instead of the last pass fails the enumeration and the statistical test."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    ConstantModel,
    TablePrefixModel,
    Tables,
    g_test_p_value,
    joint_counts,
    target_joint,
)
from specsample import verify
from specsample.analysis.exact import (
    exact_block_rule_distribution,
    exact_token_rule_distribution,
    expected_accepted,
    prefix_errors,
)
from specsample.rules import block as block_module
from specsample.rules import draw_uniforms
from specsample.rules.block import (
    block_rule,
    cumulative_log_acceptance,
    last_pass,
    pass_thresholds,
)
from specsample.rules.reference import reference_block_rule
from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.token import sample_final_tokens, token_rule
from specsample.warpers import SamplingConfig, logits_to_probs

EXACT = 1e-12
ALPHA = 1e-6  # false-failure rate of each statistical test
VOCAB = 4


def first_failure_block_rule(
    draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
):
    """Negative control: tau = the number of leading passes (stops at the first failure)."""
    log_kept = cumulative_log_acceptance(draft_tokens, draft_probs, target_probs)
    thresholds = pass_thresholds(log_kept, draft_probs, target_probs, draft_lengths)
    passed = accept_uniforms < thresholds
    tau = passed.long().cumprod(dim=1).sum(dim=1)
    scale = torch.nn.functional.pad(log_kept, (1, 0)).gather(1, tau[:, None])[:, 0].exp()
    final = sample_final_tokens(
        draft_tokens,
        draft_probs,
        target_probs,
        draft_lengths,
        tau,
        sample_uniforms,
        target_scale=scale,
    )
    return VerifyResult(assemble_tokens(draft_tokens, tau, final), tau, "block")


@pytest.mark.parametrize(
    "implementation", [block_rule, reference_block_rule], ids=["vectorised", "reference"]
)
@pytest.mark.parametrize(
    ("vocab", "k", "target_sharpness", "draft_sharpness", "zeros"),
    [
        (2, 1, 1.0, 1.0, 0),
        (3, 2, 2.0, 0.5, 0),
        (4, 3, 1.5, 1.5, 1),
        (8, 2, 2.0, 1.0, 2),
        (8, 3, 1.0, 2.0, 0),
        (3, 0, 1.0, 1.0, 0),
    ],
)
def test_block_rule_output_equals_target_at_every_prefix(
    implementation, vocab, k, target_sharpness, draft_sharpness, zeros
):
    target = TablePrefixModel(vocab, seed=31, sharpness=target_sharpness, zeros=zeros)
    draft = TablePrefixModel(vocab, seed=32, sharpness=draft_sharpness, zeros=zeros)
    distribution = exact_block_rule_distribution(implementation, target, draft, k=k)
    worst, mass_error = prefix_errors(distribution, target)
    assert mass_error < EXACT
    assert worst < EXACT


def test_first_failure_negative_control_fails_the_enumeration():
    target = TablePrefixModel(4, seed=33, sharpness=2.0)
    draft = TablePrefixModel(4, seed=34, sharpness=2.0)
    distribution = exact_block_rule_distribution(first_failure_block_rule, target, draft, k=3)
    assert prefix_errors(distribution, target)[0] > 1e-3


def test_block_accepts_strictly_more_than_token_on_the_papers_example():
    """p = (1/3, 2/3), q = (2/3, 1/3) at every position, k = 2: the token rule accepts
    beta + beta^2 = 10/9 drafts in expectation, block verification 11/9."""
    target, draft = ConstantModel([1 / 3, 2 / 3]), ConstantModel([2 / 3, 1 / 3])
    token = exact_token_rule_distribution(token_rule, target, draft, k=2)
    block = exact_block_rule_distribution(block_rule, target, draft, k=2)
    assert expected_accepted(token) == pytest.approx(10 / 9, abs=EXACT)
    assert expected_accepted(block) == pytest.approx(11 / 9, abs=EXACT)
    assert prefix_errors(block, target)[0] < EXACT


@pytest.mark.parametrize("seed", range(6))
def test_block_never_accepts_fewer_than_token_in_expectation(seed):
    target = TablePrefixModel(4, seed=100 + seed, sharpness=1.5)
    draft = TablePrefixModel(4, seed=200 + seed, sharpness=1.5)
    token = expected_accepted(exact_token_rule_distribution(token_rule, target, draft, k=3))
    block = expected_accepted(exact_block_rule_distribution(block_rule, target, draft, k=3))
    assert block >= token - EXACT


def random_case(generator, batch, k, vocab, dtype=torch.float64):
    target = torch.softmax(torch.randn(batch, k + 1, vocab, generator=generator) * 2, -1)
    draft = torch.softmax(torch.randn(batch, k, vocab, generator=generator) * 2, -1)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=generator).reshape(batch, k)
    lengths = torch.randint(0, k + 1, (batch,), generator=generator)
    return tokens, draft.to(dtype), target.to(dtype), lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "k", "vocab"), [(64, 4, 7), (32, 3, 1500), (2, 2, 151936)])
def test_block_vectorised_equals_reference_on_the_same_draws(dtype, batch, k, vocab):
    generator = torch.Generator().manual_seed(batch * 7 + k)
    tokens, draft, target, lengths = random_case(generator, batch, k, vocab, dtype)
    accept, sample = draw_uniforms(batch, k, generator, torch.device("cpu"))
    fast = block_rule(tokens, draft, target, lengths, accept, sample)
    slow = reference_block_rule(tokens, draft, target, lengths, accept, sample)
    assert torch.equal(fast.num_accepted, slow.num_accepted)
    assert torch.equal(fast.tokens, slow.tokens)


def test_pass_thresholds_follow_their_formula_up_to_each_row_length_and_are_zero_after():
    """Checked directly, column by column: block_rule also masks positions past a row's length
    in last_pass, which would hide a threshold left there."""
    generator = torch.Generator().manual_seed(31)
    batch, k, vocab = 10, 4, 6
    tokens, draft, target, lengths = random_case(generator, batch, k, vocab)
    lengths = torch.tensor([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    log_kept = cumulative_log_acceptance(tokens, draft, target)
    thresholds = pass_thresholds(log_kept, draft, target, lengths)
    kept = log_kept.exp()
    for b in range(batch):
        length = int(lengths[b])
        for i in range(k):
            if i >= length:
                expected = 0.0
            elif i == length - 1:
                expected = float(kept[b, i])
            else:
                mass = float(
                    torch.clamp(kept[b, i] * target[b, i + 1] - draft[b, i + 1], min=0).sum()
                )
                expected = mass / (mass + 1.0 - float(kept[b, i]))
            assert float(thresholds[b, i]) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_helpers_compute_in_float32_or_wider_whatever_the_input_dtype(dtype):
    """Half-precision inputs give exactly what float32 inputs holding the same values give: the
    logs of P_i are taken in float64 and the residual masses formed in float32."""
    generator = torch.Generator().manual_seed(33)
    tokens, draft, target, _ = random_case(generator, 16, 4, 300, dtype)
    wide_draft, wide_target = draft.float(), target.float()
    log_kept = cumulative_log_acceptance(tokens, draft, target)
    assert torch.equal(log_kept, cumulative_log_acceptance(tokens, wide_draft, wide_target))
    assert torch.equal(log_kept, cumulative_log_acceptance(tokens, draft.double(), target.double()))
    kept = log_kept.exp()
    masses = block_module.residual_masses(kept, draft, target)
    assert torch.equal(masses, block_module.residual_masses(kept, wide_draft, wide_target))


def test_residual_masses_are_summed_in_float64():
    """The terms max(0, P_i p - q) are formed in float32 for float32 inputs and summed in float64:
    the sum agrees with a float64 sum of the same float32 terms far below float32 rounding."""
    generator = torch.Generator().manual_seed(34)
    batch, k, vocab = 8, 3, 5000
    tokens, draft, target, _ = random_case(generator, batch, k, vocab, torch.float32)
    kept = cumulative_log_acceptance(tokens, draft, target).exp()
    masses = block_module.residual_masses(kept, draft, target)
    terms = (target[:, 1:k] * kept[:, : k - 1, None].float() - draft[:, 1:k]).clamp(min=0.0)
    expected = terms.double().sum(dim=-1)
    torch.testing.assert_close(masses[:, : k - 1], expected, rtol=1e-12, atol=0.0)
    assert bool((masses[:, k - 1] == 0).all())


def test_last_pass_is_the_largest_pass_within_each_row_length():
    thresholds = torch.tensor([[0.5, 0.2, 0.9, 1.0]] * 4, dtype=torch.float64)
    accept = torch.tensor(
        [[0.4, 0.3, 0.8, 0.0], [0.6, 0.1, 0.95, 0.0], [0.6, 0.3, 0.95, 0.0], [0.4, 0.3, 0.8, 0.0]],
        dtype=torch.float64,
    )
    lengths = torch.tensor([2, 4, 3, 0])
    # Row 0: passes 1 (and 3, 4 past its length). Row 1: passes 2 and 4. Row 2: none within 3.
    assert last_pass(accept, thresholds, lengths).tolist() == [1, 4, 0, 0]


def test_block_equals_token_at_temperature_zero():
    generator = torch.Generator().manual_seed(5)
    batch, k, vocab = 64, 4, 12
    logits_t = torch.randn(batch, k + 1, vocab, generator=generator)
    logits_d = logits_t[:, :k] + torch.randn(batch, k, vocab, generator=generator)
    greedy = SamplingConfig(temperature=0)
    target, draft = logits_to_probs(logits_t, greedy), logits_to_probs(logits_d, greedy)
    tokens = draft.argmax(-1)
    results = [
        verify(tokens, draft, target, generator=torch.Generator().manual_seed(1), rule=rule)
        for rule in ("token", "block")
    ]
    assert torch.equal(results[0].tokens, results[1].tokens)


def test_point_mass_drafts_fall_back_to_the_token_rule_and_say_so():
    generator = torch.Generator().manual_seed(6)
    tokens, _, target, _ = random_case(generator, 8, 3, 5)
    result = verify(tokens, None, target, generator=torch.Generator().manual_seed(0), rule="block")
    token = verify(tokens, None, target, generator=torch.Generator().manual_seed(0), rule="token")
    assert result.rule_used == "token"
    assert torch.equal(result.tokens, token.tokens)


def first_two_tokens(emit, seed=0, rows=200_000, k=3):
    """The first two emitted tokens of `rows` one-step verifications from the empty prefix,
    continued by a second step where only one token came out."""
    target_model = TablePrefixModel(VOCAB, seed=41, sharpness=1.5)
    draft_model = TablePrefixModel(VOCAB, seed=42, sharpness=1.5)
    target, draft = Tables(target_model, VOCAB, k + 1), Tables(draft_model, VOCAB, k + 1)
    generator = torch.Generator().manual_seed(seed)

    def step(codes):
        drafts, draft_rows, target_rows, prefix = [], [], [], codes
        for _ in range(k):
            q = draft[prefix]
            token = torch.multinomial(q, 1, generator=generator)[:, 0]
            draft_rows.append(q)
            target_rows.append(target[prefix])
            drafts.append(token)
            prefix = draft.extend(prefix, token)
        target_rows.append(target[prefix])
        tokens = torch.stack(drafts, 1)
        accept, sample = draw_uniforms(len(codes), k, generator, torch.device("cpu"))
        lengths = torch.full((len(codes),), k)
        return emit(
            tokens, torch.stack(draft_rows, 1), torch.stack(target_rows, 1), lengths, accept, sample
        ).tokens

    first = step(torch.zeros(rows, dtype=torch.int64))
    need = first[:, 1] < 0
    second = step(target.extend(torch.zeros(int(need.sum()), dtype=torch.int64), first[need, 0]))
    pairs = first[:, :2].clone()
    pairs[need, 1] = second[:, 0]
    return pairs, target_model


def test_block_first_two_tokens_follow_target_joint():
    """G-test, 200000 rows, false-failure rate ALPHA = 1e-6 (see test_statistical)."""
    pairs, target_model = first_two_tokens(block_rule)
    assert g_test_p_value(joint_counts(pairs, VOCAB), target_joint(target_model, VOCAB)) > ALPHA


def test_first_failure_negative_control_fails_the_same_statistical_test():
    pairs, target_model = first_two_tokens(first_failure_block_rule)
    assert g_test_p_value(joint_counts(pairs, VOCAB), target_joint(target_model, VOCAB)) < ALPHA
