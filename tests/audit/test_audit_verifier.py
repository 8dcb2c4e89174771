"""`specsample.audit.audit_verifier`: it passes our exact rules, rejects the lossy rule and
deliberately wrong verifiers, and says it could not judge a broken target. Samples are small
(20000 trials per case) so each audit takes about a second; every audit here runs at the default
false-failure rate 1e-4."""

from __future__ import annotations

import audit_wrong_verifiers as wrong
import pytest
import torch

from specsample.analysis.exact import exact_block_rule_distribution, exact_token_rule_distribution
from specsample.audit import audit_verifier, default_cases
from specsample.audit.cases import draw_trials, observed_pairs
from specsample.lossy import exact_typical_distribution
from specsample.rules.block import block_rule
from specsample.rules.token import token_rule

SAMPLES = 20_000
FAST_CASES = ["worked_example", "tiny_masses", "point_mass", "long_k", "ragged", "bfloat16"]


def case_named(name):
    return next(case for case in default_cases() if case.name == name)


def prefix_models(case):
    """The case's target and drafter as prefix -> distribution (float64), for enumeration."""

    def target(prefix):
        rows = case.received("first_target") if not prefix else case.received("next_target")
        return rows if not prefix else rows[prefix[-1]]

    def draft(prefix):
        return (
            case.received("first_draft") if not prefix else case.received("next_draft")[prefix[-1]]
        )

    return target, draft


def two_token_law_of_step(case, distribution):
    """The law of (t1, t2) from the exact distribution of one step's emitted tokens: where a step
    emitted one token, t2 follows the target after it (the audit's completion)."""
    vocab = case.vocab
    law = torch.zeros(vocab, vocab, dtype=torch.float64)
    next_target = case.received("next_target")
    for tokens, probability in distribution.items():
        if len(tokens) >= 2:
            law[tokens[0], tokens[1]] += probability
        else:
            law[tokens[0]] += probability * next_target[tokens[0]]
    return law.flatten()


@pytest.mark.parametrize("name", ["worked_example", "disjoint_supports", "tiny_masses"])
def test_law_matches_enumeration_of_our_rules_and_not_of_the_lossy_one(name):
    case = case_named(name)
    target, draft = prefix_models(case)
    law = case.two_token_law()
    k = min(case.k, 2)
    for distribution in (
        exact_token_rule_distribution(token_rule, target, draft, k=k),
        exact_block_rule_distribution(block_rule, target, draft, k=k),
    ):
        assert torch.allclose(two_token_law_of_step(case, distribution), law, atol=1e-12)
    if name != "disjoint_supports":  # typical acceptance keeps nothing there, so it is exact
        typical = exact_typical_distribution(target, draft, k=k)
        assert 0.5 * (two_token_law_of_step(case, typical) - law).abs().sum() > 0.05


def test_completion_draws_the_second_token_only_where_one_token_was_emitted():
    case = case_named("worked_example")
    trials = draw_trials(case, 4, torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 0, -1], [0, -1, -1], [1, 1, 1], [1, -1, -1]])
    first, second = observed_pairs(case, tokens, torch.Generator().manual_seed(1))
    assert first.tolist() == [1, 0, 1, 1]
    assert second[0] == 0 and second[2] == 1
    assert trials.draft_tokens.shape == (4, 2)


def test_draws_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    audit_verifier("ours:token", samples=1_000, cases=["worked_example"])
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("target", ["ours:token", "ours:block", "ours:tree"])
def test_our_exact_rules_pass(target):
    report = audit_verifier(target, samples=SAMPLES, cases=FAST_CASES)
    assert report.verdict == "pass", [(c.name, c.status, c.message) for c in report.cases]
    assert report.exit_code == 0
    assert all(case.status == "pass" for case in report.cases)


def test_lossy_typical_rule_is_rejected():
    report = audit_verifier("ours:typical", samples=SAMPLES, cases=FAST_CASES)
    assert report.verdict == "rejected" and report.exit_code == 1


