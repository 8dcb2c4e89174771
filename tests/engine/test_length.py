"""Draft length policies: fixed k, and the adaptive policy (cost check, per-row schedule, pause)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from specsample.analysis.theory import expected_speedup
from specsample.engine.length import (
    EARLY_LEVEL,
    EARLY_TESTS,
    EXPLORE_REACH,
    FIRST_SINGLE_PASSES,
    GUARD_STEPS,
    PAUSE_LEVEL,
    PAUSE_Z,
    PROBE_ATTEMPTS,
    PROBE_LENGTH,
    RETIME_BELOW,
    RETIME_MARGIN,
    TRIM_LEVEL,
    TRIM_Z,
    TRUST_SAMPLES,
    AdaptiveDraftLength,
    FixedDraftLength,
    StepCosts,
    _rate_upper_bound,
)


def costs(draft_step: float, target_pass: float = 1.0) -> StepCosts:
    """Measured costs: a draft step, and a target pass that costs the same on 1 or 9 tokens (the
    1-token pass timed FIRST_SINGLE_PASSES times, the draft step and the 9-token pass twice:
    enough for the cost check to decide)."""
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        measured.add_target_pass(1, target_pass)
    for _ in range(2):
        measured.draft_step.add(draft_step)
        measured.add_target_pass(9, target_pass)
    return measured


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def paused(policy: AdaptiveDraftLength) -> list[bool]:
    """Each row's pause flag (rows are numbered 0..batch-1 when next_lengths gets an int)."""
    return [policy.rows[row].paused for row in sorted(policy.rows)]


def schedules(policy: AdaptiveDraftLength) -> list[int]:
    return [policy.rows[row].k for row in sorted(policy.rows)]


def alphas(policy: AdaptiveDraftLength) -> list[float | None]:
    return [policy.rows[row].alpha for row in sorted(policy.rows)]


def warmed(policy: AdaptiveDraftLength, measured: StepCosts, rows=2) -> AdaptiveDraftLength:
    """Runs the policy's first, target-only step with costs that already hold a multi-token pass
    under which drafting can pay: the cost check is settled, the rows' schedules untouched."""
    ids = list(range(rows)) if isinstance(rows, int) else rows
    assert policy.next_lengths(ids).tolist() == [0] * len(ids)
    policy.update(ids, lengths(*[0] * len(ids)), lengths(*[0] * len(ids)), measured)
    assert policy.can_pay
    return policy


# ---------------------------------------------------------------- fixed


@pytest.mark.parametrize("k", [0, 1, 4])
def test_fixed_length_always_gives_k(k):
    policy = FixedDraftLength(k)
    assert policy.next_lengths(3).tolist() == [k] * 3
    policy.update(lengths(k, k, k), lengths(0, 0, 0), costs(0.9))
    assert policy.next_lengths(2).tolist() == [k] * 2


@pytest.mark.parametrize("k", [-1, 2.0, True, None])
def test_fixed_length_rejects_anything_but_a_non_negative_int(k):
    with pytest.raises(ValueError, match="^k: expected an integer >= 0"):
        FixedDraftLength(k)


# ---------------------------------------------------------------- adaptive: the cost check


def test_adaptive_first_times_target_passes_then_probes():
    """Steps 1 to FIRST_SINGLE_PASSES (3) are target-only (1-token passes, free), then the probe
    (4 drafts per row, a 5-token pass); until it was timed, no verdict, and a "yes" comes after
    one probe. The rows' schedules follow their keep tests meanwhile."""
    assert FIRST_SINGLE_PASSES == 3
    policy = AdaptiveDraftLength(max_k=8, start_k=3)
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):  # fewer 1-token passes timed: one more
        assert policy.next_lengths(2).tolist() == [0, 0]
        measured.add_target_pass(1, 1.0)
        policy.update(lengths(0, 0), lengths(0, 0), measured)
        assert policy.can_pay is None
    assert policy.next_lengths(2).tolist() == [4, 4]  # the probe
    # The drafter drafted nothing (e.g. its confidence stop): no multi-token pass timed yet.
    policy.update(lengths(0, 0), lengths(0, 0), measured)
    assert policy.can_pay is None
    assert policy.next_lengths(2).tolist() == [4, 4]  # the probe again
    for _ in range(4):
        measured.draft_step.add(0.1)
    measured.add_target_pass(5, 1.1)
    policy.update(lengths(4, 4), lengths(4, 1), measured)
    assert policy.can_pay is True
    assert schedules(policy) == [6, 2]  # from start_k 3: doubled; halved (not below 1 + 1)
    # the step drafts within them, no deeper than the batch's best depth
    assert (policy.next_lengths(2) <= torch.tensor(schedules(policy))).all()


def test_a_probe_whose_drafts_stop_short_is_tried_a_few_times():
    """A drafter that stops early (its confidence stop, an n-gram drafter without a match)
    may never draft the probe's 4 tokens: after PROBE_ATTEMPTS probe steps the verdict uses
    the lengths measured."""
    policy = AdaptiveDraftLength(max_k=8)
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, 1.0)
        policy.update(lengths(0), lengths(0), measured)
    for _ in range(PROBE_ATTEMPTS):
        assert policy.can_pay is None
        assert int(policy.next_lengths(1)) == PROBE_LENGTH - 1
        measured.draft_step.add(0.1)
        measured.add_target_pass(2, 1.5)  # one draft, then the drafter stopped
        policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is True  # (1 + 1) / (0.1 + 1.5) > 1


# llama.cpp on 2 CPU cores (1.5B target, 0.5B draft): seconds of a draft pass, and of a target
# pass by the tokens it scores
LLAMACPP_DRAFT, LLAMACPP_PASSES = 0.0215, {1: 0.048, 2: 0.083, 5: 0.187}  # (2: not asked)


def llamacpp_cost_check(measured: StepCosts, *policies: AdaptiveDraftLength) -> list[int]:
    """Runs the policies through their cost check for one row on llama.cpp's 2-core costs
    (into `measured`), every draft kept; each step every policy must ask the same length and
    none may be stopped yet: FIRST_SINGLE_PASSES target-only steps and two probes. Returns the
    lengths asked."""
    schedule = []
    for _ in range(FIRST_SINGLE_PASSES + 2):
        asked = {int(policy.next_lengths(1)) for policy in policies}
        assert len(asked) == 1 and not any(policy.stopped for policy in policies)
        k = asked.pop()
        schedule.append(k)
        for _ in range(k):
            measured.draft_step.add(LLAMACPP_DRAFT)
        measured.add_target_pass(k + 1, LLAMACPP_PASSES[k + 1])
        for policy in policies:
            policy.update(lengths(k), lengths(k), measured)
    return schedule


def test_adaptive_stops_drafting_in_five_steps_where_no_draft_length_can_pay():
    """The pass costs measured with llama.cpp on 2 CPU cores (1.5B target, 0.5B draft): a
    draft pass 0.45 of a 1-token target pass and a 5-token pass 3.9 of it (between them a
    2-token pass is priced 1.73, as measured). Even with every draft kept, k drafts give
    (k + 1) / (0.45 k + r(k + 1)) < 1 for every k: after three target-only steps
    (FIRST_SINGLE_PASSES) and two probe steps of four drafts (a "no" needs two samples) the
    policy goes target-only, whatever the acceptance, and drafts one token after recheck_every
    steps to measure again, then after twice as many."""
    recheck = 16
    policy = AdaptiveDraftLength(max_k=16, recheck_every=recheck)
    measured = StepCosts()
    # every draft kept: does not matter
    assert llamacpp_cost_check(measured, policy) == [0, 0, 0, 4, 4]
    assert policy.can_pay is False
    schedule = [int(policy.next_lengths(1)) for _ in range(7 * recheck)]
    rechecks = [step for step, k in enumerate(schedule) if k]
    assert rechecks == [recheck - 1, 3 * recheck - 1, 7 * recheck - 1]  # gaps 16, 32, 64
    # By default the verdict stands: no recheck (each would make the draft catch up).
    default = AdaptiveDraftLength(max_k=16)
    default.update(lengths(1), lengths(1), measured)
    assert default.can_pay is False
    assert sum(int(default.next_lengths(1)) for _ in range(2000)) == 0
    # The same target costs with a cheap draft (c = 0.05: a small drafter on a fast machine).
    cheap = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        cheap.add_target_pass(1, 0.048)
    for _ in range(2):
        cheap.draft_step.add(0.0024)
        cheap.add_target_pass(2, 0.05)
    cheap.add_target_pass(5, 0.06)
    policy.update(lengths(1), lengths(1), cheap)
    assert policy.can_pay is True


