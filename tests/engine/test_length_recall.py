"""AdaptiveDraftLength's constructor and its cost memory: the arguments it accepts and its
defaults, what `recall` takes from a CostMemory (and what it skips), how remembered keep counts
seed the pooled prior, what `keep_state` writes, the check of a remembered batch size's first
passes, and when the memory is written."""

from __future__ import annotations

import pytest
from test_length import costs, warmed
from test_memory import KEY, NO_DRAFT, NO_PASSES, YES_DRAFT, lengths, remembered

from specsample.engine.length import PRIOR_KEPT, TRUST_SAMPLES, AdaptiveDraftLength, StepCosts
from specsample.engine.memory import MATCH_FACTOR, CostMemory


def entry(verdict: bool | None, draft: float, passes: dict[int, list[float]]) -> dict:
    """A CostMemory entry of one batch size, as AdaptiveDraftLength.memory_state writes it."""
    return {
        "verdict": verdict,
        "draft_step": [draft] * 2,
        "target_pass": {str(n): seconds for n, seconds in passes.items()},
    }


def written(tmp_path, buckets: dict[int, dict], keep: dict | None = None) -> CostMemory:
    """A memory file holding these entries (and keep counts), read back as a later process
    would."""
    CostMemory(KEY, tmp_path).save(buckets, keep=keep)
    return CostMemory(KEY, tmp_path)


def steep_costs() -> StepCosts:
    """Trusted pass costs where each token adds half a 1-token pass (1.5x for 2 tokens, 2x for
    3, 3x for 5) and a cheap draft pass: drafting pays for one row."""
    measured = StepCosts()
    for _ in range(TRUST_SAMPLES):
        measured.draft_step.add(0.05)
        for tokens, seconds in {1: 1.0, 2: 1.5, 3: 2.0, 5: 3.0}.items():
            measured.add_target_pass(tokens, seconds)
    return measured


# llama.cpp on 2 cores (test_memory.py): a remembered "no" with its costs
GOOD = entry(False, NO_DRAFT, {1: [NO_PASSES[1]] * 2, 5: [NO_PASSES[5]] * 2})


# ---------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    "kwargs",
    [{"max_k": 1}, {"probe_every": 1}, {"recheck_every": 1}, {"early_tests": 1}],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_the_least_value_each_count_argument_allows_is_accepted(kwargs):
    """max_k, probe_every, recheck_every and early_tests are "an integer >= 1": 1 itself is
    allowed (a one-token drafter, a probe or recheck every step, early pauses from the first
    test) and kept as given."""
    policy = AdaptiveDraftLength(**kwargs)
    for name, value in kwargs.items():
        assert getattr(policy, name) == value


@pytest.mark.parametrize("probe_every", [True, 2.5])
def test_probe_every_must_be_an_integer_and_not_a_bool(probe_every):
    """A bool or a float is refused with an error naming the argument, as for max_k."""
    with pytest.raises(ValueError, match="^probe_every: expected an integer >= 1"):
        AdaptiveDraftLength(probe_every=probe_every)


def test_a_new_policy_has_no_verdict_yet():
    """can_pay, the verdict of the last call's batch size, is None (not known) until a call."""
    assert AdaptiveDraftLength().can_pay is None


def test_the_default_longest_draft_is_16_tokens():
    """max_k defaults to 16: on flat pass costs, where every longer draft costs about as much
    to verify, lengths="costs" offers the longest allowed draft, and that is 16."""
    policy = warmed(AdaptiveDraftLength(lengths="costs"), costs(0.05), rows=1)
    assert policy.next_lengths(1).tolist() == [16]


def test_a_paused_row_first_probes_after_8_steps_by_default():
    """probe_every defaults to 8: a row paused on its first step drafts nothing for 7 steps and
    one probe token on the 8th (c = 0.8: a rejected draft makes the row pause)."""
    slow = costs(0.8)
    policy = warmed(AdaptiveDraftLength(max_k=4, start_k=2, min_tests=1), slow, rows=1)
    assert policy.next_lengths(1).tolist() == [1]
    policy.update(lengths(1), lengths(0), slow)
    assert policy.rows[0].paused
    asked = []
    for _ in range(10):
        k = policy.next_lengths(1)
        asked.append(int(k))
        policy.update(k, lengths(0), slow)
    assert asked == [0] * 7 + [1, 0, 0]