@pytest.mark.parametrize(
    "fn",
    [wrong.recover_from_p, wrong.always_accept, wrong.block_first_failure, wrong.off_by_one],
    ids=lambda fn: fn.__name__,
)
def test_wrong_verifiers_are_rejected(fn):
    report = audit_verifier(fn, samples=SAMPLES, cases=["worked_example", "long_k", "float16"])
    assert report.verdict == "rejected", [(c.name, c.status, c.message) for c in report.cases]


@pytest.mark.parametrize(
    "target",
    [
        "audit_wrong_verifiers:returns_floats",
        "audit_wrong_verifiers:returns_wrong_shape",
        "audit_wrong_verifiers:returns_outside_vocab",
        "audit_wrong_verifiers:returns_not_left_aligned",
        "audit_wrong_verifiers:raises",
        "audit_wrong_verifiers:two_arguments",
        "audit_wrong_verifiers:NOT_A_FUNCTION",
        "audit_wrong_verifiers:missing",
        "no_such_module_anywhere:fn",
        "not-a-target",
        "ours:nothing",
    ],
)
def test_broken_targets_cannot_be_judged(target):
    report = audit_verifier(target, samples=1_000, cases=["worked_example"])
    assert report.verdict == "could not judge" and report.exit_code == 2
    message = report.message or report.cases[0].message
    assert message


def test_contract_messages_name_the_problem():
    report = audit_verifier(wrong.returns_outside_vocab, samples=1_000, cases=["worked_example"])
    assert "outside the vocabulary [0, 2)" in report.cases[0].message
    report = audit_verifier(wrong.returns_wrong_shape, samples=1_000, cases=["worked_example"])
    assert "expected shape [batch=1000, k+1=3], got (1000, 2)" in report.cases[0].message
    report = audit_verifier("audit_wrong_verifiers:two_arguments", samples=1_000)
    assert "wrong signature" in report.message


def test_non_draft_before_the_last_token_is_rejected():
    def swaps(draft_tokens, draft_probs, target_probs, generator):
        out = torch.nn.functional.pad(draft_tokens, (0, 1), value=0)
        out[:, 0] = 1 - draft_tokens[:, 0]  # vocab 2: never the draft
        return out

    report = audit_verifier(swaps, samples=1_000, cases=["worked_example"])
    assert report.verdict == "rejected"
    assert "only kept drafts may precede" in report.cases[0].message


def test_unsupported_cases_are_skipped_not_passed():
    report = audit_verifier(wrong.always_accept, samples=1_000, cases=["ragged"])
    assert report.cases[0].status == "skipped"
    assert report.verdict == "could not judge"  # nothing was judged


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="samples"):
        audit_verifier("ours:token", samples=10)
    with pytest.raises(ValueError, match="alpha"):
        audit_verifier("ours:token", alpha=2.0)
    with pytest.raises(ValueError, match="cases"):
        audit_verifier("ours:token", cases=["no_such_case"])


@pytest.mark.slow  # importing transformers takes several seconds
def test_transformers_shim_reports_or_says_it_cannot():
    report = audit_verifier("transformers", samples=500, cases=["worked_example", "point_mass"])
    if report.message:  # transformers absent or without _speculative_sampling
        assert report.verdict == "could not judge"
    else:
        assert [c.status for c in report.cases][1] == "skipped"
        assert report.cases[0].status in ("pass", "rejected")


@pytest.mark.parametrize("target", ["vllm", "flashinfer"])
def test_uninstalled_engines_cannot_be_judged(target):
    pytest.importorskip("scipy")
    try:
        __import__(target)
        pytest.skip(f"{target} is installed")
    except ImportError:
        pass
    report = audit_verifier(target, samples=1_000)
    assert report.verdict == "could not judge" and "could not judge" in report.message


def test_more_tokens_than_the_draft_length_allows_is_rejected():
    def ignores_lengths(draft_tokens, draft_probs, target_probs, generator, *, draft_lengths=None):
        return wrong.always_accept(draft_tokens, draft_probs, target_probs, generator)

    report = audit_verifier(ignores_lengths, samples=1_000, cases=["ragged"])
    assert report.verdict == "rejected"
    assert "at most draft_lengths + 1" in report.cases[0].message
