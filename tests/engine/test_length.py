"""Draft length policies: fixed k, and the adaptive per-row schedule with its cost-based pause."""

from __future__ import annotations

import pytest
import torch

from specsample.analysis.theory import expected_speedup
from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength, StepCosts


def costs(draft_step: float, target_pass: float = 1.0) -> StepCosts:
    """Measured costs: one draft step, and a target pass that costs the same on 1 or 9 tokens."""
    measured = StepCosts()
    measured.draft_step.add(draft_step)
    measured.add_target_pass(1, target_pass)
    measured.add_target_pass(9, target_pass)
    return measured


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def paused(policy: AdaptiveDraftLength) -> list[bool]:
    """Each row's pause flag (rows are numbered 0..batch-1 when next_lengths gets an int)."""
    return [policy.rows[row].paused for row in sorted(policy.rows)]


def alphas(policy: AdaptiveDraftLength) -> list[float | None]:
    return [policy.rows[row].alpha for row in sorted(policy.rows)]


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


# ---------------------------------------------------------------- adaptive: per-row schedule


def test_adaptive_grows_after_full_acceptance_and_shrinks_after_rejection():
    policy = AdaptiveDraftLength(max_k=6, start_k=3)
    assert policy.next_lengths(4).tolist() == [3, 3, 3, 3]
    # rows: all kept, one rejected, the first rejected, did not draft (left as it was)
    policy.update(lengths(3, 3, 3, 0), lengths(3, 2, 0, 0), StepCosts())
    assert policy.next_lengths(4).tolist() == [4, 2, 2, 3]
    assert not any(paused(policy))


def test_adaptive_start_k_defaults_to_four_within_max_k():
    assert AdaptiveDraftLength(max_k=8).next_lengths(1).tolist() == [4]
    assert AdaptiveDraftLength(max_k=2).next_lengths(1).tolist() == [2]
    assert AdaptiveDraftLength(max_k=3, start_k=5).next_lengths(1).tolist() == [3]


