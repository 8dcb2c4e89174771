"""Bad input to `specsample.verify` and `SamplingConfig` raises ValueError or TypeError whose
message names the argument (or field) at fault."""

from __future__ import annotations

import math

import pytest
import torch

from specsample import SamplingConfig, verify
from specsample.rules import PAD, draw_uniforms
from specsample.rules.checks import SUM_TOLERANCE
from specsample.rules.reference import reference_token_rule

BATCH, K, VOCAB = 2, 3, 5


def valid_inputs(dtype=torch.float32):
    """(draft_tokens, draft_probs, target_probs) that verify accepts."""
    g = torch.Generator().manual_seed(0)
    target_probs = torch.softmax(torch.randn(BATCH, K + 1, VOCAB, generator=g), -1).to(dtype)
    draft_probs = torch.softmax(torch.randn(BATCH, K, VOCAB, generator=g), -1).to(dtype)
    draft_tokens = torch.tensor([[0, 1, 2], [4, 3, 2]])
    return draft_tokens, draft_probs, target_probs


def call(draft_tokens=None, draft_probs="valid", target_probs=None, **options):
    """verify on valid inputs with the given ones replaced."""
    valid_tokens, valid_draft, valid_target = valid_inputs()
    options.setdefault("generator", torch.Generator().manual_seed(1))
    return verify(
        valid_tokens if draft_tokens is None else draft_tokens,
        valid_draft if isinstance(draft_probs, str) else draft_probs,
        valid_target if target_probs is None else target_probs,
        **options,
    )


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_valid_inputs_pass_and_give_the_reference_rule_result(point_mass):
    result = call(draft_probs=None if point_mass else "valid")
    draft_tokens, draft_probs, target_probs = valid_inputs()
    accept, sample = draw_uniforms(BATCH, K, torch.Generator().manual_seed(1), torch.device("cpu"))
    expected = reference_token_rule(
        draft_tokens,
        None if point_mass else draft_probs,
        target_probs,
        torch.full((BATCH,), K),
        accept,
        sample,
    )
    assert torch.equal(result.tokens, expected.tokens)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert result.rule_used == "token"


# Wrong types and ranks.


@pytest.mark.parametrize(
    ("draft_tokens", "error"),
    [
        ([[0, 1, 2], [4, 3, 2]], TypeError),
        (torch.tensor([[0.0, 1.0, 2.0], [4.0, 3.0, 2.0]]), TypeError),
        (torch.ones(BATCH, K, dtype=torch.bool), TypeError),
        (torch.tensor([0, 1, 2]), ValueError),
        (torch.zeros(BATCH, K, 1, dtype=torch.int64), ValueError),
    ],
    ids=["list", "float", "bool", "rank-1", "rank-3"],
)
def test_draft_tokens_of_wrong_type_or_rank_are_rejected(draft_tokens, error):
    with pytest.raises(error, match="draft_tokens"):
        call(draft_tokens=draft_tokens)


@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: p.tolist(), TypeError),
        (lambda p: (p * 100).long(), TypeError),
        (lambda p: (p * 100).int(), TypeError),
        (lambda p: p.to(torch.complex64), TypeError),
        (lambda p: p[0], ValueError),
        (lambda p: p[None], ValueError),
    ],
    ids=["list", "int64", "int32", "complex", "rank-2", "rank-4"],
)
def test_probabilities_of_wrong_type_or_rank_are_rejected(name, make, error):
    _, draft_probs, target_probs = valid_inputs()
    bad = make(draft_probs if name == "draft_probs" else target_probs)
    with pytest.raises(error, match=name):
        call(**{name: bad})


# Shapes that do not fit together.


def test_target_with_k_rows_instead_of_k_plus_one_is_rejected():
    _, _, target_probs = valid_inputs()
    with pytest.raises(ValueError, match="target_probs"):
        call(target_probs=target_probs[:, :K])
    with pytest.raises(ValueError, match="target_probs"):
        call(target_probs=target_probs[:, :K], draft_probs=None)


