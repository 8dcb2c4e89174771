"""The pass costs under the draft-length policy: batch buckets, StepCosts (its memory format,
padding, the relative cost curve), ragged passes, and the confidence bounds the schedule,
trim and pause rest on (their edges: no evidence, one step, rates at 1, exact ties)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence

import pytest

from specsample.engine.length import (
    PAD_GAIN,
    PAUSE_Z,
    PRIOR_KEPT,
    PRIOR_TESTS,
    TRIM_Z,
    StepCosts,
    _cost_ratio,
    _gain_upper_bound,
    _keep_rate_bound,
    _rate_upper_bound,
    _RowSchedule,
    batch_bucket,
    full_pass_equivalent,
    ragged_pass_cost,
)


def timed(passes: dict[int, list[float]], draft: Sequence[float] = ()) -> StepCosts:
    """StepCosts holding these target pass samples (seconds by tokens) and draft passes."""
    measured = StepCosts()
    for seconds in draft:
        measured.draft_step.add(seconds)
    for tokens, samples in passes.items():
        for seconds in samples:
            measured.add_target_pass(tokens, seconds)
    return measured


# ---------------------------------------------------------------- batch buckets


def test_batch_buckets_round_rows_up_to_a_power_of_two():
    """Costs are kept per bucket 1, 2, 4, 8, ...: a batch of rows uses the smallest bucket
    that holds it."""
    buckets = [batch_bucket(rows) for rows in (1, 2, 3, 4, 5, 8, 9)]
    assert buckets == [1, 2, 4, 4, 8, 8, 16]


# ---------------------------------------------------------------- the memory format


def test_step_costs_samples_round_trip_through_json():
    """samples() is what a CostMemory writes (JSON: string keys), from_samples() what it
    reads back: every draft and target pass sample comes back."""
    measured = timed({3: [2.0, 2.5], 1: [1.0]}, draft=[0.1, 0.2])
    written = measured.samples()
    assert written == {"draft_step": [0.1, 0.2], "target_pass": {"1": [1.0], "3": [2.0, 2.5]}}
    read = StepCosts.from_samples(json.loads(json.dumps(written)))
    assert list(read.draft_step.samples) == [0.1, 0.2] and read.draft_step.count == 2
    assert {n: list(r.samples) for n, r in read.target_pass.items()} == {1: [1.0], 3: [2.0, 2.5]}
    assert read.samples() == written


def test_an_entry_without_draft_or_target_samples_reads_as_none_timed():
    """A memory entry may lack either list (a drafter without a model times no draft pass):
    the missing costs read as none timed, not as an error."""
    no_drafts = StepCosts.from_samples({"verdict": True, "target_pass": {"1": [1.0]}})
    assert no_drafts.draft_step.count == 0 and no_drafts.target(1) == 1.0
    no_passes = StepCosts.from_samples({"verdict": None, "draft_step": [0.1]})
    assert no_passes.draft_step.value == 0.1 and no_passes.target_pass == {}


@pytest.mark.parametrize("bad", [-0.5, "inf", float("nan")])
def test_a_memory_entry_with_a_negative_or_infinite_time_is_rejected(bad):
    """Pass times must be seconds >= 0 and finite: a damaged memory raises ValueError (recall
    then skips the entry) instead of pricing passes at nonsense."""
    with pytest.raises(ValueError, match="expected a pass time in seconds >= 0"):
        StepCosts.from_samples({"draft_step": [bad]})
    with pytest.raises(ValueError, match="expected a pass time in seconds >= 0"):
        StepCosts.from_samples({"target_pass": {"1": [1.0, bad]}})


def test_a_memory_entry_with_zero_second_times_is_read():
    """0 s is a valid (if coarse) time: it is read, and the costs built on it stay defined
    (a 1-token pass at 0 s gives a draft cost ratio of 0 and a flat relative curve, no
    division by zero)."""
    zero = StepCosts.from_samples({"draft_step": [0.1], "target_pass": {"1": [0.0], "2": [0.0]}})
    assert zero.target(1) == 0.0 and zero.draft_step.value == 0.1
    assert _cost_ratio(zero) == 0.0
    assert zero.relative_pass_cost(1) == 1.0 and zero.relative_pass_cost(5) == 1.0


def test_the_draft_cost_ratio_is_zero_until_a_one_token_pass_is_timed():
    """c = draft pass / 1-token pass needs both: draft passes with no target pass timed yet
    give c = 0 (not an error), as does a drafter that times no draft pass."""
    assert _cost_ratio(timed({}, draft=[0.1])) == 0.0
    assert _cost_ratio(timed({1: [1.0]})) == 0.0
    assert _cost_ratio(timed({1: [0.5]}, draft=[0.1])) == pytest.approx(0.2)


# ---------------------------------------------------------------- padding and the cost curve


def test_pad_width_pads_to_a_wider_pass_exactly_pad_gain_cheaper():
    """The boundary of the padding rule: a trusted wider width costing at most 1 - PAD_GAIN of
    the pass's own cost is used, so exactly that much cheaper pads, a hair less does not."""
    assert PAD_GAIN == 0.1
    assert timed({3: [10.0] * 3, 4: [9.0] * 3}).pad_width(3) == 4
    assert timed({3: [10.0] * 3, 4: [9.01] * 3}).pad_width(3) == 3


