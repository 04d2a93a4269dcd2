"""Confidence intervals (scratchnet/stats.py) against published values, against
their definitions solved independently, and by their coverage in simulation."""
import math

import numpy as np
import pytest
from scipy import optimize

from scratchnet.stats import ratio_interval, t_interval, wilson


# ===== Wilson's score interval =====

@pytest.mark.parametrize("k,n,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17: 857-872, Table II, method 3 (score, no correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombes_published_examples(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


@pytest.mark.parametrize("k,n", [(1, 10), (4, 270), (133, 270), (269, 270), (7, 7 * 3)])
def test_wilson_bounds_are_where_the_score_test_is_just_rejected(k, n):
    """The definition, solved numerically: the bounds are the p in (0, 1) where
    |k / n - p| = 1.96 sqrt(p (1 - p) / n), one below k / n and one above."""
    phat = k / n

    def score(p):
        return abs(phat - p) - 1.96 * math.sqrt(p * (1 - p) / n)

    lo = optimize.brentq(score, 1e-15, phat) if k > 0 else 0.0
    hi = optimize.brentq(score, phat, 1 - 1e-15) if k < n else 1.0
    assert wilson(k, n) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 20, 270, 10_000])
def test_wilson_is_exactly_0_and_1_at_the_edges(n):
    lo, hi = wilson(0, n)
    assert lo == 0.0 and 0 < hi < 1
    assert hi == pytest.approx(1.96 ** 2 / (n + 1.96 ** 2), rel=1e-12)   # the closed form at k = 0
    lo, hi = wilson(n, n)
    assert hi == 1.0 and 0 < lo < 1
    assert lo == pytest.approx(n / (n + 1.96 ** 2), rel=1e-12)


def test_wilson_z_changes_the_width():
    lo99, hi99 = wilson(30, 100, z=2.576)
    lo95, hi95 = wilson(30, 100)
    assert lo99 < lo95 < 0.3 < hi95 < hi99


@pytest.mark.parametrize("args,match", [
    ((0, 0), "n must be >= 1"),
    ((3, 2), r"k must lie in \[0, n\]"),
    ((-1, 5), r"k must lie in \[0, n\]"),
    ((0.5, 5), "whole number"),
    ((1, 5.0), "whole number"),
])
def test_wilson_rejects_bad_counts(args, match):
    with pytest.raises(ValueError, match=match):
        wilson(*args)
    with pytest.raises(ValueError, match="z must be a positive number"):
        wilson(1, 5, z=0)


# ===== the ratio of two rates (Katz's log method) =====

def test_ratio_interval_with_a_zero_count_matches_the_published_worked_example():
    """8 of 508 against 0 of 500, 0.5 added to every cell: log RR = log((8.5 / 509) / (0.5 / 501))
    = 2.817, variance 1/8.5 - 1/509 + 1/0.5 - 1/501 = 2.1137, interval 0.97 to 289.0
    (R-help, "Confidence interval for relative risk", Viechtbauer, 10 Nov 2006;
    the bounds there were computed from the log RR rounded to 2.817)."""
    ratio, lo, hi = ratio_interval(8, 508, 0, 500)
    assert math.log(ratio) == pytest.approx(2.817, abs=5e-4)
    se = (math.log(hi) - math.log(lo)) / (2 * 1.96)
    assert se ** 2 == pytest.approx(2.1137, abs=5e-5)
    assert lo == pytest.approx(0.97, abs=5e-3)
    assert hi == pytest.approx(289.0, rel=1e-3)


def test_ratio_interval_without_zeros_is_the_delta_method_on_the_log_scale():
    """Gardner and Altman's form of the same variance, from the 2 x 2 table
    (a events and b non-events, c and d): b / (a (a + b)) + d / (c (c + d))."""
    a, b, c, d = 182, 88, 23, 247
    ratio, lo, hi = ratio_interval(a, a + b, c, c + d)
    assert ratio == pytest.approx((a / (a + b)) / (c / (c + d)), rel=1e-12)
    se = math.sqrt(b / (a * (a + b)) + d / (c * (c + d)))
    assert lo == pytest.approx(ratio * math.exp(-1.96 * se), rel=1e-12)
    assert hi == pytest.approx(ratio * math.exp(1.96 * se), rel=1e-12)
    assert math.log(ratio) - math.log(lo) == pytest.approx(math.log(hi) - math.log(ratio))  # symmetric in log