def test_a_no_stands_while_the_target_only_passes_drift():
    """After a "no" only 1-token passes are timed; when the machine slows down for a while
    their median rises and the same costs, checked afresh, would say yes (each flip makes the
    draft catch up). The verdict stands until a step drafts again (a recheck)."""
    measured = StepCosts()
    policy = AdaptiveDraftLength(max_k=16)
    assert llamacpp_cost_check(measured, policy) == [0, 0, 0, 4, 4]
    assert policy.can_pay is False
    for _ in range(40):  # the machine slows down: 1-token passes now take 70 ms
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, 0.070)
        policy.update(lengths(0), lengths(0), measured)
    assert policy.can_pay is False
    fresh = AdaptiveDraftLength(max_k=16)
    fresh.update(lengths(1), lengths(1), measured)
    assert fresh.can_pay is True  # the drifted costs alone would say yes
    # a step that drafts (a recheck) lets the costs decide again
    policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is True


def test_stopped_means_no_drafting_at_any_batch_size_and_no_recheck():
    """`stopped` (the engine then releases the draft model): a "no" for one row, which carries
    to every bigger batch, and no rechecks. A "no" for 8 rows alone leaves one row drafting."""
    measured = StepCosts()
    policy, rechecking = AdaptiveDraftLength(max_k=16), AdaptiveDraftLength(16, recheck_every=8)
    assert llamacpp_cost_check(measured, policy, rechecking) == [0, 0, 0, 4, 4]
    assert policy.can_pay is False and policy.stopped
    assert rechecking.can_pay is False and not rechecking.stopped
    eight = AdaptiveDraftLength(max_k=16)
    eight.verdicts = {1: True, 8: False}
    assert not eight.stopped


def test_adaptive_cost_check_needs_two_samples_to_say_no():
    """One slow first draft pass (a warm-up, or a lazy drafter's prefill) would make drafting
    look hopeless: a "no" waits for a second sample and must hold with the fastest draft pass
    seen too."""
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        measured.add_target_pass(1, 1.0)
    measured.draft_step.add(5.0)  # warm-up
    measured.add_target_pass(2, 1.05)
    policy = AdaptiveDraftLength(max_k=8)
    policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is None
    measured.draft_step.add(0.05)
    measured.add_target_pass(2, 1.05)
    measured.add_target_pass(5, 1.2)  # the probe
    assert measured.draft_step.value == pytest.approx(2.525)  # the median alone says no
    policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is True
    measured.draft_step.add(3.0)
    measured.draft_step.add(3.0)
    policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is True  # still: the fastest draft pass seen is 0.05
    slow = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        slow.add_target_pass(1, 1.0)
    for _ in range(2):
        slow.add_target_pass(2, 1.05)
        slow.draft_step.add(2.0)
    policy.update(lengths(1), lengths(1), slow)
    assert policy.can_pay is not False  # no 5-token pass yet: a "no" waits for one
    slow.add_target_pass(5, 1.2)
    policy.update(lengths(1), lengths(1), slow)
    assert policy.can_pay is False


def test_adaptive_cost_check_matches_the_theory_at_alpha_one():
    """The verdict is True exactly when the theory's speedup at alpha = 1 exceeds 1 for some k,
    with the extrapolated pass costs."""
    for c in (0.0, 0.1, 0.3, 0.45, 0.8):
        for two in (1.0, 1.3, 1.73, 2.2):
            measured = StepCosts()
            for _ in range(FIRST_SINGLE_PASSES):
                measured.add_target_pass(1, 1.0)
            for _ in range(2):
                measured.add_target_pass(2, two)
                measured.draft_step.add(c)
            measured.add_target_pass(5, 1.0 + 4 * (two - 1.0))  # the probe, on the chord
            policy = AdaptiveDraftLength(max_k=8)
            policy.update(lengths(1), lengths(1), measured)
            best = max(
                (k + 1) / (k * c + measured.relative_pass_cost(k + 1, interpolate=True))
                for k in range(1, 9)
            )
            assert policy.can_pay is (best > 1.0), (c, two)


# ---------------------------------------------------------------- adaptive: per-row schedule


def test_adaptive_grows_after_full_acceptance_and_shrinks_after_rejection():
    policy = warmed(AdaptiveDraftLength(max_k=6, start_k=3), costs(0.05), rows=4)
    assert policy.next_lengths(4).tolist() == [3, 3, 3, 3]
    # rows: all kept, one rejected, the first rejected, did not draft (left as it was)
    policy.update(lengths(3, 3, 3, 0), lengths(3, 2, 0, 0), costs(0.05))
    # doubled; one more than kept (2 of 3); halved (to 1); untouched
    assert schedules(policy) == [6, 3, 1, 3]
    assert not any(paused(policy))


def test_adaptive_start_k_defaults_to_four_within_max_k():
    assert AdaptiveDraftLength(max_k=8).start_k == 4
    assert AdaptiveDraftLength(max_k=2).start_k == 2
    assert AdaptiveDraftLength(max_k=3, start_k=5).start_k == 3
    policy = AdaptiveDraftLength(max_k=8)
    policy.update(lengths(0), lengths(0), costs(0.05))
    policy.update(lengths(0), lengths(0), costs(0.05))  # the cost steps drafted nothing
    assert policy.next_lengths(1).tolist() == [4]


