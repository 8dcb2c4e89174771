"""The adaptive policy's step: the lengths next_lengths returns (their dtype in every phase of
the cost check, probes and the cost cap), a batch's depth, trim's width and its pass prices,
and what update accepts. Builders come from test_length and test_fit_passes."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit_passes import KINKED, curve, settled
from test_length import costs, lengths, warmed
from test_memory import KEY

from specsample.engine.length import (
    FIRST_SINGLE_PASSES,
    GUARD_STEPS,
    RETIME_BELOW,
    AdaptiveDraftLength,
    StepCosts,
)
from specsample.engine.memory import CostMemory


def linear(step: float, draft: float, longest: int = 9) -> StepCosts:
    """Passes over n tokens costing 1 + step (n - 1) 1-token passes up to `longest`, a draft pass
    `draft` (0: a drafter without a model, no draft pass timed), each timed TRUST_SAMPLES times."""
    measured = curve({n: 1.0 + step * (n - 1) for n in range(1, longest + 1)}, draft=draft)
    if not draft:
        measured.draft_step = StepCosts().draft_step
    return measured


# ---------------------------------------------------------------- next_lengths: the lengths


def test_lengths_are_int64_in_every_phase_of_the_cost_check():
    """The engine takes the lengths as int64 counts: the first FIRST_SINGLE_PASSES target-only
    steps, the probe, a drafting step after the "yes", target-only steps after a "no" and a
    recheck's one-token draft all return them as int64."""
    policy = AdaptiveDraftLength(max_k=8, recheck_every=2)
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        asked = policy.next_lengths(2)
        assert asked.tolist() == [0, 0] and asked.dtype == torch.int64
        measured.add_target_pass(1, 1.0)
        policy.update(lengths(0, 0), lengths(0, 0), measured)
    probe = policy.next_lengths(2)
    assert probe.tolist() == [4, 4] and probe.dtype == torch.int64
    yes = costs(0.05)
    policy.update(lengths(4, 4), lengths(4, 4), yes)
    assert policy.can_pay is True
    drafting = policy.next_lengths(2)
    assert min(drafting.tolist()) >= 1 and drafting.dtype == torch.int64
    no = costs(2.0, target_pass=1.0)  # a draft pass dearer than a target pass: no
    policy.update(lengths(1, 1), lengths(1, 1), no)
    assert policy.can_pay is False
    target_only = policy.next_lengths(2)
    assert target_only.tolist() == [0, 0] and target_only.dtype == torch.int64
    policy.update(lengths(0, 0), lengths(0, 0), no)
    recheck = policy.next_lengths(2)
    assert recheck.tolist() == [1, 1] and recheck.dtype == torch.int64


def test_the_step_that_retimes_a_one_token_pass_asks_for_int64_zeros():
    """After a cold start (fewer than RETIME_BELOW 1-token passes: the cost check's
    FIRST_SINGLE_PASSES) the step before the check of real steps is target-only: int64 zeros,
    like every other step's lengths."""
    assert FIRST_SINGLE_PASSES < RETIME_BELOW
    slow = StepCosts()
    for _ in range(2):  # a "no" needs two samples of every cost it rests on
        slow.draft_step.add(0.1)
        slow.add_target_pass(9, 2.0)
    for _ in range(FIRST_SINGLE_PASSES):  # the cost check's first 1-token passes
        slow.add_target_pass(1, 2.0)
    policy = warmed(AdaptiveDraftLength(max_k=16), slow, rows=1)
    for _ in range(GUARD_STEPS - 1):
        assert int(policy.next_lengths(1)) > 0
        slow.last_step_seconds = 5.5
        policy.update(lengths(4), lengths(4), slow)
    retime = policy.next_lengths(1)
    assert retime.tolist() == [0] and retime.dtype == torch.int64


def test_an_empty_batch_gets_no_lengths_and_no_width():
    """A step over no rows: an empty int64 tensor of lengths, and trim's width is 0."""
    policy = warmed(AdaptiveDraftLength(max_k=8), costs(0.05), rows=1)
    asked = policy.next_lengths([])
    assert asked.tolist() == [] and asked.dtype == torch.int64
    assert policy.trim([], []) == 0


