"""Confidence intervals for the numbers scratchnet reports.

An attack's success rate is a proportion k / n over a few hundred attempts, and
"distillation leaves 82x fewer successes" is a ratio of two such proportions:
both are uncertain, and a figure without its interval overstates what was
measured. Three intervals cover what the project reports:

* ``wilson(k, n)``: a rate k / n (Wilson's score interval).
* ``ratio_interval(k1, n1, k2, n2)``: a ratio of two rates (Katz's log method).
* ``t_interval(values)``: the mean of a few per-seed values (Student's t).

All three are 95 % intervals by default and return plain Python floats.
"""
import math

import numpy as np

Z95 = 1.96          # the standard normal's 97.5 % point, as the published tables round it


def _check_count(k, n, what="k"):
    """k and n must be whole numbers with 0 <= k <= n and n >= 1."""
    for name, v in ((what, k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number of attempts, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1: a rate of {k} / {n} has no interval (nothing was attempted)")
    if not 0 <= k <= n:
        raise ValueError(f"{what} must lie in [0, n] = [0, {n}], got {k}")
    return int(k), int(n)


def _check_z(z):
    if not (isinstance(z, (int, float, np.floating)) and math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive number (1.96 for 95 %), got {z!r}")
    return float(z)


def wilson(k, n, z=Z95):
    """Wilson's score interval for a proportion k / n.

    Parameters
    ----------
    k : int, successes, 0 <= k <= n
    n : int >= 1, attempts
    z : float > 0, the normal quantile (1.96: 95 %)

    Returns
    -------
    lo, hi : floats in [0, 1], lo <= k / n <= hi

    The interval holds every p that a score test at level z would not reject:
    |k / n - p| <= z sqrt(p (1 - p) / n), a quadratic in p whose roots are

        (k / n + z^2 / 2n  -/+  z sqrt(k / n (1 - k / n) / n + z^2 / 4n^2)) / (1 + z^2 / n).

    Unlike k / n -/+ z sqrt(k / n (1 - k / n) / n) it never leaves [0, 1] and
    does not shrink to a point at k = 0 or k = n. There the lower (upper) root
    is exactly 0 (1) in exact arithmetic; it is returned as exactly 0.0 (1.0),
    not as whatever rounding leaves, so an error bar never dips below 0 %.

    n = 0 (no attempt) raises a ValueError: 0 / 0 is no rate.
    """
    k, n = _check_count(k, n)
    z = _check_z(z)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def ratio_interval(k1, n1, k2, n2, z=Z95):
    """The ratio of two proportions (k1 / n1) / (k2 / n2), with Katz's log interval.

    Parameters
    ----------
    k1, n1 : int, successes and attempts of the numerator's rate (n1 >= 1)
    k2, n2 : int, the same for the denominator's rate (n2 >= 1)
    z : float > 0, the normal quantile (1.96: 95 %)

    Returns
    -------
    ratio, lo, hi : floats, the estimate and its interval (lo <= ratio <= hi)

    Katz et al. (1978): log(ratio) is close to normal with variance

        1/k1 - 1/n1 + 1/k2 - 1/n2

    (the delta method on log(k / n)), so the interval is
    exp(log(ratio) -/+ z sqrt(variance)). It is not symmetric around the
    ratio, and a small count makes it wide: 182 of 270 against 2 of 270 is a
    ratio of 91, with a 95 % interval from 23 to 363.

    Zero cells: a count k = 0 makes log(ratio) or the variance infinite, and
    k = n in both rates makes the variance 0 (a point, as if 100 % of 50 were
    certain). So when any cell of the 2 x 2 table (k1, n1 - k1, k2, n2 - k2)
    is 0, 0.5 is added to every cell, as is customary (Pagano and Gauvreau
    2000; Deeks and Higgins 2010, Review Manager's algorithms): k becomes
    k + 0.5 and n becomes n + 1 in *both* rates, and the returned ratio is the
    corrected one, finite and positive.
    """
    k1, n1 = _check_count(k1, n1, "k1")
    k2, n2 = _check_count(k2, n2, "k2")
    z = _check_z(z)
    if 0 in (k1, n1 - k1, k2, n2 - k2):
        k1, n1, k2, n2 = k1 + 0.5, n1 + 1, k2 + 0.5, n2 + 1   # 0.5 in every cell
    log_ratio = math.log((k1 / n1) / (k2 / n2))
    se = math.sqrt(1 / k1 - 1 / n1 + 1 / k2 - 1 / n2)
    return math.exp(log_ratio), math.exp(log_ratio - z * se), math.exp(log_ratio + z * se)


def t_interval(values, confidence=0.95):
    """The mean of a few per-seed values, with Student's t interval.

    Parameters
    ----------
    values : sequence of n >= 1 finite numbers (one per training seed, say)
    confidence : float in (0, 1)

    Returns
    -------
    mean, lo, hi : floats. mean -/+ t_{n-1} s / sqrt(n), with s the sample
        standard deviation (ddof = 1) and t_{n-1} the (1 + confidence) / 2
        quantile of Student's t with n - 1 degrees of freedom (12.71 for two
        seeds, 2.78 for five, at 95 %). With n = 1 the spread between seeds is
        unknown: lo and hi are NaN (no interval, not a zero-width one), as a
        plot's error bar and ``math.isnan`` both understand.
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite numbers, got {v.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half