def test_batch_passes_are_priced_by_the_widest_row_unless_the_target_is_ragged():
    """A policy not told otherwise (ragged_passes False: a padded target, as transformers')
    prices a batch pass by its widest row: one row's single draft in a batch of 2 costs a
    2-token pass over both rows (1.5x), more than it may add, and trim cuts it. A ragged
    target (llama.cpp) feeds 3 tokens for the 2 rows (1.25x): the draft is worth verifying."""
    steep = steep_costs()
    padded, ragged = AdaptiveDraftLength(8), AdaptiveDraftLength(8)
    ragged.ragged_passes = True
    for policy in (padded, ragged):
        warmed(policy, steep, rows=2)
        policy.next_lengths(2)
    assert padded.trim([0, 1], [1, 0]) == 0
    assert ragged.trim([0, 1], [1, 0]) == 1


def test_trim_needs_no_next_lengths_call_first():
    """A policy settled by update alone (no next_lengths call yet) fits a pass: no row is
    probing, so nothing keeps trim from cutting a draft that does not pay."""
    steep = steep_costs()
    policy = AdaptiveDraftLength(8)
    policy.update([0, 1], lengths(0, 0), lengths(0, 0), steep)
    assert policy.can_pay is True
    assert policy.trim([0, 1], [1, 0]) == 0


def test_a_row_that_joins_before_any_pass_is_timed_starts_at_start_k():
    """The cap on a row's length comes from the pass costs; a row that joins while the costs
    hold no timed pass has nothing to cap it, and drafts start_k."""
    policy = warmed(AdaptiveDraftLength(max_k=8, start_k=3), costs(0.05), rows=["a"])
    policy.next_lengths(["a"])
    policy.update(["a"], lengths(0), lengths(0), StepCosts())  # a step with no costs timed
    assert policy.can_pay is True
    assert policy.next_lengths(["b"]).tolist() == [3]


# ---------------------------------------------------------------- recall


def test_recall_of_an_empty_memory_takes_nothing(tmp_path):
    """recall says whether it took anything: False (a bool) for a memory with no file, and the
    memory records the same."""
    memory = CostMemory(KEY, tmp_path)
    policy = AdaptiveDraftLength()
    assert policy.recall(memory) is False
    assert memory.recalled is False
    assert policy.verdicts == {} and policy.bucket_costs == {}


@pytest.mark.parametrize(
    ("bucket", "bad"),
    [
        (0, GOOD),  # no batch of 0 rows
        (1, {**GOOD, "target_pass": {"1": ["slow"]}}),  # damaged samples
        (1, {**GOOD, "target_pass": {"5": [NO_PASSES[5]] * 2}}),  # no 1-token pass
        (1, {**GOOD, "target_pass": {"1": [0.0, 0.0], "5": [0.0, 0.0]}}),  # 0-second passes
        (1, {**GOOD, "verdict": "no"}),  # not a verdict
    ],
    ids=["batch-0", "damaged", "no-1-token-pass", "zero-seconds", "bad-verdict"],
)
def test_recall_skips_an_unusable_entry_and_takes_the_ones_after_it(tmp_path, bucket, bad):
    """An entry recall cannot use (a batch size below 1, samples that are not seconds, no
    1-token pass to price the others against, 1-token passes of 0 seconds, a verdict that is
    not True, False or None) is skipped, and the usable entries written after it are taken."""
    memory = written(tmp_path, {bucket: bad, 2: GOOD})
    policy = AdaptiveDraftLength()
    assert policy.recall(memory) is True
    assert policy.verdicts == {2: False}
    assert set(policy.bucket_costs) == {2}
    assert policy.bucket_costs[2].target(5) == pytest.approx(NO_PASSES[5])


def test_remembered_keep_counts_below_the_prior_weight_are_taken_whole(tmp_path):
    """Keep counts of fewer than PRIOR_TESTS (3) tests at position 0 are taken as they are and
    the fixed prior (2 of 3) makes up the rest: 1 test, 0.5 kept gives a position-0 rate of
    (0.5 + 2/3 * 2) / 3, the prior of a row that joins."""
    memory = written(tmp_path, {}, keep={"tests": [1.0], "kept": [0.5]})
    policy = AdaptiveDraftLength()
    assert policy.recall(memory) is True
    assert policy.pooled.position_tests == [1.0] and policy.pooled.position_kept == [0.5]
    expected = (0.5 + PRIOR_KEPT / 3 * 2) / 3
    assert policy.pooled.position_rates(1) == [pytest.approx(expected)]
    assert policy.rates(policy.schedule("new"), 1) == [pytest.approx(expected)]