def test_the_recheck_gap_starts_over_after_a_yes():
    """With recheck_every, a "no" is measured again after that many steps, then after twice as
    many; once a step drafts under a "yes", the next "no" is rechecked after recheck_every
    steps again, not after the doubled gap."""
    policy = warmed(AdaptiveDraftLength(max_k=8, recheck_every=2), costs(0.05), rows=1)
    no, yes = costs(2.0), costs(0.05)

    def until_recheck(measured: StepCosts) -> int:
        """Steps up to and including the recheck (its one draft timed with `measured`)."""
        for step in range(1, 20):
            k = int(policy.next_lengths(1))
            policy.update(lengths(k), lengths(k), measured)
            if k:
                return step
        raise AssertionError("no recheck")

    assert int(policy.next_lengths(1)) > 0
    policy.update(lengths(1), lengths(1), no)
    assert policy.can_pay is False
    assert until_recheck(no) == 2
    assert until_recheck(yes) == 4  # the gap doubled; this recheck says yes
    assert policy.can_pay is True
    assert int(policy.next_lengths(1)) > 0  # a drafting step under the yes
    policy.update(lengths(1), lengths(1), no)
    assert policy.can_pay is False
    assert until_recheck(no) == 2


def test_a_paused_row_probes_with_one_token_under_theory():
    """Under lengths="theory" a paused row's probe is a single draft (the cheapest measure of
    its acceptance), and between probes it drafts nothing."""
    slow = costs(0.8)
    policy = AdaptiveDraftLength(max_k=4, start_k=2, probe_every=3, min_tests=1)
    warmed(policy, slow, rows=1)
    assert policy.next_lengths(1).tolist() == [1]
    policy.update(lengths(1), lengths(0), slow)
    assert policy.rows[0].paused
    asked = []
    for _ in range(3):
        asked.append(int(policy.next_lengths(1)))
        policy.update(lengths(asked[-1]), lengths(0), slow)
    assert asked == [0, 0, 1]


def test_before_min_tests_a_row_whose_best_k_is_one_drafts_one_token():
    """Before min_tests a row's length is its schedule capped by its best k, at least 1: with
    passes that cost 0.3 more per token and a draft pass 0.3, one draft is best at the prior's
    2/3 (1.67 tokens for 1.6 passes; two drafts 2.11 for 2.2), so a row starting at 4 drafts
    one token."""
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=4), linear(0.3, 0.3), rows=1)
    assert policy.next_lengths(1).tolist() == [1]
    assert policy.rows[0].k == 4 and policy.rows[0].best_k == 1


def test_a_two_row_batch_is_cut_to_its_best_depth():
    """Two rows, one keeping every draft (asks for 2), one rejecting them (asks for 1), on
    passes that cost 0.1 more per token with a draft pass 0.5: drafting 2 deep makes the
    second row wait through a draft pass for nothing, and the step is cut to depth 1."""
    measured = linear(0.1, 0.5)
    rows = [0, 1]
    policy = AdaptiveDraftLength(max_k=2, start_k=2, min_tests=100, early_tests=None)
    warmed(policy, measured, rows=rows)
    for _ in range(12):
        policy.update(rows, lengths(2, 2), lengths(2, 0), measured)
    wanted = [min(policy.rows[r].k, max(1, policy.rows[r].best_k)) for r in rows]
    assert wanted == [2, 1]
    assert policy.next_lengths(rows).tolist() == [1, 1]


# ---------------------------------------------------------------- lengths="costs": the cap


def test_the_cost_cap_may_be_a_single_draft():
    """lengths="costs": where a 2-token pass costs a 1-token one and every further token a
    whole pass, one draft is the longest the costs justify (2 tokens for 1.1 passes; two
    drafts 3 for 2.2)."""
    steep = curve({1: 1.0, **{n: n - 1.0 for n in range(2, 10)}}, draft=0.1)
    policy = warmed(AdaptiveDraftLength(max_k=8, lengths="costs"), steep, rows=1)
    assert policy.next_lengths(1).tolist() == [1]


def test_the_cost_cap_takes_the_longer_draft_on_a_tie():
    """lengths="costs": with no draft pass (c = 0), 2 tokens for a 1-token pass's cost tie
    with 3 tokens for 1.5: the longer draft is offered."""
    tie = curve({1: 1.0, 2: 1.0, 3: 1.5}, draft=0.0)
    tie.draft_step = StepCosts().draft_step
    policy = warmed(AdaptiveDraftLength(max_k=2, lengths="costs"), tie, rows=1)
    assert policy.next_lengths(1).tolist() == [2]


