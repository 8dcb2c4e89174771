"""Proof by enumeration: for every draft sequence and every piece of the randomness, the token rule
implementation emits tokens whose distribution equals the target at every prefix, to 1e-12 in
float64. Negative controls (wrong rules) fail the same check by a wide margin."""

from __future__ import annotations

import pytest
import torch

from helpers import ConstantModel, TablePrefixModel
from specsample.analysis.exact import exact_token_rule_distribution, prefix_errors
from specsample.rules.reference import reference_token_rule
from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.sampling import sample_from_weights
from specsample.rules.token import token_rule

EXACT = 1e-12


def always_accept_rule(
    draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
):
    """Negative control: keeps every draft, then a bonus token from p."""
    batch, k = draft_tokens.shape
    num_accepted = draft_lengths.clone()
    rows = torch.arange(batch)
    final = sample_from_weights(target_probs[rows, num_accepted], sample_uniforms)
    return VerifyResult(assemble_tokens(draft_tokens, num_accepted, final), num_accepted)


def recover_from_target_rule(
    draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
):
    """Negative control: the right keep test, but the recovered token is drawn from p, not from
    the residual max(0, p - q)."""
    result = token_rule(
        draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
    )
    rows = torch.arange(draft_tokens.shape[0])
    final = sample_from_weights(target_probs[rows, result.num_accepted], sample_uniforms)
    tokens = assemble_tokens(draft_tokens, result.num_accepted, final)
    return VerifyResult(tokens, result.num_accepted)


RULES = {"vectorised": token_rule, "reference": reference_token_rule}
CASES = [  # (vocab, k, target sharpness, draft sharpness, zeros per row)
    (3, 0, 1.0, 1.0, 0),
    (2, 1, 1.0, 1.0, 0),
    (3, 2, 2.0, 0.5, 0),
    (4, 3, 1.5, 1.5, 1),
    (8, 2, 2.0, 1.0, 2),
    (8, 3, 1.0, 2.0, 0),
]


@pytest.mark.parametrize("implementation", sorted(RULES))
@pytest.mark.parametrize(("vocab", "k", "target_sharpness", "draft_sharpness", "zeros"), CASES)
def test_token_rule_output_equals_target_at_every_prefix(
    implementation, vocab, k, target_sharpness, draft_sharpness, zeros
):
    target = TablePrefixModel(vocab, seed=1, sharpness=target_sharpness, zeros=zeros)
    draft = TablePrefixModel(vocab, seed=2, sharpness=draft_sharpness, zeros=zeros)
    distribution = exact_token_rule_distribution(RULES[implementation], target, draft, k=k)
    worst, mass_error = prefix_errors(distribution, target)
    assert mass_error < EXACT
    assert worst < EXACT


@pytest.mark.parametrize(("vocab", "k"), [(2, 1), (5, 3), (8, 3)])
def test_point_mass_drafts_output_equals_target_at_every_prefix(vocab, k):
    target = TablePrefixModel(vocab, seed=3, sharpness=2.0)
    draft = TablePrefixModel(vocab, seed=4, sharpness=2.0)
    distribution = exact_token_rule_distribution(token_rule, target, draft, k=k, point_mass=True)
    worst, mass_error = prefix_errors(distribution, target)
    assert mass_error < EXACT
    assert worst < EXACT


def test_worked_example_keeps_three_quarters_and_emits_target():
    """Q = (1/2, 1/2), P = (1/4, 3/4): acceptance 3/4, output (1/4, 3/4)."""
    target, draft = ConstantModel([0.25, 0.75]), ConstantModel([0.5, 0.5])
    distribution = exact_token_rule_distribution(token_rule, target, draft, k=1)
    first_token_kept = sum(w for seq, w in distribution.items() if len(seq) == 2)
    assert first_token_kept == pytest.approx(0.75, abs=EXACT)
    first = torch.zeros(2, dtype=torch.float64)
    for sequence, weight in distribution.items():
        first[sequence[0]] += weight
    assert torch.allclose(first, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=EXACT)


def test_disjoint_supports_never_keep_and_still_match_target():
    target, draft = ConstantModel([0.0, 0.0, 0.4, 0.6]), ConstantModel([0.7, 0.3, 0.0, 0.0])
    distribution = exact_token_rule_distribution(token_rule, target, draft, k=2)
    assert all(len(seq) == 1 for seq in distribution)
    assert prefix_errors(distribution, target)[0] < EXACT


def test_equal_distributions_keep_every_draft():
    same = ConstantModel([0.1, 0.2, 0.3, 0.4])
    distribution = exact_token_rule_distribution(token_rule, same, same, k=3)
    assert sum(w for seq, w in distribution.items() if len(seq) == 4) == pytest.approx(1, abs=EXACT)
    assert prefix_errors(distribution, same)[0] < EXACT


@pytest.mark.parametrize("wrong_rule", [always_accept_rule, recover_from_target_rule])
@pytest.mark.parametrize("point_mass", [False, True])
def test_negative_controls_fail_the_enumeration(wrong_rule, point_mass):
    target = TablePrefixModel(4, seed=5, sharpness=2.0)
    draft = TablePrefixModel(4, seed=6, sharpness=2.0)
    distribution = exact_token_rule_distribution(
        wrong_rule, target, draft, k=2, point_mass=point_mass
    )
    worst, _ = prefix_errors(distribution, target)
    assert worst > 1e-2
