"""The audit's statistics, with negative controls: the G-test holds its level on samples from the
law and rejects a shifted one, the power formula agrees with simulation, and the TV bound covers
the truth."""

from __future__ import annotations

import numpy as np
import pytest

from specsample.audit import stats

LAW = np.array([0.4, 0.3, 0.2, 0.06, 0.03, 0.01, 0.0])


def test_pooling_keeps_expectations_at_least_five_and_isolates_impossible_cells():
    expected = np.array([0.0, 1.0, 2.0, 3.0, 50.0, 0.5, 7.0])
    groups = stats.pool_cells(expected)
    assert groups[0] == -1
    totals = np.bincount(groups[groups >= 0], expected[groups >= 0])
    assert (totals >= 5).all()


def test_observation_in_an_impossible_cell_rejects_outright():
    counts = np.array([400, 300, 200, 60, 30, 9, 1])
    result = stats.goodness_of_fit(counts, LAW)
    assert result.p_value == 0.0 and result.impossible_observed == 1


def test_g_test_false_rejection_rate_is_near_its_level():
    rng = np.random.default_rng(0)
    p_values = [stats.goodness_of_fit(rng.multinomial(2_000, LAW), LAW).p_value for _ in range(400)]
    rate = np.mean(np.array(p_values) < 0.05)
    assert 0.02 <= rate <= 0.09  # 400 tests at level 0.05: binomial sd 0.011


def test_g_test_rejects_a_shifted_law():
    rng = np.random.default_rng(1)
    shifted = stats.worst_direction(LAW, 0.05)
    assert abs(0.5 * np.abs(shifted - LAW).sum() - 0.05) < 1e-12
    counts = rng.multinomial(20_000, shifted)
    assert stats.goodness_of_fit(counts, LAW).p_value < 1e-6


def test_detectable_tv_matches_simulated_power_and_smaller_errors_are_missed():
    n, alpha = 5_000, 1e-3
    df = stats.goodness_of_fit(np.round(n * LAW), LAW).df
    delta = stats.detectable_tv(n, df, alpha, power=0.99)
    assert stats.simulated_power(LAW, n, delta, alpha, repeats=300) >= 0.95
    assert stats.simulated_power(LAW, n, delta / 3, alpha, repeats=300) <= 0.5


def test_detectable_tv_shrinks_as_one_over_root_n():
    small = stats.detectable_tv(10_000, 5, 1e-5)
    large = stats.detectable_tv(40_000, 5, 1e-5)
    assert large == pytest.approx(small / 2)


def test_tv_upper_bound_covers_the_true_distance():
    rng = np.random.default_rng(2)
    truth = stats.worst_direction(LAW, 0.02)
    covered = 0
    for _ in range(200):
        counts = rng.multinomial(5_000, truth)
        bound = stats.total_variation(counts, LAW) + stats.tv_margin(5_000, len(LAW))
        covered += bound >= 0.02
    assert covered >= 190  # a 95% bound (conservative)


def test_two_sample_test_holds_level_and_detects_a_difference():
    rng = np.random.default_rng(3)
    same = [
        stats.two_sample(rng.multinomial(3_000, LAW), rng.multinomial(2_000, LAW)).p_value
        for _ in range(300)
    ]
    assert np.mean(np.array(same) < 0.05) <= 0.09
    delta = stats.detectable_tv_two_sample(3_000, 3_000, 5, 1e-6)  # detected with prob. 0.99
    other = stats.worst_direction(LAW, delta)
    result = stats.two_sample(rng.multinomial(3_000, LAW), rng.multinomial(3_000, other))
    assert result.df == 5 and result.p_value < 1e-6