def test_adaptive_length_stays_within_one_and_max_k():
    policy = warmed(AdaptiveDraftLength(max_k=3, start_k=2), costs(0.05), rows=5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafted = policy.next_lengths(5)
        assert bool(((drafted >= 1) & (drafted <= 3)).all())
        accepted = (torch.rand(5, generator=generator) * (drafted + 1)).long()
        policy.update(drafted, accepted, StepCosts())  # no measured costs: never pauses
    assert not any(paused(policy))


def test_adaptive_reaches_both_ends_and_stays_there():
    policy = warmed(AdaptiveDraftLength(max_k=3, start_k=2), costs(0.05))
    for _ in range(5):
        k = policy.next_lengths(2)
        policy.update(k, torch.stack([k[0], torch.tensor(0)]), StepCosts())
    assert policy.next_lengths(2).tolist() == [3, 1]


# ---------------------------------------------------------------- adaptive: pause and resume


def test_adaptive_does_not_pause_when_drafting_pays():
    policy = warmed(AdaptiveDraftLength(max_k=4, start_k=2, min_tests=1), costs(0.05))
    k = policy.next_lengths(2)
    assert k.tolist() == [2, 2]
    policy.update(k, lengths(1, 2), costs(0.05))  # cheap drafts, acceptance 3/4
    assert not any(paused(policy))
    assert policy.next_lengths(2).tolist() == [2, 4]


def test_adaptive_pauses_with_probes_when_drafting_does_not_pay():
    """c = 0.8 with passes that cost the same on 1 or 9 tokens: drafting can pay (alpha = 1
    gives up to 5 tokens for 4.2 passes, above the cost check's MARGIN), but not at the
    acceptance measured. Paused rows probe with one token after probe_every steps, then after
    twice as many, ..."""
    probe_every = 4
    slow = costs(0.8)
    policy = AdaptiveDraftLength(max_k=4, start_k=2, probe_every=probe_every, min_tests=1)
    warmed(policy, slow, rows=3)
    # At the prior's alpha (2/3) one draft does not pay with c = 0.8 ((1 + 2/3) / 1.8 < 1), but
    # before its own keep tests a row drafts at least one token.
    assert policy.next_lengths(3).tolist() == [1, 1, 1]
    policy.update(lengths(1, 1, 1), lengths(0, 0, 0), slow)  # nothing kept
    assert policy.can_pay and all(paused(policy))
    # 0 of 1 kept, with the prior's 2 of 3 after one decay step (0.8)
    assert alphas(policy) == [pytest.approx(1.6 / (1 + 2.4))] * 3
    schedule = []
    for _ in range(7 * probe_every):
        k = policy.next_lengths(3)
        schedule.append(int(k.max()))
        assert k.tolist() in ([0, 0, 0], [1, 1, 1])  # all rows target-only, or all probe
        policy.update(k, lengths(0, 0, 0), slow)  # probes rejected again
    probes = [step for step, value in enumerate(schedule) if value == 1]
    assert probes == [probe_every - 1, 3 * probe_every - 1, 7 * probe_every - 1]
    assert all(paused(policy))


def test_adaptive_resumes_when_one_token_probes_show_high_acceptance():
    """The prior fades like an old step, so one-token probes alone can lift a row's estimate
    past what the theory needs with c = 0.85 (above 0.85 at the first position: one draft then
    pays, (1 + a_0) / 1.85 > 1)."""
    policy = AdaptiveDraftLength(max_k=8, start_k=2, probe_every=2, min_tests=1)
    slow = costs(0.85)
    policy.update(lengths(0, 0), lengths(0, 0), slow)
    policy.update(lengths(1, 1), lengths(0, 0), slow)
    assert all(paused(policy))
    resumed_at_alpha = None
    for _ in range(1000):
        k = policy.next_lengths(2)
        if not any(paused(policy)):
            resumed_at_alpha = min(policy.rates(policy.rows[row], 1)[0] for row in (0, 1))
            break
        assert int(k.max()) <= 1
        policy.update(k, k, slow)  # every probe kept
    assert resumed_at_alpha is not None, "never resumed drafting"
    best = max(expected_speedup(min(resumed_at_alpha, 0.999), k, 0.85) for k in range(1, 9))
    assert resumed_at_alpha > 0.85 and best > 1.0
    assert bool((policy.next_lengths(2) >= 1).all())


def test_adaptive_ignores_steps_without_drafts():
    policy = AdaptiveDraftLength(max_k=4, start_k=2)
    policy.next_lengths(2)
    policy.update(lengths(0, 0), lengths(0, 0), costs(0.05))
    policy.next_lengths(2)
    policy.update(lengths(0, 0), lengths(0, 0), costs(0.05))
    assert alphas(policy) == [None, None] and not any(paused(policy))
    assert policy.next_lengths(2).tolist() == [2, 2]


# ---------------------------------------------------------------- costs and arguments


def test_step_costs_read_the_nearest_measured_pass():
    measured = StepCosts()
    assert measured.target(1) is None
    measured.add_target_pass(1, 1.0)
    measured.add_target_pass(1, 3.0)
    measured.add_target_pass(5, 10.0)
    assert measured.target(1) == 2.0
    assert measured.target(2) == 2.0
    assert measured.target(4) == 10.0
    assert measured.target(50) == 10.0


def test_step_costs_are_the_median_of_the_recent_samples():
    measured = StepCosts()
    for seconds in (9.0, 1.0, 1.2, 1.1):  # one slow first pass (a warm-up)
        measured.add_target_pass(1, seconds)
    assert measured.target(1) == pytest.approx(1.15)
    for _ in range(16):  # the machine got slower: the window follows it
        measured.add_target_pass(1, 2.0)
    assert measured.target(1) == 2.0
    assert measured.target_pass[1].count == 20


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_k": 0}, "max_k"),
        ({"max_k": True}, "max_k"),
        ({"max_k": 2.0}, "max_k"),
        ({"start_k": 0}, "start_k"),
        ({"start_k": 1.5}, "start_k"),
        ({"probe_every": 0}, "probe_every"),
        ({"recheck_every": 0}, "recheck_every"),
        ({"recheck_every": 2.5}, "recheck_every"),
        ({"early_tests": 0}, "early_tests"),
        ({"early_tests": True}, "early_tests"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"lengths": "schedule"}, "lengths"),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_adaptive_rejects_bad_arguments_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        AdaptiveDraftLength(**kwargs)


def test_adaptive_pauses_a_model_free_drafter_when_verifying_more_tokens_costs_too_much():
    """No draft passes (n-gram lookup): c = 0, so only the measured cost of longer target passes
    can make drafting lose. Acceptance near 0 with a pass over k+1 tokens costing 1 + k/2 loses
    for every k; acceptance 0.9 wins."""
    expensive = StepCosts()
    for n in [*[1] * (FIRST_SINGLE_PASSES - 1), *range(1, 10)]:
        expensive.add_target_pass(n, 1.0 + (n - 1) / 2)
    policy = AdaptiveDraftLength(max_k=8, start_k=4, min_tests=1)
    for _ in range(3):
        policy.next_lengths(2)
        policy.update(torch.tensor([4, 4]), torch.tensor([0, 0]), expensive)
    assert policy.can_pay and all(paused(policy))
    policy = AdaptiveDraftLength(max_k=8, start_k=4, min_tests=1)
    policy.next_lengths(2)
    policy.update(torch.tensor([4, 4]), torch.tensor([4, 3]), expensive)
    assert not any(paused(policy))


def test_relative_pass_cost_is_the_lower_envelope_then_the_chord():
    measured = StepCosts()
    assert measured.relative_pass_cost(5) is None
    measured.add_target_pass(5, 3.0)
    assert measured.relative_pass_cost(9) == 1.0  # one length measured: flat
    measured.add_target_pass(1, 1.0)
    measured.add_target_pass(3, 2.0)
    assert measured.relative_pass_cost(1) == pytest.approx(1.0)
    assert measured.relative_pass_cost(3) == pytest.approx(2.0)
    # Not measured, below the longest measured: the cost of the longest measured length below.
    assert measured.relative_pass_cost(2) == pytest.approx(1.0)
    assert measured.relative_pass_cost(4) == pytest.approx(2.0)
    assert measured.relative_pass_cost(5) == pytest.approx(3.0)
    # Past the longest measured (5 tokens, 3x): along the chord from 1 token, 0.5 per token.
    assert measured.relative_pass_cost(9) == pytest.approx(5.0)
    # A longer pass measured cheaper (a faster kernel for more rows) lowers the shorter ones:
    # a pass could always be padded to that length.
    measured.add_target_pass(8, 1.6)
    assert measured.relative_pass_cost(5) == pytest.approx(1.6)
    assert measured.relative_pass_cost(3) == pytest.approx(1.6)
    assert measured.relative_pass_cost(2) == pytest.approx(1.0)
    assert measured.relative_pass_cost(8) == pytest.approx(1.6)
    assert measured.relative_pass_cost(15) == pytest.approx(1.6 + 7 * 0.6 / 7)
    # A flat curve stays flat (a GPU): passes over 1 and 2 tokens cost the same.
    flat = StepCosts()
    flat.add_target_pass(1, 1.0)
    flat.add_target_pass(2, 1.0)
    assert flat.relative_pass_cost(17) == pytest.approx(1.0)


def test_the_schedule_prices_up_to_twice_the_longest_length_like_it():
    """explore=True (the row schedule's pricing): lengths up to EXPLORE_REACH times the longest
    measured cost what it costs, so a row whose drafts are kept tries them; past that the
    chord's slope. The cost check (interpolate=True) and the default keep the chord."""
    measured = StepCosts()
    measured.add_target_pass(1, 1.0)
    measured.add_target_pass(5, 3.0)  # chord: 0.5 per token
    assert EXPLORE_REACH == 2
    assert measured.relative_pass_cost(10, explore=True) == pytest.approx(3.0)
    assert measured.relative_pass_cost(12, explore=True) == pytest.approx(3.0 + 2 * 0.5)
    assert measured.relative_pass_cost(10) == pytest.approx(5.5)
    assert measured.relative_pass_cost(10, interpolate=True) == pytest.approx(5.5)


