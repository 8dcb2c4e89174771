"""Fitting the verifying pass to its costs: the policy's trim (verify only the drafts worth
their pass; the draft passes are paid for) and the engine's padding (feed a pass as a wider one
where that costs less). Exactness of both through the whole loop: tests/engine/test_exactness.py."""

from __future__ import annotations

import pytest
import torch

from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.engine import generate
from specsample.engine.length import (
    EARLY_TESTS,
    PAD_GAIN,
    TRUST_SAMPLES,
    AdaptiveDraftLength,
    FixedDraftLength,
    StepCosts,
    full_pass_equivalent,
    ragged_pass_cost,
)
from specsample.warpers import SamplingConfig

# A 2-core machine's float32 curve for the default pair on transformers (1-token pass = 1):
# passes over a multiple of 4 tokens are cheap, 3 and 7 tokens dear.
KINKED = {1: 1.0, 2: 2.03, 3: 2.89, 4: 2.02, 7: 2.95, 8: 1.98}


def curve(relative: dict[int, float], draft: float = 0.084, times: int = TRUST_SAMPLES):
    measured = StepCosts()
    for _ in range(times):
        measured.draft_step.add(draft)
        for n, cost in relative.items():
            measured.add_target_pass(n, cost)
    return measured


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def settled(policy: AdaptiveDraftLength, measured: StepCosts, rows=(0,)) -> AdaptiveDraftLength:
    """The policy after one target-only step with costs under which drafting can pay."""
    ids = list(rows)
    policy.next_lengths(ids)
    policy.update(ids, lengths(*[0] * len(ids)), lengths(*[0] * len(ids)), measured)
    assert policy.can_pay
    return policy


def test_pad_width_is_the_shortest_trusted_wider_pass_a_tenth_cheaper():
    measured = curve(KINKED)
    assert measured.pad_width(3) == 4 and measured.pad_width(7) == 8
    assert measured.pad_width(2) == 2  # 4 tokens cost 2.02, not a tenth under 2.03
    assert measured.pad_width(4) == 4 and measured.pad_width(1) == 1
    assert measured.pad_width(5) == 5  # never timed: fed as it is (and so timed)
    assert PAD_GAIN == 0.1
    # a wider length timed fewer than TRUST_SAMPLES times is not trusted yet, nor is the length
    young = curve({1: 1.0, 3: 2.89})
    young.add_target_pass(4, 2.02)
    assert young.pad_width(3) == 3
    assert curve(KINKED, times=TRUST_SAMPLES - 1).pad_width(3) == 3
    # passes timed as free (a clock too coarse for them) are never padded: a wider one cannot
    # cost less than nothing, and its filler costs real time
    assert curve({1: 0.0, 3: 0.0, 4: 0.0}).pad_width(3) == 3
    # real timings are fractions of a second: the same curve in tens of milliseconds pads alike
    seconds = curve({n: 0.03 * cost for n, cost in KINKED.items()})
    assert seconds.pad_width(3) == 4 and seconds.pad_width(7) == 8


def test_trim_drops_a_draft_whose_pass_costs_more_than_the_tokens_it_may_add():
    """On the kinked curve a pass over 2 tokens costs 1.98 1-token passes at best (padded to
    8): one draft kept at 0.92 (the upper 95% bound of the prior's 2 of 3) adds 1.92 tokens
    for it, so it is dropped; two drafts (2.77 expected tokens) and three are verified. On a
    flat curve nothing is cut."""
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="costs"), curve(KINKED))
    policy.next_lengths([0])
    assert policy.trim([0], [1]) == 0
    assert policy.trim([0], [2]) == 2 and policy.trim([0], [3]) == 3
    flat = settled(AdaptiveDraftLength(max_k=8), curve({1: 1.0, 2: 1.05, 9: 1.1}))
    flat.next_lengths([0])
    assert flat.trim([0], [1]) == 1
    # a batch: the width with the most expected tokens over its rows per unit of pass cost
    batch = settled(AdaptiveDraftLength(max_k=8), curve(KINKED), rows=(0, 1))
    batch.next_lengths([0, 1])
    assert batch.trim([0, 1], [1, 0]) == 0 and batch.trim([0, 1], [3, 1]) == 3