def test_draft_probs_with_a_different_k_is_rejected():
    _, draft_probs, _ = valid_inputs()
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=draft_probs[:, : K - 1])
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=torch.cat([draft_probs, draft_probs[:, :1]], dim=1))


def test_draft_tokens_with_a_different_k_are_rejected_naming_the_shapes():
    draft_tokens, _, _ = valid_inputs()
    with pytest.raises(ValueError, match="target_probs.*draft_tokens"):
        call(draft_tokens=draft_tokens[:, :2])


def test_batch_mismatch_is_rejected():
    _, draft_probs, target_probs = valid_inputs()
    with pytest.raises(ValueError, match="target_probs"):
        call(target_probs=target_probs[:1])
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=draft_probs[:1])


def test_vocab_mismatch_is_rejected():
    _, draft_probs, _ = valid_inputs()
    wider = torch.nn.functional.pad(draft_probs, (0, 1))
    with pytest.raises(ValueError, match="draft_probs.*vocab"):
        call(draft_probs=wider)


def test_empty_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="target_probs"):
        call(
            draft_tokens=torch.zeros(BATCH, 0, dtype=torch.int64),
            draft_probs=None,
            target_probs=torch.zeros(BATCH, 1, 0),
        )


def test_tensors_on_different_devices_are_rejected():
    """Without a second real device the meta device stands in for one."""
    draft_tokens = torch.zeros(BATCH, K, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="device"):
        call(draft_tokens=draft_tokens)


# Values.


@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_probabilities_are_rejected(name, value):
    _, draft_probs, target_probs = valid_inputs()
    bad = (draft_probs if name == "draft_probs" else target_probs).clone()
    bad[1, 0, 3] = value
    with pytest.raises(ValueError, match=f"{name}.*finite"):
        call(**{name: bad})


@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
def test_negative_probabilities_are_rejected(name):
    _, draft_probs, target_probs = valid_inputs()
    bad = (draft_probs if name == "draft_probs" else target_probs).clone()
    bad[0, 1, 2] += 1.0
    bad[0, 1, 4] -= 1.0  # the row still sums to 1
    assert float(bad[0, 1].sum()) == pytest.approx(1, abs=1e-6) and float(bad[0, 1].min()) < 0
    with pytest.raises(ValueError, match=f"{name}.*non-negative"):
        call(**{name: bad})


def row_off_by(dtype, offset):
    """A distribution [VOCAB] in dtype whose sum is 1 + offset (after rounding to dtype; the
    actual offset is returned)."""
    row = torch.tensor([0.25, 0.25, 0.125, 0.125, 0.25 + offset], dtype=torch.float64).to(dtype)
    return row, float(row.to(torch.float64).sum()) - 1


@pytest.mark.parametrize("dtype", list(SUM_TOLERANCE))
@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
def test_rows_not_summing_to_one_fail_beyond_the_dtype_tolerance_and_pass_within(dtype, name):
    tolerance = SUM_TOLERANCE[dtype]
    draft_tokens, draft_probs, target_probs = valid_inputs(torch.float64)
    draft_tokens = torch.zeros_like(draft_tokens)  # drafts id 0, which keeps probability 1/4
    for sign in [1, -1]:
        within, actual = row_off_by(dtype, sign * tolerance / 2)
        assert tolerance / 4 < abs(actual) < tolerance  # the premise of the "within" case
        beyond, actual = row_off_by(dtype, sign * tolerance * 2)
        assert abs(actual) > 1.5 * tolerance
        for row, passes in [(within, True), (beyond, False)]:
            probs = {"draft_probs": draft_probs, "target_probs": target_probs}
            probs = {key: value.to(dtype) for key, value in probs.items()}
            probs[name] = probs[name].clone()
            probs[name][1, 1] = row
            options = {"draft_tokens": draft_tokens, **probs}
            if passes:
                call(**options)
                continue
            with pytest.raises(ValueError, match=f"{name}.*sum to 1"):
                call(**options)
            call(**options, validate=False)  # the value checks are the ones validate=False skips