def test_a_row_whose_drafts_are_kept_reaches_long_drafts_on_a_flattening_curve():
    """Transformers on a CPU: a target pass over 2 tokens costs 1.74 1-token passes, over 5
    2.47, over 9 2.65, over 17 3.0 (benchmarks/decode_speed_reduced.md), a draft pass 0.12. A
    row that keeps every draft doubles its schedule and, as each longer pass is timed, its cap
    follows: 15 drafts by its fourth drafting step. (Growing by one, and pricing every length
    past the longest timed one along the chord from 1 token, kept it at 1 to 4 drafts.)"""
    curve = {1: 1.0, 2: 1.74, 3: 2.15, 4: 2.17, 5: 2.47, 9: 2.65, 17: 3.0}
    measured = StepCosts()
    for n in (*[1] * FIRST_SINGLE_PASSES, 2, 2, 5):
        measured.add_target_pass(n, curve[n])
    for _ in range(6):
        measured.draft_step.add(0.12)
    policy = AdaptiveDraftLength(max_k=16, start_k=4, min_tests=1)
    drafted = []
    for _ in range(6):
        k = int(policy.next_lengths(1))
        drafted.append(k)
        for _ in range(k):
            measured.draft_step.add(0.12)
        for _ in range(3):  # timed often enough to be trusted
            measured.add_target_pass(k + 1, curve.get(k + 1, curve[5] + 0.04 * (k - 4)))
        policy.update(lengths(k), lengths(k), measured)
    assert drafted[0] == 0 and policy.can_pay  # the costs were known: a target-only step
    # (the first drafts are capped at the prior's alpha, and a length timed fewer than three
    # times is priced optimistically, so one step tries 2)
    assert drafted[1:] == [3, 2, 7, 15, 16], drafted


def test_adaptive_caps_a_new_row_at_the_prior_alpha_before_its_first_keep_test():
    """A model-free drafter (c = 0) with passes costing 1 + 0.73 (n - 1), as llama.cpp's on 2
    cores: at alpha 2/3 no draft length pays ((1 + 2/3) / 1.73 < 1 for one token, worse for
    more), so a new row drafts one token (the floor before its own keep tests), not start_k;
    with flat pass costs it drafts start_k."""
    steep = StepCosts()
    # (a length not timed yet would be priced optimistically)
    for n in (*[1] * FIRST_SINGLE_PASSES, 2, 2, 3, 4, 5):
        steep.add_target_pass(n, 1.0 + 0.73 * (n - 1))
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=4), steep)
    assert policy.next_lengths(2).tolist() == [1, 1]
    flat = warmed(AdaptiveDraftLength(max_k=8, start_k=4), costs(0.0))
    assert flat.next_lengths(2).tolist() == [4, 4]


def test_adaptive_caps_row_lengths_at_the_theory_best_k():
    """alpha 0.8, c 0.4 and passes costing 1 + 0.25 (n - 1): the theory's best k is 1."""
    measured = StepCosts()
    measured.draft_step.add(0.4)
    for n in (*[1] * FIRST_SINGLE_PASSES, 3, 5):
        measured.add_target_pass(n, 1.0 + 0.25 * (n - 1))
    policy = AdaptiveDraftLength(max_k=8, start_k=6, min_tests=1)
    policy.next_lengths(2)
    policy.update(torch.tensor([6, 6]), torch.tensor([5, 5]), measured)  # per row 5 kept of 6
    assert alphas(policy) == [pytest.approx((5 + 1.6) / (6 + 2.4))] * 2  # prior decayed once
    assert [policy.rows[row].best_k for row in (0, 1)] == [1, 1]
    assert policy.next_lengths(2).tolist() == [1, 1]


def test_adaptive_needs_min_tests_before_pausing_unless_even_a_high_rate_cannot_pay():
    """One unlucky first step (nothing kept) must not stop drafting by itself: a row pauses
    before min_tests only after EARLY_TESTS tests or more, when drafting does not pay even at
    the upper 95% bound of its keep rate (0 kept of 4: 0.527; with a draft step of 0.9 and a
    flat target pass, one draft at rate a gives (1 + a) / 1.9 tokens per pass: below 1)."""
    slow = costs(0.9)
    policy = AdaptiveDraftLength(max_k=4, start_k=2)  # default min_tests = 12
    for _ in range(EARLY_TESTS - 1):
        policy.next_lengths(1)
        policy.update(lengths(1), lengths(0), slow)  # one failed keep test each
    assert paused(policy) == [False]
    policy.next_lengths(1)
    policy.update(lengths(1), lengths(0), slow)
    assert paused(policy) == [True]  # 4 failed keep tests: strong evidence
    assert _rate_upper_bound(0, 4, EARLY_LEVEL) == pytest.approx(1 - 0.05**0.25)
    # a row that kept a few of its drafts, where a keep rate above 0.5 would pay (draft step
    # 0.5): 3 of its first 11 tests kept leave 0.56 plausible, so it waits for min_tests
    policy = AdaptiveDraftLength(max_k=4, start_k=1)
    cheaper = costs(0.5)
    for kept in [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]:  # one draft a step
        policy.next_lengths(1)
        policy.update(lengths(1), lengths(kept), cheaper)
        assert paused(policy) == [False]
    policy.next_lengths(1)
    policy.update(lengths(1), lengths(0), cheaper)
    assert paused(policy) == [True]  # 12 tests, 3 kept: past min_tests, it does not pay


def test_the_rate_upper_bound_is_the_clopper_pearson_one():
    """P(X <= kept | tests, bound) = 1 - level at the bound (binomial), 1 when all were kept."""
    for kept, tests in [(0, 4), (1, 6), (3, 11), (5, 8)]:
        bound = _rate_upper_bound(kept, tests, 0.95)
        cdf = sum(
            math.comb(tests, i) * bound**i * (1 - bound) ** (tests - i) for i in range(kept + 1)
        )
        assert cdf == pytest.approx(0.05, abs=1e-9) and kept / tests < bound < 1
    assert _rate_upper_bound(4, 4, 0.95) == 1.0


def test_adaptive_rows_are_independent_and_a_joining_row_starts_from_the_prior():
    """Row "x" leaves and "c" joins (the batch keeps its size, so its costs and verdict): c
    starts at start_k, a and b keep their schedules; a forgotten row starts afresh."""
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=3), costs(0.05), rows=["a", "b", "x"])
    assert policy.next_lengths(["a", "b", "x"]).tolist() == [3, 3, 3]
    policy.update(["a", "b", "x"], lengths(3, 3, 3), lengths(3, 0, 3), costs(0.05))
    policy.forget("x")
    policy.next_lengths(["a", "b", "c"])
    assert [policy.rows[r].k for r in ("a", "b", "c")] == [6, 1, 3]  # c joins at start_k
    policy.forget("a")
    assert "a" not in policy.rows
    policy.next_lengths(["a", "b", "c"])
    assert policy.rows["a"].k == 3  # a forgotten row starts afresh