def test_trim_cuts_nothing_before_the_cost_checks_yes_or_when_turned_off():
    policy = AdaptiveDraftLength(max_k=8)
    assert policy.next_lengths([0]).tolist() == [0]
    assert policy.trim([0], [1]) == 1  # no costs: a probe must time what it asked for
    off = settled(AdaptiveDraftLength(max_k=8, fit_passes=False), curve(KINKED))
    off.next_lengths([0])
    assert off.trim([0], [1]) == 1
    with pytest.raises(ValueError, match="fit_passes: expected True or False, got 'yes'"):
        AdaptiveDraftLength(fit_passes="yes")


def test_a_row_whose_drafts_are_cut_whole_pays_for_its_draft_passes_and_pauses():
    """Steps whose one draft is cut verify nothing, so no keep test counts; their draft passes
    are still paid for. Under "costs" the row is judged on them (1 token for 1 + c passes each)
    and pauses after EARLY_TESTS such steps; it would otherwise draft and drop forever."""
    measured = curve(KINKED)
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="costs"), measured)
    # one step that paid: 3 tokens for 3 c + r(4) = 2.27 passes (cut steps that counted no
    # draft pass, 1 token for 1 pass, would never use that up)
    policy.next_lengths([0])
    policy.update([0], lengths(3), lengths(2), measured)
    asked = []
    for _ in range(EARLY_TESTS + 4):
        k = int(policy.next_lengths([0]))
        asked.append(k)
        made = min(k, 1)  # the drafter's stops leave one draft
        width = policy.trim([0], [made])
        policy.update([0], lengths(min(made, width)), lengths(0), measured)
    assert asked[:EARLY_TESTS] == [8] * EARLY_TESTS and policy.rows[0].paused
    assert policy.rows[0].cut_steps >= EARLY_TESTS and policy.rows[0].tests_seen == 3
    assert asked[-1] == 0


def test_cut_steps_between_verified_ones_count_their_draft_passes():
    """Cut steps between verified ones (fewer than EARLY_TESTS in a row, so the streak never
    pauses the row): each verified step pays on its own (2 of 3 drafts kept: 3 tokens for
    3 c + r(4) = 2.92 passes at c = 0.3), each cut one costs its draft pass on top of the
    target-only pass (1 token for 1 + c). Three cuts per verified step lose more than it
    gains (0.2 passes per step, steadily enough that the upper bound of the mean gain is
    below 0): under "costs" the row must pause. Not counting the cut drafts' passes, it would
    draft on for good. Cut steps are evidence under "costs": EARLY_TESTS of them (not in a
    row) let the row be judged before it has seen min_tests keep tests."""
    measured = curve(KINKED, draft=0.3)
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="costs"), measured)
    state = policy.schedule(0)
    cycles = 0
    while not state.paused and cycles < 12:
        policy.next_lengths([0])
        assert policy.trim([0], [3]) == 3  # three drafts verified, two kept
        policy.update([0], lengths(3), lengths(2), measured)
        for _ in range(EARLY_TESTS - 1):
            if state.paused:
                break
            policy.next_lengths([0])
            assert policy.trim([0], [1]) == 0  # one draft, cut
            policy.update([0], lengths(0), lengths(0), measured)
            assert state.cut_streak < EARLY_TESTS
        cycles += 1
    assert state.paused and cycles < 12, cycles
    assert state.tests_seen == 3 * cycles < policy.min_tests and state.cut_steps >= EARLY_TESTS


class CutAll(FixedDraftLength):
    """A fixed length whose trim keeps `width` drafts of every step."""

    def __init__(self, k: int, width: int):
        super().__init__(k)
        self.width = width

    def trim(self, rows, depths):
        return min(self.width, max(depths))


