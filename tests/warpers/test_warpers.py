"""logits_to_probs: temperature, top-k, top-p and min-p, in that documented order, then softmax."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import WARPED_DTYPES
from specsample import SamplingConfig, logits_to_probs
from specsample.warpers import apply_min_p, apply_top_k, apply_top_p

NEG_INF = float("-inf")


def logits_of(probs):
    """float64 log-probabilities: softmax gives probs back."""
    return torch.tensor(probs, dtype=torch.float64).log()


def kept(probs):
    return (probs > 0).nonzero()[:, -1].tolist()


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.3, 10.0])
def test_temperature_scaling_equals_softmax_of_logits_over_temperature(temperature):
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingConfig(temperature=temperature))
    assert torch.allclose(probs, torch.softmax(logits / temperature, dim=-1), rtol=1e-12, atol=0)


def test_default_config_is_plain_softmax():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(logits_to_probs(logits), torch.softmax(logits, dim=-1))


def test_temperature_zero_is_one_hot_on_the_argmax_lowest_id_on_ties():
    logits = torch.tensor(
        [
            [0.5, 2.0, -1.0, 2.0],  # tie between ids 1 and 3
            [3.0, 3.0, 3.0, 3.0],  # all tied
            [NEG_INF, NEG_INF, -7.0, NEG_INF],
            [1.0, 0.0, 0.0, 9.0],
        ]
    )
    probs = logits_to_probs(logits, SamplingConfig(temperature=0, top_k=2, top_p=0.5))
    expected = torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 3]), 4).float()
    assert torch.equal(probs, expected)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -2.0, 1.5, 0.7, 2.2], dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingConfig(top_k=3))
    assert kept(probs) == [1, 3, 5]
    assert torch.allclose(probs[[1, 3, 5]], torch.softmax(logits[[1, 3, 5]], dim=0), rtol=1e-12)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Documented: ties with the k-th largest logit are kept, so more than k tokens may remain."""
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])
    probs = logits_to_probs(logits, SamplingConfig(top_k=2))
    assert kept(probs) == [0, 2, 3, 5]


@pytest.mark.parametrize("top_k", [0, 6, 100])
def test_top_k_zero_or_at_least_the_vocabulary_keeps_everything(top_k):
    logits = torch.randn(6, generator=torch.Generator().manual_seed(2))
    probs = logits_to_probs(logits, SamplingConfig(top_k=top_k))
    assert torch.allclose(probs, torch.softmax(logits, dim=-1))