def test_remembered_keep_counts_are_scaled_to_the_prior_weight(tmp_path):
    """Counts of more than PRIOR_TESTS tests at position 0 are scaled down to PRIOR_TESTS
    there (every position by the same factor, so the keep rates stand) with no fixed prior
    left: a prior that a row's own tests outweigh within a few steps, not a verdict."""
    memory = written(tmp_path, {}, keep={"tests": [6.0, 4.0], "kept": [3.0, 1.0]})
    policy = AdaptiveDraftLength()
    assert policy.recall(memory) is True
    assert policy.pooled.position_tests == pytest.approx([3.0, 2.0])
    assert policy.pooled.position_kept == pytest.approx([1.5, 0.5])
    assert policy.pooled.prior_weight == 0.0
    # position 1: its own 0.5 of 2 and the rate before it (0.5) with one test's weight
    assert policy.pooled.position_rates(2) == pytest.approx([0.5, 1 / 3])


# ---------------------------------------------------------------- keep_state


def test_keep_state_holds_the_pooled_counts_from_the_first_test_to_a_millionth():
    """keep_state (what a CostMemory keeps of the keep tests) holds the pooled decayed counts
    by position from the first keep test on, to 6 decimals (a millionth of a test). With
    smoothing 1/3 a step decays the older counts by 2/3: after a step of 2 drafts that kept 1
    and one that kept both, each position saw 1 + 2/3 tests."""
    policy = warmed(AdaptiveDraftLength(max_k=4, start_k=2, smoothing=1 / 3), costs(0.05), 1)
    assert policy.keep_state() is None  # no keep test yet
    policy.next_lengths(1)
    policy.update(lengths(2), lengths(1), costs(0.05))
    assert policy.keep_state() == {"tests": [1.0, 1.0], "kept": [1.0, 0.0]}
    policy.next_lengths(1)
    policy.update(lengths(2), lengths(2), costs(0.05))
    assert policy.keep_state() == {"tests": [1.666667, 1.666667], "kept": [1.666667, 1.0]}


# ---------------------------------------------------------------- the check of a recalled memory


def recalled_yes(tmp_path, passes: dict[int, list[float]]) -> AdaptiveDraftLength:
    """A policy that recalled a "yes" for one row with these remembered target passes."""
    policy = AdaptiveDraftLength(16, lengths="costs")
    assert policy.recall(written(tmp_path, {1: entry(True, YES_DRAFT, passes)}))
    return policy


@pytest.mark.parametrize(
    ("passes", "width", "seconds"),
    [
        # between the remembered 1 and 5 tokens: on the line between them, (0.40 + 0.68) / 2
        ({1: [0.40] * 2, 5: [0.68]}, 3, 0.54),
        # a remembered width: its own cost, 1.5 times the remembered 1-token pass
        ({1: [0.40] * 2, 2: [0.60] * 2, 5: [0.68]}, 2, 0.60),
        ({1: [0.40] * 2, 2: [0.60] * 2, 5: [0.68]}, 1, 0.40),
    ],
    ids=["interpolated", "two-tokens", "one-token"],
)
def test_passes_at_the_remembered_cost_of_their_width_keep_the_memory(
    tmp_path, passes, width, seconds
):
    """A remembered batch size's first passes are priced at the remembered cost of their own
    width (relative to a 1-token pass, times the remembered 1-token pass; between remembered
    widths on the line between them). Passes at exactly that cost keep the memory, however
    many of them run."""
    policy = recalled_yes(tmp_path, passes)
    measured = policy.bucket_costs[1]
    for _ in range(3):
        policy.next_lengths(1)
        for _ in range(width - 1):
            measured.draft_step.add(YES_DRAFT)
        measured.add_target_pass(width, seconds)
        policy.update(lengths(width - 1), lengths(width - 1), measured)
        assert policy.verdicts == {1: True} and not policy.memory.dropped


@pytest.mark.parametrize("bound", ["slower", "faster"])
def test_passes_exactly_at_the_match_factor_keep_the_memory(tmp_path, bound):
    """Bounds included: 1-token passes at exactly 1.3 times, or 1 / 1.3 of, the remembered one
    (every remembered pass alike: median and fastest are equal) keep a remembered "no"."""
    policy = AdaptiveDraftLength(16)
    assert policy.recall(remembered(tmp_path, NO_DRAFT, NO_PASSES))
    measured = policy.bucket_costs[1]
    single = measured.target(1)
    seconds = single * MATCH_FACTOR if bound == "slower" else single / MATCH_FACTOR
    for _ in range(3):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, seconds)
        policy.update(lengths(0), lengths(0), measured)
        assert policy.verdicts == {1: False} and not policy.memory.dropped


def test_a_dropped_memory_leaves_no_verdict_to_be_kept(tmp_path):
    """Once two first passes (faster than remembered) contradict a remembered "no", the batch
    size has no verdict, in force or for the memory to keep, until its own cost check reaches
    one."""
    policy = AdaptiveDraftLength(16)
    assert policy.recall(remembered(tmp_path, NO_DRAFT, NO_PASSES))
    measured = policy.bucket_costs[1]
    for _ in range(2):
        policy.next_lengths(1)
        measured.add_target_pass(1, NO_PASSES[1] / 1.4)
        policy.update(lengths(0), lengths(0), measured)
    assert policy.memory.dropped == [1]
    assert 1 not in policy.verdicts
    assert policy.memory_state()[1]["verdict"] is None