def test_ratio_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    """Simulated pairs of binomial counts: the interval must hold the true ratio in
    about 95 % of draws (not 80 %, not 100 %), and so must Wilson's for each rate."""
    rng = np.random.default_rng(0)
    n1, p1, n2, p2 = 270, 0.6, 270, 0.08
    draws = 4000
    k1 = rng.binomial(n1, p1, draws)
    k2 = rng.binomial(n2, p2, draws)
    covered = [lo <= p1 / p2 <= hi for _, lo, hi in (ratio_interval(int(a), n1, int(b), n2)
                                                     for a, b in zip(k1, k2))]
    assert 0.93 < np.mean(covered) < 0.97, np.mean(covered)
    wilson_covered = [lo <= p2 <= hi for lo, hi in (wilson(int(b), n2) for b in k2)]
    assert 0.93 < np.mean(wilson_covered) < 0.97, np.mean(wilson_covered)


def test_ratio_interval_handles_every_edge_count():
    for k1, n1, k2, n2 in ((0, 50, 10, 50), (10, 50, 0, 50), (0, 50, 0, 50), (50, 50, 1, 50), (50, 50, 50, 50)):
        ratio, lo, hi = ratio_interval(k1, n1, k2, n2)
        assert 0 < lo <= ratio <= hi < math.inf, (k1, n1, k2, n2)
    for k in (0, 50):                          # 0 of 50 twice, 50 of 50 twice: ratio 1, a real interval
        ratio, lo, hi = ratio_interval(k, 50, k, 50)
        assert ratio == 1.0 and lo < 1 < hi
    # 50 of 50 against 25 of 50: the 0.5 correction, (50.5 / 51) / (25.5 / 51)
    ratio, lo, hi = ratio_interval(50, 50, 25, 50)
    assert ratio == pytest.approx(50.5 / 25.5)
    se = math.sqrt(1 / 50.5 - 1 / 51 + 1 / 25.5 - 1 / 51)
    assert (lo, hi) == pytest.approx((ratio * math.exp(-1.96 * se), ratio * math.exp(1.96 * se)))
    with pytest.raises(ValueError, match="n must be >= 1"):
        ratio_interval(1, 5, 0, 0)
    with pytest.raises(ValueError, match="k2 must lie"):
        ratio_interval(1, 5, 6, 5)


# ===== the t-interval of a mean over seeds =====

@pytest.mark.parametrize("values,t_table", [
    ([0.61, 0.67], 12.706),                  # Student's t, 1 degree of freedom, 97.5 % point
    ([1.0, 2.0, 3.0, 4.0, 5.0], 2.776),      # 4 degrees of freedom
    ([0.2, 0.25, 0.22, 0.3, 0.18, 0.27, 0.24, 0.21, 0.26, 0.23], 2.262),   # 9
])
def test_t_interval_matches_the_printed_t_table(values, t_table):
    mean, lo, hi = t_interval(values)
    v = np.asarray(values)
    s = math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1))
    assert mean == pytest.approx(v.mean())
    assert (hi - lo) / 2 == pytest.approx(t_table * s / math.sqrt(len(v)), rel=2e-4)
    assert mean - lo == pytest.approx(hi - mean)


def test_t_interval_of_one_seed_is_no_interval():
    mean, lo, hi = t_interval([0.42])
    assert mean == 0.42 and math.isnan(lo) and math.isnan(hi)
    mean, lo, hi = t_interval([0.5, 0.5, 0.5])       # several equal seeds: a real zero-width interval
    assert lo == hi == mean == 0.5


def test_t_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        t_interval([])
    with pytest.raises(ValueError, match="finite"):
        t_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([0.1, 0.2], confidence=95)