def test_the_engine_verifies_what_trim_leaves_and_counts_the_cut_drafts():
    target = ToyLM(8, seed=3)
    draft = ToyLM(8, seed=4, base=target, noise=0.5)
    out = generate(
        target,
        [[1, 2, 3]],
        generator=torch.Generator().manual_seed(0),
        drafter=ModelDrafter(draft),
        sampling=SamplingConfig(temperature=0),
        max_new_tokens=20,
        draft_length=CutAll(4, 1),
        eos_token_ids=(),
    )
    plain = generate(
        target,
        [[1, 2, 3]],
        generator=torch.Generator().manual_seed(0),
        sampling=SamplingConfig(temperature=0),
        max_new_tokens=20,
        eos_token_ids=(),
    )
    assert out.tokens == plain.tokens  # greedy: the target's own tokens
    stats = out.stats
    assert max(stats.draft_lengths) == 1 and stats.trimmed > 0
    assert stats.draft_passes >= stats.drafted + stats.trimmed - stats.row_steps


def test_the_engine_pads_a_pass_where_a_wider_one_was_timed_cheaper(monkeypatch):
    """With padding forced (every chain pass fed 3 tokens wider), greedy decoding still gives
    the target's own tokens: the filler's cache entries are rolled back or, where the sequence
    goes on with the same token, kept as the right ones."""
    monkeypatch.setattr(StepCosts, "pad_width", lambda self, tokens, min_samples=3: tokens + 3)
    target = ToyLM(4, seed=3)
    draft = ToyLM(4, seed=4, base=target, noise=0.5)
    kwargs = dict(sampling=SamplingConfig(temperature=0), max_new_tokens=24, eos_token_ids=())
    out = generate(
        target,
        [[1, 2, 3], [0, 1]],
        generator=torch.Generator().manual_seed(0),
        drafter=ModelDrafter(draft),
        draft_length=2,
        **kwargs,
    )
    plain = generate(
        target, [[1, 2, 3], [0, 1]], generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert out.tokens == plain.tokens
    assert out.stats.padded_passes > 0


def test_one_early_rejection_does_not_get_a_row_cut_for_good():
    """Cuts are priced at the upper bound of the row's keep rate: after its first draft of 4
    was rejected the next 4-draft is still verified (at the plain estimate, 1/2 a position, it
    would be cut, nothing would be tested again, and the row would stay cut: a code prompt once
    ran at 0.93x target-only so). A row that keeps nothing pauses, and its probes are never
    cut (they measure it again), though its bound (about 0.4) would cut them."""
    measured = curve(KINKED)
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="costs"), measured)
    policy.next_lengths([0])
    policy.update([0], lengths(4), lengths(0), measured)
    policy.next_lengths([0])
    assert policy.trim([0], [4]) == 4
    for _ in range(6):
        policy.update([0], lengths(4), lengths(0), measured)
        policy.next_lengths([0])
    assert policy.rows[0].paused
    probes = []
    for _ in range(40):
        made = int(policy.next_lengths([0]))
        if made:
            probes.append(policy.trim([0], [made]) == made)
        policy.update([0], lengths(0), lengths(0), measured)
    assert policy.rows[0].paused and probes and all(probes)


def test_widths_past_the_longest_timed_one_are_priced_like_it():
    """With passes timed up to 5 tokens only (3.0), the chord from 1 token prices a 21-token
    pass at 11; trim prices it at 3.0 (verifying it times it), so a long draft of a row that
    keeps its drafts is verified whole, not cut to the few tokens the chord would allow."""
    measured = curve({1: 1.0, 2: 1.8, 5: 3.0})
    assert measured.relative_pass_cost(21, TRUST_SAMPLES) == pytest.approx(11.0)
    policy = settled(AdaptiveDraftLength(max_k=20, lengths="costs"), measured)
    for _ in range(6):  # drafts kept whole: high rates at every position
        policy.next_lengths([0])
        policy.update([0], lengths(4), lengths(4), measured)
    policy.next_lengths([0])
    assert policy.trim([0], [20]) == 20


