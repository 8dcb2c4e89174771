"""The adaptive draft length's verdicts at their edges: the cost check (what it waits for, its
MARGIN, which draft lengths it weighs), the check of real drafting steps, the probe, and a
row's own verdict (the costs rule's gain accounting and its pause and resume thresholds, cut
steps, the theory's best k and the offered length on exact ties). Builders come from
test_length and test_fit_passes."""

from __future__ import annotations

import math

import pytest
from test_fit_passes import settled
from test_length import drafting_steps, lengths, warmed
from test_length_costs import timed

from specsample.engine.length import (
    EARLY_LEVEL,
    EARLY_TESTS,
    FIRST_SINGLE_PASSES,
    GUARD_STEPS,
    MARGIN,
    PAUSE_Z,
    PROBE_LENGTH,
    RETIME_BELOW,
    AdaptiveDraftLength,
    StepCosts,
    _expected_tokens,
    _gain_upper_bound,
    _rate_upper_bound,
)


def verdict(measured: StepCosts, max_k: int = 8, drafted: int = 1) -> bool | None:
    """The cost check's verdict for one row of a fresh policy after one step on these costs."""
    policy = AdaptiveDraftLength(max_k=max_k)
    policy.update(lengths(drafted), lengths(drafted), measured)
    return policy.can_pay


# ---------------------------------------------------------------- the cost check: what it needs


def test_the_cost_check_waits_for_three_one_token_passes_even_after_the_probe():
    """A verdict needs FIRST_SINGLE_PASSES (three) 1-token passes (the first ones after loading
    may be slow), however cheap the probe's passes look: with one fewer, no verdict; with the
    third, "yes"."""
    assert FIRST_SINGLE_PASSES == 3
    measured = timed({1: [1.0] * (FIRST_SINGLE_PASSES - 1), 5: [1.2, 1.2]}, draft=(0.1,) * 8)
    assert verdict(measured) is None
    measured.add_target_pass(1, 1.0)
    assert verdict(measured) is True


def test_a_no_waits_for_a_second_draft_pass():
    """One draft pass timed (it may include a lazy drafter's prefill) cannot say "no", even
    with every longer target pass length timed twice (and FIRST_SINGLE_PASSES 1-token passes);
    a second, as slow, can."""
    single = [1.0] * FIRST_SINGLE_PASSES
    measured = timed({1: single, 2: [1.9, 1.9], 5: [3.9, 3.9]}, draft=(2.0,))
    assert verdict(measured) is None
    measured.draft_step.add(2.0)
    assert verdict(measured) is False


def test_a_drafter_without_draft_passes_gets_a_no_from_the_pass_costs_alone():
    """An n-gram drafter records no draft pass (c = 0): nothing to wait for on the draft side,
    so a pass curve where each token costs about a 1-token pass (a compute-bound CPU) says "no"
    as soon as its longer passes were timed twice (after FIRST_SINGLE_PASSES 1-token passes)."""
    measured = timed({1: [1.0] * FIRST_SINGLE_PASSES, 2: [1.9, 1.9], 5: [5.0, 5.0]})
    assert measured.draft_step.count == 0
    assert verdict(measured) is False


# ---------------------------------------------------------------- the cost check: its lengths


def test_a_best_case_of_exactly_margin_over_target_only_is_a_no():
    """The "yes" needs some k with (k + 1) / (k c + r(k + 1)) above MARGIN: a draft pass half
    a 1-token pass, an 11-token pass five; 10 drafts, every one kept, give 11 tokens for 10
    passes' time, exactly MARGIN (1.1) times target-only, the best of any k. That is a "no"
    (a best case at MARGIN loses in practice); an 11-token pass a hair cheaper is a "yes"."""
    assert MARGIN == 1.1 and 11 / (10 * 0.5 + 5.0) == MARGIN  # exact in floating point
    single = [1.0] * FIRST_SINGLE_PASSES
    at_margin = timed({1: single, 5: [2.6, 2.6], 11: [5.0, 5.0]}, draft=(0.5, 0.5))
    assert verdict(at_margin, max_k=10) is False
    above = timed({1: single, 5: [2.6, 2.6], 11: [4.99, 4.99]}, draft=(0.5, 0.5))
    assert verdict(above, max_k=10) is True