def test_relative_pass_cost_interpolates_between_measured_lengths_for_the_cost_check():
    """interpolate=True (the cost check): a length between two measured ones costs the
    straight line between them, not the optimistic step."""
    measured = timed({1: [1.0], 5: [3.0]})
    assert measured.relative_pass_cost(3, interpolate=True) == pytest.approx(2.0)
    assert measured.relative_pass_cost(2, interpolate=True) == pytest.approx(1.5)
    assert measured.relative_pass_cost(4, interpolate=True) == pytest.approx(2.5)
    assert measured.relative_pass_cost(3) == pytest.approx(1.0)  # the optimistic step


def test_relative_pass_cost_is_flat_past_the_longest_without_a_one_token_pass():
    """With no 1-token pass timed there is no chord from 1 token: past the longest measured
    length the cost stays that length's (relative to the cheapest measured pass)."""
    measured = timed({2: [2.0], 5: [3.0]})
    assert measured.relative_pass_cost(5) == pytest.approx(1.5)
    assert measured.relative_pass_cost(9) == pytest.approx(1.5)
    assert measured.relative_pass_cost(40) == pytest.approx(1.5)


# ---------------------------------------------------------------- ragged passes


def test_a_ragged_pass_leaves_out_a_length_timed_only_once():
    """ragged_pass_cost reads the curve of trusted lengths (TRUST_SAMPLES timings): a length
    timed once, slowly, costs no more than the chord of the trusted ones says, so one slow
    pass does not price it out."""
    measured = timed({1: [1.0] * 3, 2: [1.5] * 3, 3: [3.0]})
    assert ragged_pass_cost(measured, 3.0) == pytest.approx(2.0)  # chord: 1.5 + 0.5
    assert ragged_pass_cost(measured, 2.5) == pytest.approx(1.75)


def test_a_ragged_pass_costs_one_pass_before_any_pass_is_timed():
    """No costs yet: every width is priced as a 1-token pass."""
    assert ragged_pass_cost(StepCosts(), 2.5) == 1.0
    assert ragged_pass_cost(StepCosts(), 4.0, longest=3) == 1.0


def test_a_ragged_pass_over_two_rows_is_kept_as_the_full_pass_it_stands_for():
    """Two fed rows, 3 tokens (one row drafted 1): the full 2-token pass over both rows, its
    extra time over a 1-token pass scaled to 2 extra tokens (not kept under its widest row)."""
    assert full_pass_equivalent(2, 1.2, 3, 2, 1.0) == (2, pytest.approx(1.4))
    assert full_pass_equivalent(3, 1.5, 5, 2, 1.0) == (3, pytest.approx(1.0 + 0.5 * 4 / 3))


def test_a_ragged_pass_that_fed_every_row_alike_is_kept_as_timed():
    """tokens = rows x width: it is the full pass, kept at its own time, also when it ran
    faster than the last 1-token pass (no floor at the single pass)."""
    assert full_pass_equivalent(2, 0.8, 4, 2, 1.0) == (2, 0.8)
    assert full_pass_equivalent(3, 1.3, 12, 4, 1.0) == (3, 1.3)


def test_a_pass_that_fed_one_row_is_kept_under_its_width():
    """One fed row is nothing ragged to spread over other rows: the pass is kept as the costs
    keep any pass, under its width and at its time."""
    assert full_pass_equivalent(2, 0.3, 3, 1, 0.1) == (2, 0.3)


# ---------------------------------------------------------------- bounds


def test_position_rates_fall_back_to_the_prior_without_tests_or_prior_weight():
    """A position with no tests and no prior weight left has no evidence at all: its rate is
    its prior (the given one, else 2/3), not a division by zero."""
    bare = _RowSchedule(k=1, prior_weight=0.0)
    assert bare.position_rates(2) == pytest.approx([PRIOR_KEPT / PRIOR_TESTS] * 2)
    assert bare.position_rates(2, [0.5, 0.4]) == pytest.approx([0.5, 0.4])


def wilson_gap(bound: float, share: float, tests: float) -> float:
    """Zero at Wilson's score bounds: (bound - share)^2 = z^2 bound (1 - bound) / tests."""
    return (bound - share) ** 2 - TRIM_Z**2 * bound * (1 - bound) / tests


