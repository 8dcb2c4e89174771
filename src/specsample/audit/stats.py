"""The statistics of an audit: goodness of fit and two-sample G-tests on pooled cells, the
total-variation distance with a confidence bound, and the power of a test at its sample size.

Pooling: cells are sorted by expected count and merged, smallest first, until every pooled cell
expects at least MIN_EXPECTED observations. Cells of probability exactly 0 form their own group:
one observation there is impossible under the law, and the test rejects outright (p-value 0).

Power: a G-test with `df` degrees of freedom at level alpha is approximately a chi-square test
whose statistic, under an alternative r, follows a noncentral chi-square with noncentrality
lambda = n * sum_c (r_c - l_c)^2 / l_c (n samples, l the law). For a total-variation error
delta = 1/2 sum_c |r_c - l_c|, Cauchy-Schwarz gives sum_c (r_c - l_c)^2 / l_c >= 4 delta^2 whatever
the law, with equality for the worst direction (mass delta moved between two halves of the law).
So `detectable_tv` solves P(noncentral chi-square(df, 4 n delta^2) > critical value) = power for
delta: every error of at least that size is detected with at least that probability (to the
accuracy of the chi-square approximation, which `simulated_power` checks by simulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2, ncx2

MIN_EXPECTED = 5.0  # every pooled cell expects at least this many observations
TV_CONFIDENCE = 0.95  # the confidence of the total-variation upper bound


@dataclass(frozen=True)
class GTest:
    """One G-test on pooled cells.

    statistic: G = 2 sum O ln(O / E) over the pooled cells.
    df:        degrees of freedom (pooled cells - 1, or (cells - 1) for two samples).
    p_value:   chi2.sf(statistic, df); 0 when an impossible cell was observed.
    cells:     pooled cells used.
    impossible_observed: observations in cells of probability exactly 0.
    pooled_mass: the law's mass in pooled cells made of more than one cell (errors that only move
               mass inside such a cell are invisible to the test).
    """

    statistic: float
    df: int
    p_value: float
    cells: int
    impossible_observed: int
    pooled_mass: float


def pool_cells(expected: np.ndarray, min_expected: float = MIN_EXPECTED) -> np.ndarray:
    """int [cells]: a group id per cell. Cells of expectation 0 get group -1; the others are
    merged in ascending order of expectation until each group expects >= min_expected (a small
    remainder joins the previous group)."""
    expected = np.asarray(expected, dtype=np.float64)
    groups = np.full(expected.shape, -1, dtype=np.int64)
    order = [int(i) for i in np.argsort(expected, kind="stable") if expected[i] > 0]
    group, running = 0, 0.0
    members: list[int] = []
    for cell in order:
        groups[cell] = group
        members.append(cell)
        running += expected[cell]
        if running >= min_expected:
            group, running, members = group + 1, 0.0, []
    if members and group > 0:  # the remainder expects < min_expected: join the previous group
        groups[members] = group - 1
    return groups


def goodness_of_fit(observed: np.ndarray, law: np.ndarray) -> GTest:
    """G-test of counts observed [cells] against probabilities law [cells] (sums to 1)."""
    observed = np.asarray(observed, dtype=np.float64)
    law = np.asarray(law, dtype=np.float64)
    assert observed.shape == law.shape
    n = observed.sum()
    groups = pool_cells(n * law)
    impossible = int(observed[groups < 0].sum())
    count = int(groups.max()) + 1 if (groups >= 0).any() else 0
    pooled_observed = np.bincount(groups[groups >= 0], observed[groups >= 0], minlength=count)
    pooled_law = np.bincount(groups[groups >= 0], law[groups >= 0], minlength=count)
    statistic = _g_statistic(pooled_observed, n * pooled_law)
    df = max(count - 1, 1)
    p_value = 0.0 if impossible else float(chi2.sf(statistic, df))
    return GTest(statistic, df, p_value, count, impossible, _pooled_mass(groups, law))


def two_sample(counts_a: np.ndarray, counts_b: np.ndarray) -> GTest:
    """G-test of homogeneity: do counts_a and counts_b [cells] come from one distribution? Cells
    are pooled on the pooled sample's expected counts in the smaller sample."""
    counts_a = np.asarray(counts_a, dtype=np.float64)
    counts_b = np.asarray(counts_b, dtype=np.float64)
    total_a, total_b = counts_a.sum(), counts_b.sum()
    both = counts_a + counts_b
    share = both / max(both.sum(), 1.0)
    groups = pool_cells(min(total_a, total_b) * share)
    count = int(groups.max()) + 1 if (groups >= 0).any() else 0
    a = np.bincount(groups[groups >= 0], counts_a[groups >= 0], minlength=count)
    b = np.bincount(groups[groups >= 0], counts_b[groups >= 0], minlength=count)
    pooled_share = np.bincount(groups[groups >= 0], share[groups >= 0], minlength=count)
    statistic = _g_statistic(a, total_a * pooled_share) + _g_statistic(b, total_b * pooled_share)
    df = max(count - 1, 1)
    return GTest(
        statistic, df, float(chi2.sf(statistic, df)), count, 0, _pooled_mass(groups, share)
    )