@pytest.mark.parametrize(
    ("max_k", "passes", "draft", "only"),
    [
        # a 2-token pass almost free, longer ones dear: only one draft pays
        (8, {1: [1.0] * FIRST_SINGLE_PASSES, 2: [1.2], 5: [6.0]}, 0.1, 1),
        # a linear curve: (k + 1) / (1 + 0.87 k) passes MARGIN only from k = 3
        (4, {1: [1.0] * FIRST_SINGLE_PASSES, 5: [1.0 + 4 * 0.77]}, 0.1, 3),
        # max_k = 1: the one length there is
        (1, {1: [1.0] * FIRST_SINGLE_PASSES, 2: [1.2]}, 0.1, 1),
    ],
)
def test_a_yes_after_one_probe_weighs_every_draft_length(max_k, passes, draft, only):
    """A "yes" comes from one sample of the longer passes (no second one needed; the 1-token
    passes are the FIRST_SINGLE_PASSES the cost check always waits for), from any
    draft length in 1..max_k that pays: the shortest alone, only the longest ones, the one
    length max_k = 1 allows (`only`: the shortest that pays)."""
    measured = timed(passes, draft=(draft,))
    policy = AdaptiveDraftLength(max_k=max_k)
    paying = [
        k
        for k in range(1, max_k + 1)
        if (k + 1) / (k * draft + measured.relative_pass_cost(k + 1, interpolate=True)) > MARGIN
    ]
    assert paying and paying[0] == only
    policy.update(lengths(min(max_k, 4)), lengths(0), measured)
    assert policy.can_pay is True


@pytest.mark.parametrize("max_k", [1, 8])
def test_a_no_must_fail_at_the_fastest_draft_pass_for_every_length(max_k):
    """A slow first draft pass (2.0: a lazy drafter's prefill) and a fast one (0.05): the
    median says no draft length pays, but a "no" must hold at the fastest draft pass too, and
    there one draft (a 2-token pass 1.2, longer ones dear) pays: still "yes"."""
    single = [1.0] * FIRST_SINGLE_PASSES
    measured = timed({1: single, 2: [1.2, 1.2], 5: [6.0, 6.0]}, draft=(2.0, 0.05))
    assert verdict(measured, max_k=max_k) is True
    slow = timed({1: single, 2: [1.2, 1.2], 5: [6.0, 6.0]}, draft=(2.0, 2.0))
    assert verdict(slow, max_k=max_k) is False


def test_one_token_passes_timed_at_zero_seconds_leave_nothing_to_weigh():
    """1-token passes that read 0 seconds (a clock that did not tick) give no price to weigh
    drafting against: every pass is priced as one 1-token pass, and the cost check says "yes"
    (it neither divides by them nor stops drafting on them); the check of real drafting steps,
    which prices target-only at the fastest 1-token pass, does not judge (it stays "yes"
    whatever the steps took)."""
    measured = timed({1: [0.0] * FIRST_SINGLE_PASSES, 5: [0.3, 0.3]}, draft=(0.1, 0.1))
    policy = warmed(AdaptiveDraftLength(max_k=8), measured, rows=1)
    assert drafting_steps(policy, measured, 2 * GUARD_STEPS, [4], [4], 100.0) == [True] * (
        2 * GUARD_STEPS
    )


# ---------------------------------------------------------------- the check of real drafting steps


def test_real_steps_that_only_break_even_with_target_only_turn_the_verdict_to_no():
    """Each step of 4 drafts could emit 5 tokens and took 5 1-token passes' time: drafting
    gains nothing over target-only, so after GUARD_STEPS steps the verdict is "no" (as the cost
    check's "yes" needs more than break-even). A hair faster (4.99) keeps the "yes"."""
    measured = timed({1: [1.0] * FIRST_SINGLE_PASSES, 9: [1.0, 1.0]}, draft=(0.1, 0.1))
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    verdicts = drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 5.0)
    assert verdicts == [True] * (GUARD_STEPS - 1) + [False]
    measured = timed({1: [1.0] * FIRST_SINGLE_PASSES, 9: [1.0, 1.0]}, draft=(0.1, 0.1))
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    assert drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 4.99)[-1] is True