# ---------------------------------------------------------------- writing the memory


def test_an_ending_request_writes_the_memory_only_after_new_keep_tests(tmp_path, monkeypatch):
    """forget (a request ended) writes the keep counts when keep tests ran since the memory was
    last written, and only then: not before any test, and not again for a second request
    that ends with no new test."""
    memory = CostMemory(KEY, tmp_path)
    writes = []
    save = memory.save
    monkeypatch.setattr(
        memory, "save", lambda *args, **kwargs: writes.append(1) or save(*args, **kwargs)
    )
    policy = AdaptiveDraftLength(8, start_k=2)
    assert policy.recall(memory) is False
    policy.forget("early")  # no keep test yet
    assert writes == [] and not memory.path.exists()
    warmed(policy, costs(0.05), rows=[0])  # the verdict is written
    assert len(writes) == 1
    policy.next_lengths([0])
    policy.update([0], lengths(2), lengths(1), costs(0.05))
    policy.forget(0)  # its keep tests are written
    assert len(writes) == 2 and memory.load_keep() is not None
    policy.forget("late")  # nothing new since
    assert len(writes) == 2


def test_a_second_memory_is_refused(tmp_path):
    """A policy takes one memory: a second recall would merge two settings' costs and write
    both files with them."""
    policy = AdaptiveDraftLength(max_k=8)
    first = CostMemory({"setting": 1}, tmp_path)
    policy.recall(first)
    with pytest.raises(RuntimeError, match=r"recall: expected a policy without a memory.*costs-"):
        policy.recall(CostMemory({"setting": 2}, tmp_path))
    assert policy.memory is first


def _recalled_with_cold_passes(tmp_path) -> AdaptiveDraftLength:
    """A remembered "no" whose 1-token passes were timed by a cold process (this machine's
    memory file on 2026-12-01): 52.6, 43.3 and 39.5 ms, median 43.3, fastest 39.5."""
    policy = AdaptiveDraftLength(16)
    assert policy.recall(remembered(tmp_path, NO_DRAFT, NO_PASSES))
    single = policy._recalled[1].target_pass[1]
    single.samples.clear()
    single.samples.extend([0.0526, 0.0433, 0.0395])
    return policy


def test_a_warm_pass_faster_than_the_remembered_median_keeps_the_memory(tmp_path):
    """A warm process's 1-token passes (33 ms) beat the remembered median by more than 1.3x
    but not the remembered fastest pass: the same machine, the memory stands (before, two
    such passes dropped it and the cost check ran again)."""
    policy = _recalled_with_cold_passes(tmp_path)
    measured = policy.bucket_costs[1]
    assert 0.0433 / 0.033 > MATCH_FACTOR > 0.0395 / 0.033
    for _ in range(3):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, 0.033)
        policy.update(lengths(0), lengths(0), measured)
    assert policy.verdicts == {1: False} and not policy.memory.dropped


def test_a_pass_faster_than_the_remembered_fastest_by_the_factor_drops_the_memory(tmp_path):
    policy = _recalled_with_cold_passes(tmp_path)
    measured = policy.bucket_costs[1]
    for _ in range(2):
        policy.next_lengths(1)
        measured.add_target_pass(1, 0.0395 / MATCH_FACTOR * 0.97)
        policy.update(lengths(0), lengths(0), measured)
    assert policy.memory.dropped == [1]


def test_a_slow_pass_is_checked_against_the_remembered_1_token_pass_not_a_longer_one(tmp_path):
    """The memory holds a 2-token pass too (twice the 1-token one). A 1-token pass 1.6x the
    remembered one is slower than MATCH_FACTOR allows, though within it of the 2-token pass:
    two of them contradict the memory (a remembered "no" then stands, `slower`)."""
    policy = AdaptiveDraftLength(16)
    assert policy.recall(remembered(tmp_path, NO_DRAFT, NO_PASSES))
    twin = policy._recalled[1]
    for _ in range(2):
        twin.add_target_pass(2, 2 * NO_PASSES[1])
    measured = policy.bucket_costs[1]
    assert 1.6 > MATCH_FACTOR and 1.6 / 2 < MATCH_FACTOR
    for _ in range(2):
        policy.next_lengths(1)
        measured.add_target_pass(1, 1.6 * NO_PASSES[1])
        policy.update(lengths(0), lengths(0), measured)
    assert policy.memory.slower == [1] and policy.verdicts == {1: False}