def test_costs_that_cannot_tell_keep_the_yes_with_no_cap_and_no_trim():
    """update() with costs that hold no target pass keeps the last verdict; with nothing to
    price, lengths="costs" offers no cap (the row's schedule decides: start_k) and trim
    verifies every draft made."""
    policy = warmed(AdaptiveDraftLength(max_k=16, lengths="costs"), costs(0.05), rows=1)
    assert policy.next_lengths(1).tolist() == [16]
    policy.update(lengths(0), lengths(0), StepCosts())
    assert policy.can_pay is True
    assert policy.next_lengths(1).tolist() == [4]
    assert policy.trim([0], [4]) == 4


# ---------------------------------------------------------------- a batch's depth


def test_rows_that_join_are_priced_with_the_pooled_keep_rates():
    """Two rows kept every draft for 12 steps; two rows that join start from those pooled
    rates (near 1), not the fixed 2/3: their batch drafts 8 deep where, at 2/3 with a draft
    pass of 0.5, depth 1 would have the most tokens per cost."""
    measured = linear(0.1, 0.5)
    policy = AdaptiveDraftLength(max_k=8, start_k=8, min_tests=100, early_tests=None)
    warmed(policy, measured, rows=[0, 1])
    for _ in range(12):
        policy.next_lengths([0, 1])
        policy.update([0, 1], lengths(8, 8), lengths(8, 8), measured)
    assert policy.next_lengths(["a", "b"]).tolist() == [8, 8]
    fixed = AdaptiveDraftLength(max_k=8, start_k=8)
    warmed(fixed, measured, rows=["a", "b"])
    assert fixed._batch_depth(["a", "b"], [8, 8], measured) == 1


def test_the_batch_depth_never_exceeds_the_deepest_draft_asked():
    """A 4-token pass timed once at a 1-token pass's cost (untrusted: it prices only itself)
    makes a depth of 3 look cheap, but the rows asked for 2 and 1: the depth is chosen in
    1..2 (here 1: 2 tokens per row for 1.5 passes beat a second row's worth of 2/3 for 2)."""
    measured = curve({1: 1.0, 2: 1.5, 3: 2.0}, draft=0.0)
    measured.draft_step = StepCosts().draft_step
    measured.add_target_pass(4, 1.0)
    policy = settled(AdaptiveDraftLength(max_k=2), measured, rows=(0, 1))
    assert policy._batch_depth([0, 1], [2, 1], measured) == 1


def test_a_batch_drafts_no_deeper_than_what_adds_expected_tokens():
    """With smoothing 1 (only the last step counts) two rows that rejected their first draft
    expect nothing from any draft; with no draft pass and flat passes every depth then has the
    same tokens per cost, and the shallowest (1) is drafted."""
    flat = curve({n: 1.0 for n in range(1, 6)}, draft=0.0)
    flat.draft_step = StepCosts().draft_step
    policy = settled(AdaptiveDraftLength(max_k=8, smoothing=1.0), flat, rows=(0, 1))
    policy.update([0, 1], lengths(3, 3), lengths(0, 0), flat)
    assert policy.rates(policy.rows[0], 3) == [0.0, 0.0, 0.0]
    assert policy._batch_depth([0, 1], [3, 3], flat) == 1


# ---------------------------------------------------------------- trim and its pass prices


def test_one_row_on_a_ragged_model_is_trimmed_as_on_a_padded_one():
    """A ragged pass over one row feeds that row's tokens: it costs what a padded one does.
    On the kinked curve one draft is dropped and two are verified; on a curve timed up to 5
    tokens, a row that keeps its drafts has 20 verified whole (past the longest timed width a
    pass is priced like it, not along the chord)."""
    wide = curve({1: 1.0, 2: 1.8, 5: 3.0})
    for ragged in (False, True):
        policy = AdaptiveDraftLength(max_k=8, lengths="costs")
        policy.ragged_passes = ragged
        settled(policy, curve(KINKED))
        policy.next_lengths([0])
        assert policy.trim([0], [1]) == 0, ragged
        assert policy.trim([0], [2]) == 2, ragged
        policy = AdaptiveDraftLength(max_k=20, lengths="costs")
        policy.ragged_passes = ragged
        settled(policy, wide)
        for _ in range(6):
            policy.next_lengths([0])
            policy.update([0], lengths(4), lengths(4), wide)
        policy.next_lengths([0])
        assert policy.trim([0], [20]) == 20, ragged