def test_with_retime_below_one_token_passes_timed_no_step_is_spent_retiming():
    """The target-only step before the judgment of real steps is taken only with fewer than
    RETIME_BELOW 1-token passes timed; with exactly RETIME_BELOW every step drafts."""
    measured = timed({1: [1.0] * RETIME_BELOW, 9: [1.0] * RETIME_BELOW}, draft=(0.1,) * 3)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    asked = []
    for _ in range(GUARD_STEPS + 1):
        asked.append(int(policy.next_lengths(1)))
        measured.last_step_seconds = 1.0
        policy.update(lengths(4), lengths(4), measured)
    assert all(asked) and policy.can_pay is True


# ---------------------------------------------------------------- the probe


@pytest.mark.parametrize("max_k", [1, 2, 3])
def test_the_probe_drafts_no_more_than_max_k(max_k):
    """After FIRST_SINGLE_PASSES target-only steps the probe drafts PROBE_LENGTH - 1 = 4
    tokens, or max_k where that is fewer, and a pass over max_k + 1 tokens is enough for the
    verdict."""
    policy, measured = AdaptiveDraftLength(max_k=max_k), StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, 1.0)
        policy.update(lengths(0), lengths(0), measured)
    assert int(policy.next_lengths(1)) == min(max_k, PROBE_LENGTH - 1)
    for _ in range(max_k):
        measured.draft_step.add(0.05)
    measured.add_target_pass(max_k + 1, 1.1)
    policy.update(lengths(max_k), lengths(max_k), measured)
    assert policy.can_pay is True


# ---------------------------------------------------------------- a row's verdict under "costs"


def test_a_rows_pause_bound_is_the_mean_gain_of_its_decayed_steps_plus_pause_z_errors():
    """Slow oracle for the costs rule's accounting: each drafting step gains accepted + 1 less
    its cost in 1-token passes, made c + r(drafted + 1) (r from trusted timings: the 4-token
    pass, timed once at a busy moment, costs what the trusted curve says; a step whose drafts
    were cut whole pays its draft passes and a 1-token pass); the pause bound is the weighted
    mean gain (weights decaying by 1 - smoothing a step) plus PAUSE_Z standard errors over the
    effective number of steps (sum w)^2 / sum w^2."""
    measured = timed(
        {1: [1.0] * 3, 2: [2.0] * 3, 5: [2.2] * 3, 9: [3.0] * 3, 4: [6.0]}, draft=(0.2,) * 3
    )
    verify = {0: 1.0, 3: 2.0, 4: 2.2}  # r(drafted + 1); 0: a target-only pass
    policy = settled(AdaptiveDraftLength(max_k=16, lengths="costs"), measured)
    decay = 1 - policy.smoothing
    gains, verified = [], []
    for made, kept in [(4, 4), (3, 0), (1, 1), (4, 2), (3, 3), (1, 0), (4, 1)]:
        assert int(policy.next_lengths([0])) >= made
        drafted = min(made, policy.trim([0], [made]))  # a 1-token draft is cut whole
        kept = min(kept, drafted)
        policy.update([0], lengths(drafted), lengths(kept), measured)
        verified.append(drafted)
        gains.append(kept + 1 - (made * 0.2 + verify[drafted]))
        weights = [decay ** (len(gains) - 1 - i) for i in range(len(gains))]
        total = sum(weights)
        mean = sum(w * g for w, g in zip(weights, gains, strict=True)) / total
        spread = sum(w * (g - mean) ** 2 for w, g in zip(weights, gains, strict=True)) / total
        steps = total**2 / sum(w * w for w in weights)
        bound = mean + PAUSE_Z * math.sqrt(spread / steps)
        assert _gain_upper_bound(policy.rows[0]) == pytest.approx(bound, abs=1e-9), gains
    assert set(verified) == {0, 3, 4}


