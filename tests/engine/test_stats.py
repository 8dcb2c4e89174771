"""DecodeStats: the summary's fields and rounding, the speedup prediction's three terms (tokens
per step, draft cost, the mean target pass over the 1-token one) and how runs are pooled, on
hand-built statistics whose values are worked out in each test."""

from __future__ import annotations

import pytest

from specsample.engine.stats import DecodeStats
from stats_identities import assert_stats_identities


def nine_row_steps() -> DecodeStats:
    """Three target passes of three rows: two target-only row steps, four drafting one token and
    three drafting three; 5 of 11 keep tests kept. Values chosen so that every rounded field has
    more digits than the summary keeps."""
    stats = DecodeStats(
        target_passes=3,
        draft_passes=7,
        trimmed=2,
        padded_passes=1,
        new_tokens=13,
        row_steps=9,
        drafted=13,
        accepted=5,
        keep_tests=11,
        empty_steps=4,
        drafted_row_steps=7,
        drafted_by_position=[7, 3, 1],
        accepted_by_position=[3, 1, 1],
        prefill_seconds=0.12345,
        draft_seconds=1.23456,
        target_seconds=2.34567,
        verify_seconds=0.34567,
        total_seconds=5.4321,
        target_single_pass_seconds=0.5,
        rules_used={"token": 2, "block": 1},
        draft_lengths={3: 3, 0: 2, 1: 4},
    )
    assert_stats_identities(stats)
    return stats


# alpha 5/11; k = 0, 1, 3 give 1, 1 + a, 1 + a + a^2 + a^3 tokens; mean over the 9 row steps.
ALPHA = 5 / 11
THEORY_TOKENS = (2 * 1 + 4 * (1 + ALPHA) + 3 * (1 + ALPHA + ALPHA**2 + ALPHA**3)) / 9
COST_RATIO = (1.23456 / 7) / 0.5  # one draft pass over the 1-token target pass
STEP_COST = 7 / 3 * COST_RATIO + (2.34567 / 3) / 0.5  # draft passes per step, mean target pass


def test_summary_reports_every_field_rounded():
    summary = nine_row_steps().summary()
    assert summary == {
        "rules_used": {"token": 2, "block": 1},
        "new_tokens": 13,
        "target_passes": 3,
        "draft_passes": 7,
        "trimmed_drafts": 2,
        "padded_passes": 1,
        "alpha": 0.4545,
        "acceptance_by_position": [0.429, 0.333, 1.0],  # 3/7, 1/3, 1/1
        "tokens_per_pass": 1.444,  # 13 / 9
        "empty_share": 0.571,  # 4 / 7
        "mean_draft_length": 1.44,  # 13 / 9
        "draft_lengths": {"0": 2, "1": 4, "3": 3},
        "cost_ratio_c": 0.353,
        "seconds": {
            "prefill": 0.123,
            "draft": 1.235,
            "target": 2.346,
            "verify": 0.346,
            "rest": 1.383,  # total minus the four above
            "total": 5.432,
        },
        "tokens_per_second": 2.39,  # 13 / 5.4321
        "predicted_speedup": 0.609,
    }
    assert list(summary["draft_lengths"]) == ["0", "1", "3"]  # sorted by length
    assert round(THEORY_TOKENS / STEP_COST, 3) == 0.609


def test_summary_of_nothing_has_zeros_and_no_prediction():
    assert DecodeStats().summary() == {
        "rules_used": {},
        "new_tokens": 0,
        "target_passes": 0,
        "draft_passes": 0,
        "trimmed_drafts": 0,
        "padded_passes": 0,
        "alpha": 0.0,
        "acceptance_by_position": [],
        "tokens_per_pass": 0.0,
        "empty_share": 0.0,
        "mean_draft_length": 0.0,
        "draft_lengths": {},
        "cost_ratio_c": None,
        "seconds": {
            "prefill": 0.0,
            "draft": 0.0,
            "target": 0.0,
            "verify": 0.0,
            "rest": 0.0,
            "total": 0.0,
        },
        "tokens_per_second": 0.0,
        "predicted_speedup": None,
    }


def test_chain_prediction_divides_the_theory_by_the_measured_step_cost():
    """The mean target pass (0.78 s) is not the 1-token pass (0.5 s): the step costs its ratio."""
    stats = nine_row_steps()
    assert stats.theory_tokens_per_pass() == pytest.approx(THEORY_TOKENS, rel=1e-12)
    assert stats.cost_ratio == pytest.approx(COST_RATIO, rel=1e-12)
    assert stats.predicted_speedup() == pytest.approx(THEORY_TOKENS / STEP_COST, rel=1e-12)


def test_tree_prediction_uses_the_measured_tokens_per_pass():
    stats = nine_row_steps()
    stats.tree_steps = 3
    assert stats.predicted_speedup() == pytest.approx((13 / 9) / STEP_COST, rel=1e-12)
    assert stats.theory_tokens_per_pass() != pytest.approx(13 / 9)  # the two really differ


def test_theory_reads_an_alpha_above_one_as_one():
    """Hand-made counts with more kept drafts than keep tests: every draft counts as kept."""
    stats = DecodeStats(row_steps=2, accepted=3, keep_tests=2, draft_lengths={2: 1, 0: 1})
    assert stats.alpha == 1.5
    assert stats.theory_tokens_per_pass() == (3.0 + 1.0) / 2


def test_pooled_one_token_pass_is_the_mean_of_the_runs_that_timed_one():
    runs = [DecodeStats(target_single_pass_seconds=s) for s in (0.2, None, 0.4, 0.0)]
    assert DecodeStats.pooled(runs).target_single_pass_seconds == pytest.approx(0.3, rel=1e-15)
    untimed = [DecodeStats(), DecodeStats(target_single_pass_seconds=None)]
    assert DecodeStats.pooled(untimed).target_single_pass_seconds is None


def test_pooled_sums_counters_and_seconds_and_merges_histograms_of_any_length():
    a, b = (
        nine_row_steps(),
        DecodeStats(
            target_passes=1,
            row_steps=1,
            drafted=1,
            accepted=1,
            keep_tests=1,
            drafted_row_steps=1,
            new_tokens=2,
            drafted_by_position=[1],
            accepted_by_position=[1],
            draft_seconds=0.5,
            rules_used={"token": 1},
            draft_lengths={1: 1},
        ),
    )
    pooled = DecodeStats.pooled([a, b])
    assert_stats_identities(pooled)
    assert (pooled.target_passes, pooled.row_steps, pooled.new_tokens) == (4, 10, 15)
    assert (pooled.accepted, pooled.keep_tests, pooled.drafted) == (6, 12, 14)
    assert pooled.drafted_by_position == [8, 3, 1]
    assert pooled.accepted_by_position == [4, 1, 1]
    assert pooled.rules_used == {"token": 3, "block": 1}
    assert pooled.draft_lengths == {0: 2, 1: 5, 3: 3}
    assert pooled.draft_seconds == pytest.approx(1.73456, rel=1e-15)
    assert pooled.target_single_pass_seconds == 0.5
    assert DecodeStats.pooled([]) == DecodeStats()