def test_logits_instead_of_probabilities_are_rejected():
    logits = torch.rand(BATCH, K + 1, VOCAB, generator=torch.Generator().manual_seed(2)) + 1
    with pytest.raises(ValueError, match="target_probs.*logits"):
        call(target_probs=logits)


# Token ids and draft lengths.


@pytest.mark.parametrize("bad_id", [-1, -VOCAB, VOCAB, VOCAB + 100])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_token_ids_out_of_range_are_rejected_even_without_validation(bad_id, point_mass):
    draft_tokens = torch.tensor([[0, 1, 2], [4, bad_id, 2]])
    for validate in [True, False]:
        with pytest.raises(ValueError, match="draft_tokens.*vocab"):
            call(
                draft_tokens=draft_tokens,
                draft_probs=None if point_mass else "valid",
                validate=validate,
            )


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_out_of_range_ids_past_the_draft_length_are_ignored(point_mass):
    """The same result as with valid ids there: nothing past a row's draft length is read."""
    lengths = torch.tensor([1, 3])
    draft_probs = None if point_mass else "valid"
    padded = call(
        draft_tokens=torch.tensor([[0, -1, VOCAB], [4, 3, 2]]),
        draft_probs=draft_probs,
        draft_lengths=lengths,
    )
    valid = call(
        draft_tokens=torch.tensor([[0, 1, 2], [4, 3, 2]]),
        draft_probs=draft_probs,
        draft_lengths=lengths,
    )
    assert torch.equal(padded.tokens, valid.tokens)
    assert torch.equal(padded.num_accepted, valid.num_accepted)
    assert padded.tokens[0, 2] == PAD  # row 0 emits at most 2 tokens


def test_a_drafted_token_with_draft_probability_zero_is_rejected():
    draft_tokens, draft_probs, _ = valid_inputs()
    draft_probs = draft_probs.clone()
    draft_probs[1, 2, 1] += draft_probs[1, 2, 2]
    draft_probs[1, 2, 2] = 0  # draft_tokens[1, 2] = 2
    for validate in [True, False]:
        with pytest.raises(ValueError, match=r"draft_probs.*draft_tokens\[1, 2\]"):
            call(draft_probs=draft_probs, validate=validate)


@pytest.mark.parametrize(
    ("draft_lengths", "error"),
    [
        (torch.tensor([K, K + 1]), ValueError),
        (torch.tensor([-1, K]), ValueError),
        (torch.tensor([K]), ValueError),
        (torch.tensor([[K], [K]]), ValueError),
        (torch.tensor([K, K, K]), ValueError),
        (torch.tensor([3.0, 3.0]), TypeError),
        ([K, K], TypeError),
    ],
    ids=["above-k", "negative", "short", "rank-2", "long", "float", "list"],
)
def test_bad_draft_lengths_are_rejected(draft_lengths, error):
    with pytest.raises(error, match="draft_lengths"):
        call(draft_lengths=draft_lengths)


# Generator and rule.


@pytest.mark.parametrize("generator", [None, 0, torch.Generator().manual_seed(0).get_state()])
def test_a_generator_that_is_not_a_torch_generator_is_rejected(generator):
    with pytest.raises(TypeError, match="generator"):
        call(generator=generator)


def test_the_generator_is_keyword_only_and_required():
    draft_tokens, draft_probs, target_probs = valid_inputs()
    with pytest.raises(TypeError):
        verify(draft_tokens, draft_probs, target_probs)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        verify(draft_tokens, draft_probs, target_probs, torch.Generator())  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_generator_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="generator"):
        call(generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("rule", ["tree", "Token", "", None])
def test_an_unknown_rule_is_rejected(rule):
    with pytest.raises(ValueError, match="rule"):
        call(rule=rule)


# SamplingConfig.


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1.0"),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", 3.0),
        ("top_k", True),
        ("min_p", -0.1),
        ("min_p", 1.0),
        ("min_p", math.nan),
    ],
)
def test_sampling_config_rejects_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0}, {"temperature": 2}, {"top_p": 1}, {"top_k": 0}, {"min_p": 0.0}],
)
def test_sampling_config_accepts_boundary_values(options):
    SamplingConfig(**options)