def test_trim_does_not_let_one_slow_pass_price_a_width_out():
    """Passes over 1 and 2 tokens trusted (1.0, 1.1), a 3-token pass timed once while the
    machine was busy (5.0): trim prices that width along the trusted curve (1.2), so a fresh
    row's 2 drafts are verified (were it priced at 5.0, they would be cut to 1)."""
    measured = curve({1: 1.0, 2: 1.1})
    measured.add_target_pass(3, 5.0)
    policy = settled(AdaptiveDraftLength(max_k=2), measured)
    policy.next_lengths([0])
    assert policy.trim([0], [2]) == 2


def test_trim_cuts_nothing_during_the_cost_checks_probes():
    """Before the verdict the probe must time the pass it asked for: a second probe (the
    first one's steep 5-token pass cannot say "no" alone) is verified whole, though on the
    costs seen so far a narrower width would look cheaper."""
    policy = AdaptiveDraftLength(max_k=8)
    measured = StepCosts()
    for _ in range(FIRST_SINGLE_PASSES):
        policy.next_lengths([0])
        measured.add_target_pass(1, 1.0)
        policy.update([0], lengths(0), lengths(0), measured)
    assert policy.next_lengths([0]).tolist() == [4]
    for _ in range(4):
        measured.draft_step.add(0.45)
    measured.add_target_pass(5, 3.9)
    policy.update([0], lengths(4), lengths(4), measured)
    assert policy.can_pay is None
    assert policy.next_lengths([0]).tolist() == [4]
    assert policy.trim([0], [4]) == 4


# ---------------------------------------------------------------- update


def test_update_rejects_drafts_and_keeps_of_different_lengths():
    """One drafted and one accepted count per row: a step whose counts do not line up with
    its rows is an error that names the arguments and their lengths, raised before any row is
    counted (not silently cut to the shortest, nor half a step counted)."""
    measured = costs(0.05)
    policy = warmed(AdaptiveDraftLength(max_k=8), measured, rows=2)
    policy.next_lengths(2)
    before = {
        row: (list(s.position_tests), list(s.position_kept)) for row, s in policy.rows.items()
    }
    with pytest.raises(ValueError, match=r"2 rows, 2 drafted and 1 accepted"):
        policy.update([0, 1], lengths(2, 2), lengths(1), measured)
    with pytest.raises(ValueError, match=r"rows, drafted and accepted"):
        policy.update(lengths(2, 2), lengths(1), measured)
    after = {row: (list(s.position_tests), list(s.position_kept)) for row, s in policy.rows.items()}
    assert after == before
    with pytest.raises(TypeError, match=r"got 2 arguments"):
        policy.update(lengths(2, 2), measured)


def test_a_verdict_change_is_written_though_no_new_length_was_timed(tmp_path):
    """The memory is written on every change of the cost check's verdict: a "yes" that turns
    to "no" on dearer draft passes, over the same pass lengths timed as often, is written."""
    memory = CostMemory(KEY, tmp_path)
    policy = AdaptiveDraftLength(max_k=8)
    policy.recall(memory)
    warmed(policy, costs(0.05), rows=1)

    def saved_verdict() -> bool | None:
        return json.loads(memory.path.read_text())["buckets"]["1"]["verdict"]

    assert saved_verdict() is True
    policy.next_lengths(1)
    policy.update(lengths(1), lengths(1), costs(2.0))  # the same lengths, dear drafts
    assert policy.can_pay is False
    assert saved_verdict() is False


def test_a_memory_recalled_after_a_verdict_is_written_at_the_next_step(tmp_path):
    """A policy that reached its verdict before it was given a memory (say, one that outlived
    an engine) writes its costs at its next step: the memory holds none of its pass lengths."""
    measured = costs(0.05)
    policy = warmed(AdaptiveDraftLength(max_k=8), measured, rows=1)
    memory = CostMemory(KEY, tmp_path)
    assert not policy.recall(memory)
    assert not memory.path.exists()
    policy.next_lengths(1)
    policy.update(lengths(1), lengths(1), measured)
    assert policy.can_pay is True
    saved = json.loads(memory.path.read_text())["buckets"]["1"]
    assert saved["verdict"] is True and set(saved["target_pass"]) == {"1", "9"}