def test_a_row_whose_drafts_are_cut_whole_pauses_under_either_rule():
    """An n-gram drafter (no draft pass: c = 0) on a steep curve (llama.cpp on 2 cores): its
    one-token drafts, kept at 0.8 at best, are all cut, so nothing is tested and neither
    rule's keep counts move; EARLY_TESTS such steps in a row pause the row (before, it went
    on looking up drafts that were cut every step: 0.85x llama.cpp target-only on one
    cell)."""
    steep = curve({1: 1.0, 2: 1.9, 3: 2.6, 4: 3.2, 5: 3.9}, draft=0.0)
    for rule in ("theory", "costs"):
        policy = settled(AdaptiveDraftLength(max_k=8, lengths=rule), steep)
        policy.next_lengths([0])
        policy.update([0], lengths(4), lengths(0), steep)  # 1 of 3 tests kept: too few to
        policy.update([0], lengths(4), lengths(1), steep)  # pause on, a bound near 0.8
        steps = 0
        while not policy.rows[0].paused and steps < 3 * EARLY_TESTS:
            made = int(policy.next_lengths([0]))
            assert made, rule
            width = policy.trim([0], [min(made, 1)])
            assert width == 0, rule
            policy.update([0], lengths(0), lengths(0), steep)
            steps += 1
        assert policy.rows[0].paused and steps <= EARLY_TESTS, (rule, steps)


def test_a_paused_row_resumes_only_when_its_drafting_pays():
    """Under lengths="theory" a row paused (here: its drafts cut whole EARLY_TESTS steps in a
    row) probes now and then; a kept probe is evidence, not a verdict: the row drafts again
    only once its estimates say drafting pays. (Before, one kept probe among a few tests
    resumed it, as there was too little evidence to pause it: on llama.cpp an n-gram row went
    on resuming, verifying drafts kept at 0.4 where a 2-token pass needs 0.9 here, and pausing
    again.)"""
    steep = curve({1: 1.0, 2: 1.9, 3: 2.6, 4: 3.2, 5: 3.9}, draft=0.0)
    policy = settled(AdaptiveDraftLength(max_k=8, lengths="theory"), steep)
    policy.next_lengths([0])
    policy.update([0], lengths(4), lengths(0), steep)
    policy.update([0], lengths(4), lengths(1), steep)
    state = policy.rows[0]
    for _ in range(EARLY_TESTS):
        assert int(policy.next_lengths([0])) and policy.trim([0], [1]) == 0
        policy.update([0], lengths(0), lengths(0), steep)
    assert state.paused
    probes = 0
    for _ in range(64):
        k = int(policy.next_lengths([0]))
        if not k:
            policy.update([0], lengths(0), lengths(0), steep)
            continue
        assert policy.trim([0], [1]) == 1  # a probe is verified
        policy.update([0], lengths(1), lengths(1), steep)  # and kept
        probes += 1
        assert state.paused, probes
    assert probes >= 2


def test_a_ragged_pass_is_kept_as_the_full_pass_it_stands_for():
    """A model whose batch passes feed each row's own tokens (llama.cpp) costs by all rows'
    tokens. A pass over 5 tokens for 4 rows (one row drafted 1) stands for a full 2-token pass
    (8 tokens): its extra time over a 1-token pass, scaled to 4 extra tokens. Before, a pass
    where one row of 4 drafted 2 tokens (6 tokens) was kept as a 3-token pass over every row
    (12 tokens) and made every wider pass look cheap."""
    assert full_pass_equivalent(3, 0.15, 6, 4, 0.1) == (2, pytest.approx(0.2))
    assert full_pass_equivalent(2, 0.125, 5, 4, 0.1) == (2, pytest.approx(0.2))
    assert full_pass_equivalent(3, 0.15, 9, 4, 0.1) == (3, pytest.approx(0.1 + 0.05 * 8 / 5))
    assert full_pass_equivalent(2, 0.2, 8, 4, 0.1) == (2, 0.2)  # a full pass: as it is
    assert full_pass_equivalent(2, 0.09, 5, 4, 0.1) == (2, pytest.approx(0.1))  # never < 1 token
    # one row, no 1-token pass timed yet, or no row fed more than one token: as it is
    assert full_pass_equivalent(3, 0.3, 3, 1, 0.1) == (3, 0.3)
    assert full_pass_equivalent(3, 0.15, 6, 4, None) == (3, 0.15)
    assert full_pass_equivalent(1, 0.1, 3, 4, 0.1) == (1, 0.1)


