"""Draft length policies: fixed k, and the adaptive per-row schedule with its cost-based pause."""

from __future__ import annotations

import pytest
import torch

from specsample.analysis.theory import expected_speedup
from specsample.drafters.length import AdaptiveDraftLength, FixedDraftLength, StepCosts


def costs(draft_step: float, target_pass: float = 1.0) -> StepCosts:
    """Measured costs: one draft step, and a target pass that costs the same on 1 or 9 tokens."""
    measured = StepCosts()
    measured.draft_step.add(draft_step)
    measured.add_target_pass(1, target_pass)
    measured.add_target_pass(9, target_pass)
    return measured


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


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
    assert not policy.paused


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
    assert not policy.paused


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
    assert not policy.paused
    assert policy.next_lengths(2).tolist() == [1, 3]


def test_adaptive_pauses_with_probes_when_drafting_does_not_pay():
    probe_every = 4
    policy = AdaptiveDraftLength(max_k=4, start_k=2, probe_every=probe_every)
    slow = costs(0.9)  # a draft step costs nearly as much as a target pass
    k = policy.next_lengths(3)
    policy.update(k, lengths(0, 0, 0), slow)  # nothing kept
    assert policy.paused
    assert policy.alpha == 0.0
    schedule = []
    for _ in range(3 * probe_every):
        k = policy.next_lengths(3)
        schedule.append(int(k.max()))
        assert k.tolist() in ([0, 0, 0], [1, 1, 1])  # all rows target-only, or all probe
        policy.update(k, lengths(0, 0, 0), slow)  # probes rejected again
    probes = [step for step, value in enumerate(schedule) if value == 1]
    assert len(probes) == 3
    assert probes[1] - probes[0] == probes[2] - probes[1] == probe_every
    assert policy.paused


def test_adaptive_resumes_when_probes_show_high_acceptance():
    policy = AdaptiveDraftLength(max_k=8, start_k=2, probe_every=2)
    slow = costs(0.9)
    policy.update(policy.next_lengths(2), lengths(0, 0), slow)
    assert policy.paused
    resumed_at_alpha = None
    for _ in range(200):
        k = policy.next_lengths(2)
        if not policy.paused:
            resumed_at_alpha = policy.alpha
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
    assert policy.alpha is None and not policy.paused
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