def test_each_batch_size_has_its_own_costs_and_verdict():
    """Costs are kept per batch size (1, 2, 4, 8, ...): one row on flat passes can draft, while
    eight rows, whose 5-token-per-row pass costs 4.5 times their 1-token pass (a compute-bound
    CPU), cannot. A batch size first seen starts its own cost check: FIRST_SINGLE_PASSES (3)
    target-only steps."""
    solo, rows = ["solo"], list(range(8))
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=3), costs(0.05), rows=solo)
    assert policy.next_lengths(solo).tolist() == [3] and policy.can_pay is True
    eight, none = StepCosts(), lengths(*[0] * 8)
    assert policy.next_lengths(rows).tolist() == [0] * 8 and policy.can_pay is None
    for _ in range(FIRST_SINGLE_PASSES - 1):
        eight.add_target_pass(1, 8.0)
        policy.update(rows, none, none, eight)
        # fewer than FIRST_SINGLE_PASSES 1-token passes timed: one more
        assert policy.next_lengths(rows).tolist() == [0] * 8 and policy.can_pay is None
    eight.add_target_pass(1, 8.0)
    policy.update(rows, none, none, eight)
    fours = lengths(*[4] * 8)
    for _ in range(2):  # probes (passes over 5 tokens per row); a "no" needs two samples
        assert policy.verdicts.get(8) is None
        assert policy.next_lengths(rows).tolist() == [4] * 8
        for _ in range(4):
            eight.draft_step.add(3.0)
        eight.add_target_pass(5, 36.0)
        policy.update(rows, fours, fours, eight)
    assert policy.verdicts == {1: True, 8: False}
    assert policy.next_lengths(rows).tolist() == [0] * 8
    assert policy.next_lengths(solo).tolist() == [3] and policy.can_pay is True
    assert policy.next_lengths(rows[:5]).tolist() == [0] * 5  # 5 rows: with the 8s


def test_a_bigger_batch_takes_a_no_from_a_smaller_one_but_not_a_yes():
    """Drafting pays less in bigger batches, never more: once one row was found unable to pay,
    2, 4, 8 rows decode target-only without a cost check of their own; a "yes" for one row
    does not carry over (8 rows still run their own check)."""
    steep = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        steep.add_target_pass(1, 1.0)
    for _ in range(2):
        steep.draft_step.add(0.45)
        steep.add_target_pass(2, 1.73)
    steep.add_target_pass(5, 3.9)
    policy = AdaptiveDraftLength(max_k=8)
    policy.next_lengths(1)
    policy.update(lengths(1), lengths(1), steep)
    assert policy.verdicts == {1: False}
    for rows in (2, 3, 8, 16):
        assert policy.next_lengths(rows).tolist() == [0] * rows and policy.can_pay is False
    flat = AdaptiveDraftLength(max_k=8)
    flat.next_lengths(1)
    flat.update(lengths(1), lengths(1), costs(0.05))
    assert flat.verdicts == {1: True}
    assert flat.next_lengths(8).tolist() == [0] * 8 and flat.can_pay is None


# ---------------------------------------------------------------- adaptive: acceptance by position


def brute_best_k(rates: list[float], c: float, r) -> int:
    """argmax over k of E(k) / (k c + r(k + 1)), E(k) = 1 + a_0 + a_0 a_1 + ..., ties to the
    smaller k: written out here, apart from the policy's code."""
    best, best_value = 0, 1.0 / r(1)
    for k in range(1, len(rates) + 1):
        survive, tokens = 1.0, 1.0
        for a in rates[:k]:
            survive *= a
            tokens += survive
        value = tokens / (k * c + r(k + 1))
        if value > best_value + 1e-12:
            best, best_value = k, value
    return best


def test_position_rates_count_each_position_given_the_ones_before_were_kept():
    """Smoothing 1 (only the newest step counts) and the prior faded to nothing: a step that
    drafted 5 and kept 2 tested positions 0, 1, 2 and passed 0 and 1; positions 3 and 4 were
    not tested and follow the position before them (weight DEPTH_PRIOR_TESTS = 1 against no
    tests). Rates are capped at 0.999."""
    policy = warmed(AdaptiveDraftLength(max_k=5, start_k=5, smoothing=1.0), costs(0.05), rows=1)
    policy.update(lengths(5), lengths(2), costs(0.05))
    state = policy.rows[0]
    assert state.prior_weight == 0.0
    assert state.position_tests == [1.0, 1.0, 1.0] and state.position_kept == [1.0, 1.0, 0.0]
    rates = state.position_rates(5)
    # position 0: 1 kept of 1 test and no prior weight left; 1 likewise (its prior, the rate
    # before it, weighs 1); position 2: 0 kept of 1 test, and the prior 0.999 weighs 1
    assert rates[0] == pytest.approx(0.999) and rates[1] == pytest.approx(0.999)
    assert rates[2] == pytest.approx((0 + 0.999) / 2)
    assert rates[3] == pytest.approx(rates[2]) and rates[4] == pytest.approx(rates[2])


def test_best_k_follows_long_runs_of_kept_drafts():
    """A row whose first draft is kept about half the time but which, once past it, keeps
    every draft (code: a line either matches or not). Its overall rate per keep test is about
    0.9, and at flat pass costs with c = 0.3 the i.i.d. theory would cap it lower than the
    runs pay for; the policy's best k is the brute-force optimum over its position rates, and
    deeper than the i.i.d. one."""
    from specsample.analysis.theory import best_draft_length

    c = 0.3
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=8, min_tests=1), costs(c), rows=1)
    for step in range(40):
        kept = 8 if step % 2 else 0
        policy.update(lengths(8), lengths(kept), costs(c))
    state = policy.rows[0]
    rates = policy.rates(state, 8)
    assert rates[0] < 0.7 and min(rates[1:]) > 0.9
    assert state.best_k == brute_best_k(rates, c, lambda n: 1.0)
    iid = best_draft_length(min(state.alpha, 0.999), c, max_k=8)
    assert state.best_k == 8 and iid < 8


def test_a_new_row_starts_from_the_pooled_rates():
    """Rows that kept every draft lift the pooled rates; a row that joins then starts from
    them (its own counts empty), not from the fixed 2/3 prior."""
    policy = warmed(AdaptiveDraftLength(max_k=4, start_k=4), costs(0.05), rows=2)
    for _ in range(10):
        policy.update(lengths(4, 4), lengths(4, 4), costs(0.05))
    joined = policy.schedule("new")
    assert joined.position_tests == []
    fresh = AdaptiveDraftLength(max_k=4).schedule("new").position_rates(4)
    assert fresh == pytest.approx([2 / 3] * 4)
    assert min(policy.rates(joined, 4)) > 0.9


# ---------------------------------------------------------------- adaptive: a batch's depth


def test_a_batch_drafts_to_the_depth_with_the_most_tokens_per_cost():
    """Two rows: one kept all its drafts for a long time (wants 8), seven rejected at once
    (their schedules 1). Drafting 8 would make the seven wait through 8 draft passes for their
    one token: the step's depth is the brute-force best of sum_b E_b(min(k_b, D)) / (D c +
    r(D + 1)), here less than 8, and rows shorter than it keep their own length."""
    c = 0.5
    steep = StepCosts()
    for _ in range(3):
        steep.draft_step.add(c)
        for n in range(1, 10):
            steep.add_target_pass(n, 1.0 + 0.1 * (n - 1))
    rows = list(range(8))
    policy = AdaptiveDraftLength(max_k=8, start_k=8, min_tests=100, early_tests=None)
    policy = warmed(policy, steep, rows=rows)
    for _ in range(12):
        policy.update(rows, lengths(*[8] * 8), lengths(8, *[0] * 7), steep)
    wanted = [min(policy.rows[r].k, max(1, policy.rows[r].best_k)) for r in rows]
    assert wanted[0] == 8 and wanted[1:] == [1] * 7
    step = policy.next_lengths(rows).tolist()

    def batch_rate(depth: int) -> float:
        tokens = 0.0
        for r, k in zip(rows, wanted, strict=True):
            survive, e = 1.0, 1.0
            for a in policy.rates(policy.rows[r], 8)[: min(k, depth)]:
                survive *= a
                e += survive
            tokens += e
        return tokens / (depth * c + steep.relative_pass_cost(depth + 1, 3))

    best = max(range(1, 9), key=lambda d: (batch_rate(d), -d))
    assert 1 <= best < 8
    assert step == [best] + [1] * 7