@pytest.mark.parametrize(
    ("top_p", "expected_kept"),
    [
        (1e-9, [0]),  # always at least one token
        (0.4, [0]),  # 0.5 alone reaches 0.4
        (0.75, [0, 1]),  # 0.5 + 0.3 = 0.8 is the first to reach 0.75
        (0.9, [0, 1, 2]),
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_reaching_top_p(top_p, expected_kept):
    probs = logits_to_probs(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingConfig(top_p=top_p))
    assert kept(probs) == expected_kept
    original = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)[expected_kept]
    assert torch.allclose(probs[expected_kept], original / original.sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("top_p", "expected_kept"),
    [(0.5, [0]), (0.75, [0, 1])],
    ids=["reached-by-the-first", "reached-by-the-first-two"],
)
def test_top_p_stops_at_the_token_whose_mass_reaches_top_p_exactly(dtype, top_p, expected_kept):
    """(1/2, 1/4, 1/4) are exact in binary: the running mass reaches top_p exactly, and the
    tokens after that point are dropped (keeping one more would not be the smallest set)."""
    logits = logits_of([0.5, 0.25, 0.25]).to(dtype)
    sorted_probs = torch.softmax(logits, dim=-1)
    assert sorted_probs.tolist() == [0.5, 0.25, 0.25]  # the boundary is exact, not rounded
    probs = logits_to_probs(logits, SamplingConfig(top_p=top_p))
    assert kept(probs) == expected_kept
    assert kept(apply_top_p(logits, top_p).exp()) == expected_kept


def test_top_p_works_on_unsorted_ids_and_keeps_one_token_per_row():
    logits = logits_of([[0.05, 0.3, 0.5, 0.15], [0.97, 0.01, 0.01, 0.01]])
    probs = logits_to_probs(logits, SamplingConfig(top_p=0.75))
    assert (probs > 0).tolist() == [[False, True, True, False], [True, False, False, False]]


def test_min_p_keeps_tokens_at_least_min_p_times_the_largest():
    """Largest 0.5, min_p 0.2: the floor is 0.1, so 0.15 stays and 0.05 goes."""
    probs = logits_to_probs(logits_of([0.05, 0.5, 0.15, 0.3]), SamplingConfig(min_p=0.2))
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3], dtype=torch.float64) / 0.95
    assert torch.allclose(probs, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_min_p_keeps_a_token_exactly_at_the_floor(dtype):
    """(1/2, 1/4, 1/4) with min_p 1/2: the floor is exactly 1/4, and "at least" keeps it."""
    logits = logits_of([0.5, 0.25, 0.25]).to(dtype)
    assert torch.softmax(logits, dim=-1).tolist() == [0.5, 0.25, 0.25]  # exact, not rounded
    assert kept(logits_to_probs(logits, SamplingConfig(min_p=0.5))) == [0, 1, 2]
    assert kept(logits_to_probs(logits, SamplingConfig(min_p=0.51))) == [0]


def test_min_p_floor_is_taken_per_row():
    """Each row's floor comes from its own largest probability, not the batch's."""
    logits = logits_of([[0.9, 0.05, 0.05, 0.0], [0.4, 0.3, 0.2, 0.1]])
    probs = logits_to_probs(logits, SamplingConfig(min_p=0.3))
    assert (probs > 0).tolist() == [[True, False, False, False], [True, True, True, False]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_p_one_and_min_p_zero_keep_even_tokens_whose_mass_rounds_away(dtype):
    """The largest probability rounds to exactly 1, so the mass before the tiny tokens is 1: top-p
    at 1 must not run at all (it would drop them), and they keep their probability."""
    logits = torch.tensor([0.0, -40.0, -41.0], dtype=dtype)
    assert float(torch.softmax(logits, dim=-1)[0]) == 1.0
    probs = logits_to_probs(logits, SamplingConfig(top_p=1.0, min_p=0.0))
    assert kept(probs) == [0, 1, 2]
    assert torch.equal(probs, torch.softmax(logits, dim=-1))


def test_temperature_is_applied_before_top_p():
    """At T = 2 the probabilities (0.5, 0.3, 0.15, 0.05) flatten to about (0.38, 0.29, 0.21,
    0.12): top-p 0.75 then keeps three tokens; on the unscaled ones it would keep two."""
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(logits, SamplingConfig(temperature=2.0, top_p=0.75))
    assert kept(probs) == [0, 1, 2]
    assert kept(torch.softmax(apply_top_p(logits, 0.75) / 2, dim=-1)) == [0, 1]
    scaled = torch.softmax(logits[:3] / 2, dim=-1)
    assert torch.allclose(probs[:3], scaled, rtol=1e-12)


def test_top_k_is_applied_before_top_p():
    """top-k 2 leaves (0.625, 0.375), where top-p 0.6 keeps one token; top-p 0.6 first would
    keep two (0.5 + 0.3) and top-k 2 would keep both."""
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(logits, SamplingConfig(top_k=2, top_p=0.6))
    assert kept(probs) == [0]
    assert kept(torch.softmax(apply_top_k(apply_top_p(logits, 0.6), 2), dim=-1)) == [0, 1]


def test_top_p_is_applied_before_min_p():
    """(0.4, 0.3, 0.2, 0.1): top-p 0.75 keeps three tokens (0.4 + 0.3 < 0.75) and min-p 0.3
    (floor 0.12) keeps the same three. min-p first would drop 0.1 and renormalise to (0.44, 0.33,
    0.22), where top-p 0.75 keeps only two."""
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    probs = logits_to_probs(logits, SamplingConfig(top_p=0.75, min_p=0.3))
    assert kept(probs) == [0, 1, 2]
    assert kept(torch.softmax(apply_top_p(apply_min_p(logits, 0.3), 0.75), dim=-1)) == [0, 1]


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(),
        SamplingConfig(temperature=0.3),
        SamplingConfig(temperature=0),
        SamplingConfig(top_k=3),
        SamplingConfig(top_p=0.9),
        SamplingConfig(min_p=0.05),
        SamplingConfig(temperature=1.7, top_k=5, top_p=0.95, min_p=0.01),
    ],
)
def test_minus_infinity_logits_stay_at_probability_zero(config):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 10, generator=g)
    logits[:, [0, 7]] = NEG_INF
    logits[0, 2:] = NEG_INF  # row 0: only id 1 is possible
    probs = logits_to_probs(logits, config)
    assert not bool(probs.isnan().any())
    assert bool((probs[:, [0, 7]] == 0).all())
    assert bool((probs[0, 2:] == 0).all()) and float(probs[0, 1]) == 1.0
    assert torch.allclose(probs.sum(-1), torch.ones(8))


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 4, 7), (2, 1, 3, 7)])
@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(),
        SamplingConfig(temperature=0),
        SamplingConfig(temperature=0.8, top_k=3, top_p=0.9, min_p=0.1),
    ],
)
def test_batch_shapes_are_preserved(shape, config):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    probs = logits_to_probs(logits, config)
    assert probs.shape == shape
    assert torch.allclose(probs.sum(-1), torch.ones(shape[:-1]))
    # Each row is warped on its own: the same as warping the rows one at a time.
    rows = logits.reshape(-1, shape[-1])
    one_by_one = torch.stack([logits_to_probs(row, config) for row in rows])
    assert torch.allclose(probs.reshape(-1, shape[-1]), one_by_one)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    WARPED_DTYPES,
)
@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=0)])
def test_output_is_float32_or_float64_for_float64_input(dtype, expected, config):
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert logits_to_probs(logits, config).dtype == expected


def test_float64_precision_is_kept():
    logits = torch.tensor([0.0, math.log(1e-20)], dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingConfig(top_p=1.0))
    assert float(probs[1]) == pytest.approx(1e-20, rel=1e-12)


@pytest.mark.parametrize("logits", [[1, 2, 3], torch.tensor([1, 2, 3]), None])
def test_non_float_logits_are_rejected_naming_them(logits):
    with pytest.raises(TypeError, match="logits"):
        logits_to_probs(logits)