def test_a_pass_length_timed_at_zero_seconds_is_priced_as_a_one_token_pass():
    """A cost that reads 0 (a 2-token pass timed once, at 0 seconds: a clock that did not
    tick) is no price: as where no pass was timed at all, it is taken as one 1-token pass, both
    in the longest draft the costs justify and in what a row's drafting step cost."""
    measured = timed({1: [1.0] * 3, 3: [3.0] * 3, 5: [5.0] * 3, 2: [0.0]}, draft=(0.5,) * 3)
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="costs"), measured)
    # (k + 1) / (0.5 k + r(k + 1)): one draft 2 / 1.5, more drafts at most 7 / 6
    assert int(policy.next_lengths([0])) == 1
    policy.update([0], lengths(1), lengths(1), measured)
    assert _gain_upper_bound(policy.rows[0]) == pytest.approx(2 - (0.5 + 1.0))  # one step


def exact_costs() -> StepCosts:
    """A draft pass half a 1-token pass, passes over 3 and 9 tokens two (trusted): 2 drafts
    cost exactly 3 passes (1 + 2), 3 drafts 3.5."""
    return timed({1: [1.0] * 3, 3: [2.0] * 3, 9: [2.0] * 3}, draft=(0.5,) * 3)


def test_a_row_whose_steps_break_even_keeps_drafting_and_pauses_once_they_lose():
    """Under "costs" a row pauses only once the upper bound of its mean gain is below 0
    (smoothing 1: the last step alone, with no spread, so the bound is its gain). A step that
    kept 2 of 2 emitted 3 tokens for exactly 3 passes' cost (gain 0): the row drafts on; a
    step that kept 0 of 2 (gain -2) pauses it."""
    measured = exact_costs()
    policy = settled(
        AdaptiveDraftLength(max_k=8, lengths="costs", smoothing=1.0, min_tests=1), measured
    )
    assert int(policy.next_lengths([0])) == 8
    policy.update([0], lengths(2), lengths(2), measured)
    assert _gain_upper_bound(policy.rows[0]) == 0.0 and not policy.rows[0].paused
    assert int(policy.next_lengths([0])) == 8
    policy.update([0], lengths(2), lengths(0), measured)
    assert policy.rows[0].paused


def test_a_paused_row_resumes_only_when_its_mean_gain_is_above_zero():
    """A paused row's probe that breaks even (2 of 2 kept: 3 tokens for 3 passes) leaves it
    paused; one that gains (3 of 3: 4 tokens for 3.5 passes) resumes it."""
    measured = exact_costs()
    policy = settled(
        AdaptiveDraftLength(max_k=8, lengths="costs", smoothing=1.0, min_tests=1, probe_every=1),
        measured,
    )
    policy.next_lengths([0])
    policy.update([0], lengths(2), lengths(0), measured)
    assert policy.rows[0].paused
    for drafted, still_paused in ((2, True), (3, False)):
        while not (offered := int(policy.next_lengths([0]))):  # target-only until the probe
            policy.update([0], lengths(0), lengths(0), measured)
        assert offered == 8  # the probe offers the cap
        policy.update([0], lengths(drafted), lengths(drafted), measured)
        assert policy.rows[0].paused is still_paused


def test_cut_steps_judge_a_row_at_its_early_tests_th_cut_step_and_not_before():
    """Under "costs" steps whose drafts were cut whole are evidence: once EARLY_TESTS of them
    were seen (here never EARLY_TESTS in a row, and no early pause by keep tests) the row is
    judged on its mean gain, which loses (each cut step costs its draft pass, each verified
    step of 3 drafts keeping 1 loses 0.6 passes): it pauses at the EARLY_TESTS-th cut step,
    not before."""
    assert EARLY_TESTS == 4
    measured = timed({1: [1.0] * 3, 2: [2.0] * 3, 5: [2.2] * 3, 9: [3.0] * 3}, draft=(0.2,) * 3)
    policy = settled(AdaptiveDraftLength(max_k=16, lengths="costs", early_tests=None), measured)
    state = policy.schedule(0)
    pauses = []
    for made in (1, 1, 3, 1, 3, 1):
        assert int(policy.next_lengths([0])) >= made
        drafted = min(made, policy.trim([0], [made]))
        assert drafted == (0 if made == 1 else made)  # one draft: cut whole
        policy.update([0], lengths(drafted), lengths(min(drafted, 1)), measured)
        pauses.append(state.paused)
    assert state.cut_steps == EARLY_TESTS and state.cut_streak < EARLY_TESTS
    assert pauses == [False] * 5 + [True]