def test_adaptive_length_stays_within_one_and_max_k():
    policy = AdaptiveDraftLength(max_k=3, start_k=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafted = policy.next_lengths(5)
        assert bool(((drafted >= 1) & (drafted <= 3)).all())
        accepted = (torch.rand(5, generator=generator) * (drafted + 1)).long()
        policy.update(drafted, accepted, StepCosts())  # no measured costs: never pauses
    assert not any(paused(policy))


def test_adaptive_reaches_both_ends_and_stays_there():
    policy = AdaptiveDraftLength(max_k=3, start_k=2)
    for _ in range(5):
        k = policy.next_lengths(2)
        policy.update(k, torch.stack([k[0], torch.tensor(0)]), StepCosts())
    assert policy.next_lengths(2).tolist() == [3, 1]


# ---------------------------------------------------------------- adaptive: pause and resume


def test_adaptive_does_not_pause_when_drafting_pays():
    policy = AdaptiveDraftLength(max_k=4, start_k=2)
    k = policy.next_lengths(2)
    policy.update(k, lengths(1, 2), costs(0.05))  # cheap drafts, acceptance 3/4
    assert not any(paused(policy))
    assert policy.next_lengths(2).tolist() == [1, 3]


def test_adaptive_pauses_with_probes_when_drafting_does_not_pay():
    probe_every = 4
    policy = AdaptiveDraftLength(max_k=4, start_k=2, probe_every=probe_every, min_tests=1)
    slow = costs(0.9)  # a draft step costs nearly as much as a target pass
    k = policy.next_lengths(3)
    policy.update(k, lengths(0, 0, 0), slow)  # nothing kept
    assert all(paused(policy))
    assert alphas(policy) == [pytest.approx(2 / 4)] * 3  # 0 of 1 kept, with the prior's 2 of 3
    schedule = []
    for _ in range(3 * probe_every):
        k = policy.next_lengths(3)
        schedule.append(int(k.max()))
        assert k.tolist() in ([0, 0, 0], [2, 2, 2])  # all rows target-only, or all probe
        policy.update(k, lengths(0, 0, 0), slow)  # probes rejected again
    probes = [step for step, value in enumerate(schedule) if value == 2]  # start_k
    assert len(probes) == 3
    assert probes[1] - probes[0] == probes[2] - probes[1] == probe_every
    assert all(paused(policy))


def test_adaptive_resumes_when_probes_show_high_acceptance():
    policy = AdaptiveDraftLength(max_k=8, start_k=2, probe_every=2, min_tests=1)
    slow = costs(0.9)
    policy.update(policy.next_lengths(2), lengths(0, 0), slow)
    assert all(paused(policy))
    resumed_at_alpha = None
    for _ in range(200):
        k = policy.next_lengths(2)
        if not any(paused(policy)):
            resumed_at_alpha = min(alphas(policy))
            break
        policy.update(k, k, slow)  # every probe kept
    assert resumed_at_alpha is not None, "never resumed drafting"
    # theory with c = 0.9: drafting pays only for high acceptance
    best = max(expected_speedup(min(resumed_at_alpha, 0.999), k, 0.9) for k in range(1, 9))
    assert resumed_at_alpha > 0.9 and best > 1.0
    assert bool((policy.next_lengths(2) >= 1).all())


def test_adaptive_ignores_steps_without_drafts():
    policy = AdaptiveDraftLength(max_k=4, start_k=2)
    policy.next_lengths(2)
    policy.update(lengths(0, 0), lengths(0, 0), costs(0.9))
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


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_k": 0}, "max_k"),
        ({"max_k": True}, "max_k"),
        ({"max_k": 2.0}, "max_k"),
        ({"start_k": 0}, "start_k"),
        ({"start_k": 1.5}, "start_k"),
        ({"probe_every": 0}, "probe_every"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_adaptive_rejects_bad_arguments_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        AdaptiveDraftLength(**kwargs)


def test_adaptive_pauses_a_model_free_drafter_when_verifying_more_tokens_costs_too_much():
    """No draft passes (n-gram lookup): c = 0, so only the measured cost of longer target passes
    can make drafting lose. Acceptance 0.1 with a pass over k+1 tokens costing 1 + k/2 loses for
    every k; acceptance 0.9 wins."""
    expensive = StepCosts()
    for n in range(1, 10):
        expensive.add_target_pass(n, 1.0 + (n - 1) / 2)
    policy = AdaptiveDraftLength(max_k=8, start_k=4, min_tests=1)
    for _ in range(2):
        policy.next_lengths(2)
        policy.update(torch.tensor([4, 4]), torch.tensor([0, 0]), expensive)
    assert all(paused(policy))  # alpha (0 + 2) / (1.8 + 3)
    policy = AdaptiveDraftLength(max_k=8, start_k=4, min_tests=1)
    policy.next_lengths(2)
    policy.update(torch.tensor([4, 4]), torch.tensor([4, 3]), expensive)
    assert not any(paused(policy))


def test_relative_pass_cost_is_the_lower_envelope_optimistic_where_not_measured():
    measured = StepCosts()
    assert measured.relative_pass_cost(5) is None
    measured.add_target_pass(5, 3.0)
    assert measured.relative_pass_cost(9) == 1.0  # one length measured: flat
    measured.add_target_pass(1, 1.0)
    measured.add_target_pass(3, 2.0)
    assert measured.relative_pass_cost(1) == pytest.approx(1.0)
    assert measured.relative_pass_cost(3) == pytest.approx(2.0)
    # Not measured: the cost of the longest measured length below (optimistic).
    assert measured.relative_pass_cost(2) == pytest.approx(1.0)
    assert measured.relative_pass_cost(4) == pytest.approx(2.0)
    assert measured.relative_pass_cost(9) == pytest.approx(3.0)
    # A longer pass measured cheaper (a faster kernel for more rows) lowers the shorter ones:
    # a pass could always be padded to that length.
    measured.add_target_pass(8, 1.6)
    assert measured.relative_pass_cost(5) == pytest.approx(1.6)
    assert measured.relative_pass_cost(3) == pytest.approx(1.6)
    assert measured.relative_pass_cost(2) == pytest.approx(1.0)
    assert measured.relative_pass_cost(20) == pytest.approx(1.6)


def test_adaptive_caps_row_lengths_at_the_theory_best_k():
    """alpha 0.8, c 0.4 and passes costing 1 + 0.25 (n - 1): the theory's best k is 1."""
    measured = StepCosts()
    measured.draft_step.add(0.4)
    for n in (1, 3, 5):
        measured.add_target_pass(n, 1.0 + 0.25 * (n - 1))
    policy = AdaptiveDraftLength(max_k=8, start_k=6, min_tests=1)
    policy.next_lengths(2)
    policy.update(torch.tensor([6, 6]), torch.tensor([5, 5]), measured)  # per row 5 kept of 6
    assert alphas(policy) == [pytest.approx(7 / 9)] * 2  # (5 + 2) / (6 + 3) with the prior
    assert [policy.rows[row].best_k for row in (0, 1)] == [1, 1]
    assert policy.next_lengths(2).tolist() == [1, 1]


def test_adaptive_needs_min_tests_before_pausing():
    """One unlucky first step (nothing kept) must not stop drafting by itself."""
    slow = costs(0.9)
    policy = AdaptiveDraftLength(max_k=4, start_k=2)  # default min_tests = 12
    for _ in range(11):
        policy.update(policy.next_lengths(1), lengths(0), slow)  # one failed keep test each
    assert paused(policy) == [False]
    policy.update(policy.next_lengths(1), lengths(0), slow)
    assert paused(policy) == [True]  # 12 failed keep tests


def test_adaptive_rows_are_independent_and_a_joining_row_starts_from_the_prior():
    policy = AdaptiveDraftLength(max_k=8, start_k=3)
    assert policy.next_lengths(["a", "b"]).tolist() == [3, 3]
    policy.update(["a", "b"], lengths(3, 3), lengths(3, 0), StepCosts())
    assert policy.next_lengths(["a", "b", "c"]).tolist() == [4, 2, 3]  # c joins at start_k
    policy.forget("a")
    assert "a" not in policy.rows
    assert policy.next_lengths(["a"]).tolist() == [3]  # a forgotten row starts afresh


def test_adaptive_asks_once_for_a_target_only_step_to_time_a_one_token_pass():
    """Without the cost of a 1-token target pass the theory cannot tell whether drafting pays:
    after the first drafting step the policy asks for one target-only step, once."""
    policy = AdaptiveDraftLength(max_k=4, start_k=3)
    measured = StepCosts()
    assert policy.next_lengths(2).tolist() == [3, 3]
    measured.add_target_pass(4, 1.0)  # the engine timed the 4-token pass
    policy.update(lengths(3, 3), lengths(3, 1), measured)
    assert policy.next_lengths(2).tolist() == [0, 0]  # the 1-token pass to time
    measured.add_target_pass(1, 0.3)
    policy.update(lengths(0, 0), lengths(0, 0), measured)
    assert policy.next_lengths(2).tolist() == [4, 2]
    policy.update(lengths(4, 2), lengths(4, 2), measured)
    assert bool((policy.next_lengths(2) > 0).all())  # never again