def test_a_single_row_keeps_its_own_length_and_a_batch_never_stops_drafting():
    """One row is never cut by the batch rule; in a batch whose rows all asked to draft, the
    depth is at least 1 (each row's own theory said yes, and rows keep being measured)."""
    policy = warmed(AdaptiveDraftLength(max_k=6, start_k=6), costs(0.05), rows=1)
    step = policy.next_lengths(1).tolist()
    state = policy.rows[0]
    assert step == [min(state.k, max(1, state.best_k))] and step[0] > 1
    expensive = StepCosts()
    for _ in range(3):
        expensive.draft_step.add(0.2)
        for n in range(1, 8):
            expensive.add_target_pass(n, 1.0 + 0.5 * (n - 1))
    policy = warmed(AdaptiveDraftLength(max_k=6, start_k=3), expensive, rows=3)
    assert min(policy.next_lengths(3).tolist()) >= 1


# ---------------------------------------------------------------- adaptive: costs to trust


def test_one_slow_pass_does_not_price_a_length_out():
    """Passes of 1 and 2 tokens timed three times each (1.0 and 1.1), a 3-token pass once, at a
    moment the machine was busy (2.0). For the schedule the 3-token pass costs what the curve
    through the trusted lengths predicts (the chord: 1.2), the lesser of that and its own 2.0,
    so it is tried again; after two more samples at 1.15 its median is trusted. The cost check
    (min_samples 1) uses every sample."""
    measured = StepCosts()
    for _ in range(3):
        measured.add_target_pass(1, 1.0)
        measured.add_target_pass(2, 1.1)
    measured.add_target_pass(3, 2.0)
    assert measured.relative_pass_cost(3) == pytest.approx(2.0)
    assert measured.relative_pass_cost(3, 3) == pytest.approx(1.2)
    assert measured.relative_pass_cost(5, 3) == pytest.approx(1.4)  # the chord, past 3
    measured.add_target_pass(3, 1.15)
    assert measured.relative_pass_cost(3, 3) == pytest.approx(1.2)  # min(chord, median 1.575)
    measured.add_target_pass(3, 1.15)
    assert measured.relative_pass_cost(3, 3) == pytest.approx(1.15)  # trusted: its median
    # An untrusted length that is cheaper than the curve keeps its own (lower) median.
    measured.add_target_pass(4, 1.0)
    assert measured.relative_pass_cost(4, 3) == pytest.approx(1.0)


# ---------------------------------------------------------------- adaptive: real drafting steps


def drafting_steps(policy, measured: StepCosts, steps: int, depths, kept, seconds) -> list[bool]:
    """Runs `steps` steps in which every row drafts its depth (kept: drafts kept per row) and
    the step took `seconds`; returns the verdict after each."""
    verdicts = []
    for _ in range(steps):
        measured.last_step_seconds = seconds
        policy.update(lengths(*depths), lengths(*kept), measured)
        verdicts.append(policy.can_pay)
    return verdicts


def test_real_drafting_steps_slower_than_target_only_turn_the_verdict_to_no():
    """The modelled costs say yes (a 9-token pass costs a 1-token one, c = 0.1), but each real
    step of 4 drafts took 6 target passes' time, more than target-only needs for the 5 tokens
    it could emit: after GUARD_STEPS such steps the verdict is "no" and it stands (the engine
    then releases the draft model: `stopped`)."""
    measured = costs(0.1)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    verdicts = drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 6.0)
    assert verdicts == [True] * (GUARD_STEPS - 1) + [False]
    assert policy.stopped
    for _ in range(20):
        assert policy.next_lengths(1).tolist() == [0]
        measured.last_step_seconds = 1.0
        policy.update(lengths(0), lengths(0), measured)
    assert policy.can_pay is False


def test_real_drafting_steps_are_judged_on_costs_not_on_what_was_kept():
    """Negative controls: steps that could have emitted more tokens than target-only in their
    time keep the "yes" however few drafts were kept (what is kept is the per-row theory's
    business); a step a hair slower than its tokens' worth of 1-token passes says no."""
    for kept in (4, 0):
        measured = costs(0.1)
        policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
        assert drafting_steps(policy, measured, 3 * GUARD_STEPS, [4], [kept], 4.9) == [True] * (
            3 * GUARD_STEPS
        )
    measured = costs(0.1)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    assert drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 5.01)[-1] is False


def test_real_drafting_steps_of_a_batch_count_every_row():
    """Two rows, one drafting 4 and one paused (0): a step could emit 5 + 1 tokens where
    target-only emits 2 per 1-token pass, so it pays while it takes under 3 passes' time."""
    for seconds, verdict in ((2.9, True), (3.1, False)):
        measured = costs(0.1)
        policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=2)
        assert drafting_steps(policy, measured, GUARD_STEPS, [4, 0], [4, 0], seconds)[-1] is verdict


def test_the_tally_of_real_steps_starts_after_the_yes_and_over_after_a_recheck():
    """Steps before a verdict (the cost check's) and a "no"'s rechecks are not tallied; a
    recheck that finds "yes" again is judged on GUARD_STEPS steps of its own."""
    measured = costs(0.1)
    policy = AdaptiveDraftLength(max_k=16, recheck_every=4)
    measured.last_step_seconds = 100.0
    policy.update(lengths(0), lengths(0), StepCosts())  # no costs yet: no verdict
    assert policy.can_pay is None
    policy.update(lengths(1), lengths(1), measured)  # the verdict's own step: not tallied
    assert policy.can_pay is True
    assert drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 6.0)[-1] is False
    asked = []
    for _ in range(4):
        asked.append(int(policy.next_lengths(1)))
        policy.update(lengths(asked[-1]), lengths(asked[-1]), measured)
    assert asked == [0, 0, 0, 1] and policy.can_pay is True  # the recheck's costs say yes
    verdicts = drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 6.0)
    assert verdicts == [True] * (GUARD_STEPS - 1) + [False]


@pytest.mark.parametrize("unit", [1.0, 0.04])
def test_steps_near_break_even_time_a_fresh_pass_and_a_machine_now_faster_says_no(unit):
    """The cost check's 1-token passes were all timed while the machine was slow (1.0, four
    of them: no retime for want of samples); it then runs at 0.75 of that. Real steps of 4
    drafts take 4.6: against the slow baseline they could emit 5 tokens in 5.0, so they pay,
    by under RETIME_MARGIN. After 2 * GUARD_STEPS of them the next step is target-only, to
    time a fresh 1-token pass (0.75); against it the same steps lose, and the next one turns
    the verdict to no. In units of 1 and of 40 ms (the ratio, not the seconds, decides)."""
    measured = costs(0.1 * unit, unit)
    measured.add_target_pass(1, unit)
    assert measured.target_pass[1].count >= RETIME_BELOW
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    assert 5 > 4.6 and 5 < RETIME_MARGIN * 4.6
    assert all(drafting_steps(policy, measured, 2 * GUARD_STEPS, [4], [4], 4.6 * unit))
    assert policy.next_lengths(1).tolist() == [0]  # the fresh 1-token pass
    measured.add_target_pass(1, 0.75 * unit)
    measured.last_step_seconds = 0.75 * unit
    policy.update(lengths(0), lengths(0), measured)
    assert policy.can_pay is True  # the modelled costs still say yes
    assert drafting_steps(policy, measured, 1, [4], [4], 4.6 * unit) == [False]


def test_steps_that_clearly_pay_are_not_interrupted_for_fresh_passes():
    """Negative control: steps that could emit 5 tokens in 2.0 (2.5x over the baseline) never
    ask for a target-only step, however long they go on; nor do steps near break-even before
    2 * GUARD_STEPS of them, and after one fresh pass the next is due twice as far on."""
    measured = costs(0.1)
    measured.add_target_pass(1, 1.0)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    for _ in range(8 * GUARD_STEPS):
        assert int(policy.next_lengths(1)) > 0
        drafting_steps(policy, measured, 1, [4], [4], 2.0)
    near = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    asked = []
    for _ in range(6 * GUARD_STEPS):
        asked.append(int(near.next_lengths(1)))
        if asked[-1]:
            drafting_steps(near, measured, 1, [4], [4], 4.6)
        else:
            measured.last_step_seconds = 1.0
            near.update(lengths(0), lengths(0), measured)
    zeros = [i for i, k in enumerate(asked) if k == 0]
    assert zeros == [2 * GUARD_STEPS, 4 * GUARD_STEPS + 1]  # after 16 and 32 drafting steps