# ---------------------------------------------------------------- exact ties


def test_an_early_pause_counts_a_length_that_only_breaks_even_as_not_paying():
    """Before min_tests a row pauses once even the upper EARLY_LEVEL bound a of its keep rate
    (0 kept of EARLY_TESTS tests) pays for no draft length. With a 2-token pass costing
    exactly 1 + a 1-token passes (no draft pass: an n-gram drafter) one draft at rate a
    breaks even, 1 + a tokens for 1 + a passes, which is not paying: the row pauses at its
    EARLY_TESTS-th test. A 2-token pass a hair cheaper pays at a: no early pause."""
    bound = _rate_upper_bound(0, EARLY_TESTS, EARLY_LEVEL)
    for two, pauses in ((1.0 + bound, True), ((1.0 + bound) * 0.999, False)):
        passes = {1: [1.0] * 3, 2: [two] * 3, 3: [3.0] * 3, 4: [4.0] * 3, 5: [5.0] * 3}
        measured = timed(passes)
        policy = warmed(AdaptiveDraftLength(max_k=8, lengths="theory"), measured, [0])
        for _ in range(EARLY_TESTS):
            assert int(policy.next_lengths([0])) >= 1
            policy.update([0], lengths(1), lengths(0), measured)
        assert policy.rows[0].tests_seen == EARLY_TESTS < policy.min_tests
        assert policy.rows[0].paused is pauses, two


def test_a_rows_best_k_is_the_shorter_of_equally_good_lengths():
    """Under "theory" a row's cap is its best k, the shorter on an exact tie (drafting that
    gains nothing over a shorter draft is not worth the draft passes). At the prior's rates
    (about 2/3), no draft pass, a 3-token pass costing exactly E(2) = 1 + a_0 + a_0 a_1
    1-token passes: 2 drafts give as many tokens per cost as none, one draft fewer (a 2-token
    pass costs 2). A joining row's best k is 0, so it drafts one token (its keep tests decide
    from there), not two."""
    policy = AdaptiveDraftLength(max_k=8, lengths="theory")
    scout = policy.rates(policy.schedule("scout"), 2)  # a joining row's rates: the prior's
    assert scout == pytest.approx([2 / 3, 2 / 3])
    even = _expected_tokens(scout)[2]
    passes = {1: [1.0] * 3, 2: [2.0] * 3, 3: [even] * 3, 4: [4.0] * 3, 5: [5.0] * 3}
    measured = timed(passes)
    warmed(policy, measured, [0])
    assert policy.next_lengths([1]).tolist() == [1]
    assert policy.rows[1].best_k == 0


def test_the_offered_length_is_the_longer_of_equally_good_lengths():
    """Under "costs" a row is offered the longest draft the costs justify, the longer on a
    tie: no draft pass, passes over 2, 3 and 4 tokens costing 1, 1.5 and 2 1-token passes
    give 2 tokens per pass for 1, 2 or 3 drafts alike: max_k = 3 is offered."""
    measured = timed({1: [1.0] * 3, 2: [1.0] * 3, 3: [1.5] * 3, 4: [2.0] * 3})
    policy = warmed(AdaptiveDraftLength(max_k=3, lengths="costs"), measured, [0])
    assert policy.next_lengths([0]).tolist() == [3]


def test_the_offered_length_is_at_least_one_draft_while_the_verdict_says_yes():
    """The offered length is the best k in 1..max_k, never 0, even where the costs now price
    every length above target-only: stopping drafting is the verdict's business, and costs
    that cannot tell (each longer pass timed once) keep the last verdict, "yes". Under them
    the best is 9 drafts (10 tokens for 4.5 + 6 passes)."""
    policy = warmed(AdaptiveDraftLength(max_k=16, lengths="costs"), exact_costs(), [0])
    dear = timed({1: [1.0] * FIRST_SINGLE_PASSES, 2: [3.0], 5: [6.0]}, draft=(0.5, 0.5))
    policy.update([0], lengths(1), lengths(1), dear)
    assert policy.can_pay is True and not policy.rows[0].paused
    assert policy.next_lengths([0]).tolist() == [9]