def test_a_ragged_pass_is_priced_between_the_whole_widths_around_its_mean():
    measured = curve({1: 1.0, 2: 2.0, 3: 3.0})
    assert ragged_pass_cost(measured, 1.0) == 1.0
    assert ragged_pass_cost(measured, 1.25) == pytest.approx(1.25)
    assert ragged_pass_cost(measured, 2.5) == pytest.approx(2.5)
    assert ragged_pass_cost(measured, 2.5, longest=2) == pytest.approx(2.0)
    flat = curve({1: 1.0, 2: 1.02, 4: 1.05})
    assert ragged_pass_cost(flat, 1.5) == pytest.approx(1.01)


def test_trim_prices_one_rows_draft_among_four_by_its_tokens_on_a_ragged_model():
    """Four rows, one with a draft of 1 (kept at 0.92 at best: the prior's bound), on a curve
    where a full 2-token pass costs 1.5: padded (the widest row sets every row's width) the
    pass costs 1.5 for 4.92 expected tokens against 4 for 1, so it is cut; ragged it feeds 5
    tokens where 4 cost 1, priced 1.125, so it is verified."""
    rows = [0, 1, 2, 3]
    for ragged, width in ((False, 0), (True, 1)):
        policy = AdaptiveDraftLength(max_k=8)
        policy.ragged_passes = ragged
        settled(policy, curve({1: 1.0, 2: 1.5, 5: 3.0}), rows=rows)
        policy.next_lengths(rows)
        assert policy.trim(rows, [1, 0, 0, 0]) == width, ragged
        # every row drafting: the same full pass either way
        assert policy.trim(rows, [1, 1, 1, 1]) == 1, ragged


class RaggedToyLM(ToyLM):
    ragged_passes = True


def test_the_engine_keeps_a_ragged_models_batch_passes_as_full_ones(monkeypatch):
    """The engine tells the policy how its target's passes cost, and hands each pass of a
    ragged model to full_pass_equivalent with the tokens and rows it fed (a padded model's
    passes are kept by their widest row, as they cost)."""
    import specsample.engine.engine as engine_module

    seen = []

    def spy(width, seconds, tokens, rows, single):
        seen.append((width, tokens, rows))
        return full_pass_equivalent(width, seconds, tokens, rows, single)

    monkeypatch.setattr(engine_module, "full_pass_equivalent", spy)
    for model_class in (ToyLM, RaggedToyLM):
        seen.clear()
        target = model_class(8, seed=3)
        draft = ToyLM(8, seed=4, base=target, noise=0.5)
        policy = AdaptiveDraftLength(max_k=4)
        generate(
            target,
            [[1, 2, 3], [4, 5], [6]],
            generator=torch.Generator().manual_seed(0),
            drafter=ModelDrafter(draft),
            draft_length=policy,
            max_new_tokens=24,
            eos_token_ids=(),
        )
        assert policy.ragged_passes is (model_class is RaggedToyLM)
        if model_class is ToyLM:
            assert not seen
            continue
        assert seen and all(rows <= 3 and rows <= tokens for _, tokens, rows in seen)
        assert all(width <= tokens <= width * rows for width, tokens, rows in seen)
        assert any(tokens > rows for _, tokens, rows in seen)  # drafting steps among them


def test_the_batch_depth_prices_one_rows_deep_draft_by_its_tokens_on_a_ragged_model():
    """One row of four keeps its drafts whole and asks for 4, the others draft nothing, on a
    curve where each token per row adds 0.2 of a 1-token pass. Padded, every row is fed the
    deep row's width (4 drafts: 1.8 for 8 expected tokens against 1.2 for 5 with one), and the
    step drafts 1 deep; ragged, the pass feeds 8 tokens where 4 cost 1 (priced 1.2), and it
    drafts all 4."""
    rows = [0, 1, 2, 3]
    measured = curve({1: 1.0, 2: 1.2, 3: 1.4, 4: 1.6, 5: 1.8})
    for ragged, depth in ((False, 1), (True, 4)):
        policy = AdaptiveDraftLength(max_k=8)
        policy.ragged_passes = ragged
        settled(policy, measured, rows=rows)
        for _ in range(8):  # row 0 keeps its drafts whole
            policy.next_lengths(rows)
            policy.update(rows, lengths(4, 0, 0, 0), lengths(4, 0, 0, 0), measured)
        assert policy._batch_depth(rows, [4, 0, 0, 0], measured) == depth, ragged