def test_a_recheck_that_says_yes_again_times_its_fresh_passes_from_the_start():
    """The gaps between fresh 1-token passes start over with the tally: after a "no" and a
    recheck that finds "yes" again, the first fresh pass comes after 2 * GUARD_STEPS drafting
    steps again, not at the doubled gap the last tally had reached."""
    measured = costs(0.1)
    measured.add_target_pass(1, 1.0)
    policy = warmed(AdaptiveDraftLength(max_k=16, recheck_every=4), measured, rows=1)

    def run(steps: int, seconds: float) -> list[int]:
        asked = []
        for _ in range(steps):
            asked.append(int(policy.next_lengths(1)))
            if asked[-1]:
                drafting_steps(policy, measured, 1, [4], [4], seconds)
            else:
                measured.last_step_seconds = 1.0
                policy.update(lengths(0), lengths(0), measured)
        return asked

    first = run(2 * GUARD_STEPS + 1, 4.6)
    assert first.index(0) == 2 * GUARD_STEPS  # the fresh pass; the next one is due at 32
    run(1, 20.0)  # a slow step: the tally no longer pays
    assert policy.can_pay is False
    assert run(4, 4.6) == [0, 0, 0, 1] and policy.can_pay is True  # the recheck says yes
    again = run(2 * GUARD_STEPS + 1, 4.6)
    assert again.index(0) == 2 * GUARD_STEPS


# ---------------------------------------------------------------- adaptive: lengths from the costs


def kinked() -> StepCosts:
    """Passes over up to 4 tokens cost a 1-token pass, longer ones 1 more per token (a matrix
    kernel switch); each timed three times (trusted); a draft pass 0.1."""
    measured = StepCosts()
    for _ in range(3):
        measured.draft_step.add(0.1)
        for n in range(1, 9):
            measured.add_target_pass(n, 1.0 if n <= 4 else n - 3.0)
    return measured


def test_costs_lengths_offer_the_longest_draft_the_costs_justify():
    """lengths="costs": a row is offered the k with the most (k + 1) / (k c + r(k + 1)) from
    its first step, whatever its keep rates; "theory" starts a row at min(start_k, its best k
    at the prior). Flat passes: max_k. The kinked curve: 3 drafts (4 / 1.3 against 5 / 2.4
    for 4). (One row: a batch's depth is cut by the theory under either rule.)"""
    flat = warmed(AdaptiveDraftLength(max_k=12, lengths="costs"), costs(0.05), rows=1)
    assert flat.length_rule == "costs" and flat.next_lengths(1).tolist() == [12]
    theory = warmed(AdaptiveDraftLength(max_k=12, lengths="theory"), costs(0.05), rows=1)
    assert theory.next_lengths(1).tolist() == [4]  # start_k: no keep test yet
    kink = warmed(AdaptiveDraftLength(max_k=12, lengths="costs"), kinked(), rows=1)
    assert kink.next_lengths(1).tolist() == [3]
    # each row's keep tests do not move it: the drafter's stops cut a draft, not the policy
    for kept in (3, 0, 1, 3):
        kink.update(lengths(3), lengths(kept), kinked())
        assert kink.next_lengths(1).tolist() == [3]


def test_costs_lengths_still_pause_a_row_whose_theory_says_drafting_does_not_pay():
    """The per-row theory stays the off switch: a row that keeps nothing pauses (then probes
    with one token) under "costs" as under "theory"."""
    for rule in ("costs", "theory"):
        policy = warmed(AdaptiveDraftLength(max_k=8, lengths=rule, min_tests=1), kinked(), [0])
        asked = []
        for _ in range(12):
            asked.append(int(policy.next_lengths([0])))
            policy.update([0], lengths(asked[-1]), lengths(0), kinked())
        assert policy.rows[0].paused and asked[-4:].count(0) >= 3, (rule, asked)


def transformers_like() -> StepCosts:
    """Transformers on 2 cores (benchmarks/decode_speed_reduced.md): a 2-token pass 2.06 1-token
    passes, 5 tokens 3.0, 16 tokens 3.3; an int8 draft pass 0.134; each timed three times."""
    measured = StepCosts()
    for _ in range(3):
        measured.draft_step.add(0.134)
        for n, relative in ((1, 1.0), (2, 2.06), (5, 3.0), (16, 3.3)):
            measured.add_target_pass(n, relative)
    return measured


def test_costs_lengths_judge_a_row_by_what_its_drafting_steps_emitted():
    """Runs of kept drafts: steps that kept 15 of 15, 1 of 13, 0 of 7 and 2 of 3 emitted 22
    tokens for about 18 1-token passes' cost. Under "costs" the row keeps drafting; the
    per-position theory (about 3 of 4 first drafts kept) finds no length that pays and pauses
    it under "theory". A row whose drafting steps lose (nothing kept) pauses under "costs"
    too, and its probes offer the longest draft the costs justify, not one token."""
    steps = [(15, 15), (13, 1), (7, 0), (3, 2)] * 2
    for rule, pauses in (("costs", False), ("theory", True)):
        policy = warmed(AdaptiveDraftLength(max_k=16, lengths=rule), transformers_like(), [0])
        for drafted, kept in steps:
            policy.next_lengths([0])
            policy.update([0], lengths(drafted), lengths(kept), transformers_like())
        assert policy.rows[0].paused is pauses, rule
    policy = warmed(AdaptiveDraftLength(max_k=16, lengths="costs"), transformers_like(), [0])
    cap = int(policy.next_lengths([0]))
    assert cap == 16
    asked, k = [], cap
    for _ in range(12):  # the drafter's stops cut each draft to at most 4; none is kept
        policy.update([0], lengths(min(k, 4)), lengths(0), transformers_like())
        k = int(policy.next_lengths([0]))
        asked.append(k)
    assert policy.rows[0].paused and 0 in asked
    assert set(asked) <= {0, cap} and cap in asked[asked.index(0) :]


def nearly_flat() -> StepCosts:
    """Passes over 2 to 13 tokens cost 1.2 1-token passes, a draft pass 0.1; each timed
    TRUST_SAMPLES times (trusted)."""
    measured = StepCosts()
    for _ in range(TRUST_SAMPLES):
        measured.draft_step.add(0.1)
        for n, relative in ((1, 1.0), (2, 1.2), (13, 1.2)):
            measured.add_target_pass(n, relative)
    return measured


def test_costs_lengths_pause_a_row_only_once_its_steps_lose_with_confidence():
    """Under "costs" a row's steps gain from a whole pass lost to a dozen tokens won. A row
    that keeps a 12-token draft whole once per 9 steps and nothing in the other 8 loses 0.07
    passes per step on average (flat passes: r = 1.2 for 2..13 tokens, c = 0.1): the mean of
    its last few steps says "loses" after every streak of rejections, but the upper bound of
    the mean gain never does, so it keeps drafting (the rule that paused on the mean paused it
    on its 6th step and left it target-only for 37 of 45 steps). A row that keeps 1 draft of 12
    at every step (0.4 passes lost each, no spread) pauses once judged, and one that keeps 12
    once per 21 steps (0.83 lost per step) pauses within its first long streak."""
    flat = nearly_flat()

    def asked(pattern: list[tuple[int, int]], steps: int = 45) -> list[int]:
        policy = warmed(AdaptiveDraftLength(max_k=12, lengths="costs"), flat, [0])
        out = []
        for i in range(steps):
            k = int(policy.next_lengths([0]))
            out.append(k)
            drafted, kept = pattern[i % len(pattern)]
            policy.update([0], lengths(min(drafted, k)), lengths(min(kept, k)), flat)
        return out

    assert PAUSE_Z == pytest.approx(statistics.NormalDist().inv_cdf(PAUSE_LEVEL), abs=1e-4)
    assert TRIM_Z == pytest.approx(statistics.NormalDist().inv_cdf(TRIM_LEVEL), abs=1e-4)
    assert 0 not in asked([(12, 12)] + [(12, 0)] * 8)
    steady = asked([(12, 1)])
    assert steady.index(0) <= 7 and steady.count(0) >= 30
    rare = asked([(12, 12)] + [(12, 0)] * 20)
    assert 0 < rare.index(0) <= 21