@pytest.mark.parametrize(
    ("kept", "tests", "prior_weight"),
    [(0.0, 1.0, 0.0), (0.0, 0.5, 0.0), (1.0, 4.0, 0.0), (3.0, 5.0, 0.5), (0.0, 0.0, 1.0)],
)
def test_the_keep_rate_bound_is_wilsons_upper_score_bound(kept, tests, prior_weight):
    """The upper bound solves Wilson's score equation at TRIM_Z, above the share kept (the
    prior's PRIOR_KEPT of PRIOR_TESTS tests included at its weight), for any amount of
    evidence, a single test or less included."""
    state = _RowSchedule(k=1, kept_weight=kept, test_weight=tests, prior_weight=prior_weight)
    weight = tests + PRIOR_TESTS * prior_weight
    share = (kept + PRIOR_KEPT * prior_weight) / weight
    bound = _keep_rate_bound(state)
    assert share < bound < 1
    assert wilson_gap(bound, share, weight) == pytest.approx(0.0, abs=1e-12)


def test_the_keep_rate_bound_is_one_without_evidence_and_never_above_one():
    """No tests and no prior weight: any rate is plausible, the bound is 1. A row that kept
    every test is bounded by 1 exactly: a keep rate is a probability."""
    assert _keep_rate_bound(_RowSchedule(k=1, prior_weight=0.0)) == 1.0
    for tests in (0.5, 1.0, 1.25, 4.375, 9.0, 30.0):
        every = _RowSchedule(k=1, kept_weight=tests, test_weight=tests, prior_weight=0.0)
        assert _keep_rate_bound(every) <= 1.0
        assert _keep_rate_bound(every, prior=1.0) <= 1.0


def gain_state(steps: list[tuple[float, float]]) -> _RowSchedule:
    """A row's sums after these (tokens emitted, cost in 1-token passes) drafting steps,
    undecayed."""
    gains = [emitted - cost for emitted, cost in steps]
    return _RowSchedule(
        k=1,
        emitted_weight=sum(emitted for emitted, _ in steps),
        cost_weight=sum(cost for _, cost in steps),
        gain_squares=sum(g * g for g in gains),
        step_weight=len(steps),
        step_weight_squares=len(steps),
    )


def test_the_gain_bound_is_the_mean_gain_plus_pause_z_standard_errors():
    """lengths="costs" pauses a row when this bound is below 0. With equal weights it is the
    mean gain per step plus PAUSE_Z standard errors (population deviation / sqrt(steps)); one
    step alone is bounded by its own gain, and a row with no drafting step is never judged to
    lose (an infinite bound)."""
    steps = [(1.0, 3.0), (1.0, 5.0), (6.0, 2.5)]
    gains = [emitted - cost for emitted, cost in steps]
    expected = statistics.fmean(gains) + PAUSE_Z * statistics.pstdev(gains) / math.sqrt(3)
    assert _gain_upper_bound(gain_state(steps)) == pytest.approx(expected)
    two = [(1.0, 3.0), (1.0, 5.0)]  # gains -2, -4: mean -3, deviation 1
    assert _gain_upper_bound(gain_state(two)) == pytest.approx(-3 + PAUSE_Z / math.sqrt(2))
    assert _gain_upper_bound(gain_state([(1.0, 3.0)])) == pytest.approx(-2.0)
    assert _gain_upper_bound(_RowSchedule(k=1)) == math.inf


@pytest.mark.parametrize(("kept", "tests"), [(2, 4), (4, 6), (6, 8), (1, 3)])
def test_the_rate_upper_bound_is_a_rate_below_one_when_some_test_failed(kept, tests):
    """Clopper-Pearson: P(X <= kept | tests, bound) = 1 - level, with the bound in
    (kept / tests, 1) whenever a test failed."""
    bound = _rate_upper_bound(kept, tests, 0.95)
    cdf = sum(math.comb(tests, i) * bound**i * (1 - bound) ** (tests - i) for i in range(kept + 1))
    assert kept / tests < bound < 1
    assert cdf == pytest.approx(0.05, abs=1e-9)


def test_the_rate_upper_bound_without_tests_is_one():
    """No trials: every rate is plausible."""
    assert _rate_upper_bound(0, 0, 0.95) == 1.0


def test_the_rate_upper_bound_includes_a_rate_exactly_at_the_level():
    """The bound is the largest rate with P(X <= kept) >= 1 - level, equality included: 0 kept
    of 1 test at level 0.5 is bounded by 1 - a = 0.5, a = 0.5 exactly."""
    assert _rate_upper_bound(0, 1, 0.5) == 0.5