def _g_statistic(observed: np.ndarray, expected: np.ndarray) -> float:
    positive = observed > 0
    return float(2.0 * np.sum(observed[positive] * np.log(observed[positive] / expected[positive])))


def _pooled_mass(groups: np.ndarray, law: np.ndarray) -> float:
    valid = groups >= 0
    sizes = np.bincount(groups[valid]) if valid.any() else np.zeros(0, dtype=np.int64)
    merged = valid & (sizes[np.clip(groups, 0, None)] > 1) if sizes.size else valid & False
    return float(law[merged].sum())


def total_variation(observed: np.ndarray, law: np.ndarray) -> float:
    """1/2 sum |O/n - law|: the observed total-variation distance."""
    observed = np.asarray(observed, dtype=np.float64)
    return 0.5 * float(np.abs(observed / observed.sum() - np.asarray(law)).sum())


def tv_margin(n: int, cells: int, confidence: float = TV_CONFIDENCE) -> float:
    """With probability >= confidence, TV(empirical, true) <= this (Bretagnolle-Huber-Carol:
    P(sum |p_hat - p| >= eps) <= 2^cells exp(-n eps^2 / 2)), so the true distance to the law is
    at most the observed one plus this margin."""
    return 0.5 * math.sqrt(2.0 * (cells * math.log(2.0) + math.log(1.0 / (1.0 - confidence))) / n)


def detectable_tv(n: int, df: int, alpha: float, power: float = 0.99) -> float:
    """The smallest total-variation error detected with probability >= power by a G-test with
    df degrees of freedom at level alpha on n samples (worst direction; module docstring)."""
    critical = chi2.isf(alpha, df)
    noncentrality = brentq(lambda lam: ncx2.sf(critical, df, lam) - power, 1e-9, 1e7)
    return math.sqrt(noncentrality / (4.0 * n))


def detectable_tv_two_sample(n_a: int, n_b: int, df: int, alpha: float, power: float = 0.99):
    """detectable_tv for a two-sample test: the noncentrality is n_a n_b / (n_a + n_b) times the
    chi-square divergence, so the effective sample size is the harmonic-mean-like n_a n_b / (n_a
    + n_b)."""
    effective = n_a * n_b / (n_a + n_b)
    return detectable_tv(max(int(effective), 1), df, alpha, power)


def worst_direction(law: np.ndarray, delta: float) -> np.ndarray:
    """A distribution at total-variation distance about delta from law, moving mass between two
    halves of the law in proportion to the law (the direction of least chi-square divergence)."""
    law = np.asarray(law, dtype=np.float64)
    order = np.argsort(-law)
    half = np.zeros(law.shape, dtype=bool)
    running = 0.0
    for cell in order:  # greedily fill one half with about half the mass
        if running + law[cell] <= 0.5 or running == 0.0:
            half[cell] = True
            running += law[cell]
    mass_in, mass_out = law[half].sum(), law[~half].sum()
    if mass_out <= 0:
        raise ValueError("law: expected at least two cells of positive probability")
    delta = min(delta, mass_out)
    shifted = law.copy()
    shifted[half] += delta * law[half] / mass_in
    shifted[~half] -= delta * law[~half] / mass_out
    return shifted


def simulated_power(
    law: np.ndarray, n: int, delta: float, alpha: float, *, repeats: int = 400, seed: int = 0
) -> float:
    """The fraction of `repeats` multinomial samples of size n, drawn at total-variation distance
    delta from law in the worst direction, that `goodness_of_fit` rejects at level alpha."""
    rng = np.random.default_rng(seed)
    alternative = worst_direction(law, delta)
    rejected = 0
    for _ in range(repeats):
        counts = rng.multinomial(n, alternative / alternative.sum())
        rejected += goodness_of_fit(counts, law).p_value < alpha
    return rejected / repeats