def test_costs_lengths_resume_a_paused_row_once_its_mean_gain_is_above_zero():
    """The pause's other side: a paused row resumes when its mean gain is above 0, not when
    the upper bound of it is (which would resume it after any probe that gained a little).
    After six steps that kept 1 draft of 12 (0.4 passes lost each), a probe that keeps its one
    draft (0.7 gained) leaves the mean below 0: the row stays paused. A probe that keeps 3 of
    12 (1.6 gained) brings it above 0: the row drafts again."""
    flat = nearly_flat()

    def paused_row() -> AdaptiveDraftLength:
        policy = warmed(AdaptiveDraftLength(max_k=12, lengths="costs"), flat, [0])
        for _ in range(6):
            assert int(policy.next_lengths([0])) == 12
            policy.update([0], lengths(12), lengths(1), flat)
        assert policy.rows[0].paused
        return policy

    def probe(policy: AdaptiveDraftLength, drafted: int, kept: int) -> None:
        for _ in range(policy.probe_every + 1):
            k = int(policy.next_lengths([0]))
            if k:
                policy.update([0], lengths(drafted), lengths(kept), flat)
                return
            policy.update([0], lengths(0), lengths(0), flat)
        raise AssertionError("no probe")

    small = paused_row()
    probe(small, 1, 1)
    assert small.rows[0].paused
    large = paused_row()
    probe(large, 12, 3)
    assert not large.rows[0].paused and int(large.next_lengths([0])) == 12


def test_auto_lengths_follow_whether_the_engines_drafter_stops_itself():
    """lengths="auto" (the default) is "costs" for a drafter that stops a row itself (a model
    drafter with a confidence or survival stop), "theory" otherwise; an explicit rule stands."""
    from specsample import Engine
    from specsample.adapters.toy import ToyLM
    from specsample.drafters.model import ModelDrafter
    from specsample.drafters.ngram import NgramDrafter

    def rule(drafter, lengths="auto") -> str:
        policy = AdaptiveDraftLength(lengths=lengths)
        Engine(ToyLM(16, seed=0), drafter, draft_length=policy)
        return policy.length_rule

    draft = ToyLM(16, seed=1)
    assert rule(ModelDrafter(draft, confidence=0.4)) == "costs"
    assert rule(ModelDrafter(draft, survival=0.25)) == "costs"
    assert rule(ModelDrafter(draft)) == "theory"
    assert rule(NgramDrafter()) == "theory"
    assert rule(ModelDrafter(draft, confidence=0.4), lengths="theory") == "theory"
    assert AdaptiveDraftLength().length_rule == "theory"  # no engine yet: no drafter


@pytest.mark.parametrize(("five_tokens", "verdict"), [(0.159, False), (0.120, True)])
def test_a_yes_needs_a_margin_over_target_only(five_tokens, verdict):
    """llama.cpp on 2 cores with repacked weights: 1-token pass 53 ms, draft pass 26 ms, a
    5-token pass 159 ms. Every draft kept, 4 drafts give 5 tokens for 4 * 0.49 + 3.0 = 4.96
    passes: 1.008x target-only, which real steps (catch-up draft passes, verification, drafts
    not all kept) lose. The check says yes only above MARGIN (1.1x); at 120 ms (1.18x) it does."""
    from specsample.engine.length import MARGIN

    assert MARGIN == 1.1
    policy, measured = AdaptiveDraftLength(max_k=16), StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, 0.053)
        policy.update(lengths(0), lengths(0), measured)
    for _ in range(2):
        if policy.can_pay is not None:
            break
        assert int(policy.next_lengths(1)) == PROBE_LENGTH - 1
        for _ in range(PROBE_LENGTH - 1):
            measured.draft_step.add(0.026)
        measured.add_target_pass(PROBE_LENGTH, five_tokens)
        policy.update(lengths(4), lengths(4), measured)
    assert policy.can_pay is verdict


def test_a_yes_must_hold_against_the_fastest_one_token_pass():
    """A cold first pass (weights paged in from disk) makes the 1-token median slow and
    drafting look cheap: 80, 66 and 53 ms (the cost check's FIRST_SINGLE_PASSES) give a median
    of 66 ms, against which 4 drafts of 26 ms and a 5-token pass of 120 ms would be 1.47x
    target-only; against the 53 ms pass seen they are 1.18x (yes), and with a 5-token pass of
    140 ms 1.09x: no (below MARGIN), though the median alone would say 1.35x."""
    singles = (0.080, 0.066, 0.053)
    assert len(singles) == FIRST_SINGLE_PASSES
    verdicts = []
    for five_tokens in (0.120, 0.140):
        policy, measured = AdaptiveDraftLength(max_k=4), StepCosts()
        for single in singles:
            assert int(policy.next_lengths(1)) == 0
            measured.add_target_pass(1, single)
            policy.update(lengths(0), lengths(0), measured)
        for _ in range(2):
            if policy.can_pay is not None:
                break
            assert int(policy.next_lengths(1)) == 4
            for _ in range(4):
                measured.draft_step.add(0.026)
            measured.add_target_pass(5, five_tokens)
            policy.update(lengths(4), lengths(4), measured)
        verdicts.append(policy.can_pay)
    assert verdicts == [True, False]


def test_after_a_cold_start_a_fresh_one_token_pass_is_timed_before_real_steps_are_judged():
    """The cost check's FIRST_SINGLE_PASSES (3) 1-token passes all slow (a cold load: 2.0 where
    the machine, warm, takes 1.0): against them a drafting step of 4 drafts that took 5.5
    seconds looks paid for (5 tokens against 2.75 target-only tokens' time). With fewer than
    RETIME_BELOW 1-token passes, the step before the judgment is target-only: its pass (1.0) is
    the fastest seen, against which those steps lose (5 tokens against 5.5): "no"."""

    assert RETIME_BELOW == FIRST_SINGLE_PASSES + 1

    def slow(samples: int) -> StepCosts:
        """`samples` slow 1-token and 9-token passes (2.0) and cheap draft passes (0.1)."""
        measured = StepCosts()
        for _ in range(samples):
            measured.draft_step.add(0.1)
            measured.add_target_pass(1, 2.0)
            measured.add_target_pass(9, 2.0)
        return measured

    measured = slow(FIRST_SINGLE_PASSES)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    asked, verdicts = [], []
    for _ in range(GUARD_STEPS + 1):
        k = int(policy.next_lengths(1))
        asked.append(k)
        if k == 0:
            measured.add_target_pass(1, 1.0)
            measured.last_step_seconds = 1.0
        else:
            measured.last_step_seconds = 5.5
        policy.update(lengths(min(k, 4)), lengths(min(k, 4)), measured)
        verdicts.append(policy.can_pay)
    assert [k > 0 for k in asked] == [True] * (GUARD_STEPS - 1) + [False, True]
    assert verdicts[-1] is False
    # Negative control: RETIME_BELOW slow passes (no re-timing) keep the "yes".
    measured = slow(RETIME_BELOW)
    policy = warmed(AdaptiveDraftLength(max_k=16), measured, rows=1)
    assert drafting_steps(policy, measured, GUARD_STEPS, [4], [4], 5.5)[-1] is True
