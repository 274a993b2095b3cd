"""Paired comparison of two arms (single-task vs multi-task): the tests the study's table needs.

Given one number per split for each arm (test Dice, balanced accuracy ...), or one per test case,
:func:`paired_comparison` returns the per-pair differences (multi-task minus single-task), their
mean with a 95 % bootstrap confidence interval and the t-interval (the one to read with few pairs:
the percentile bootstrap of 5 seeds is too narrow), the Wilcoxon signed-rank test (exact null
distribution without ties or zeros, an exact permutation test with them for up to 13 pairs, the
normal approximation beyond; ``wilcoxon_method`` says which) and the paired t-test. All tests are two-sided and come from SciPy.

With ``n`` pairs the smallest two-sided p-value the exact Wilcoxon test can give is
``2 / 2**n`` (all differences of one sign): 0.031 for the study's 6 splits, 0.0625 for 5 folds,
0.25 for 3 repeats, so only a large, consistent effect can reach p < 0.05 over splits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["paired_comparison", "smallest_exact_wilcoxon_p", "mean_sd"]


def smallest_exact_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test on ``n`` pairs can reach."""
    return min(1.0, 2.0 / 2 ** n) if n > 0 else math.nan


def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample sd (``ddof=1``; NaN for fewer than 2) and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def _bootstrap_ci(d: np.ndarray, seed: int, level: float = 0.95) -> tuple[float, float]:
    if d.size < 2 or np.all(d == d[0]):
        return (float(d[0]), float(d[0])) if d.size else (math.nan, math.nan)
    res = stats.bootstrap((d,), np.mean, confidence_level=level, n_resamples=9999, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _t_interval(d: np.ndarray, level: float = 0.95) -> list[float]:
    if d.size < 2:
        return [math.nan, math.nan]
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return [float(d.mean()) - half, float(d.mean()) + half]


def paired_comparison(single: Sequence[float | None], multi: Sequence[float | None], seed: int = 0
                      ) -> dict[str, Any]:
    """Compare paired measurements: ``multi[i] - single[i]`` for every pair where both are finite.

    Args:
        single: the single-task arm's value per pair (split or case); ``None``/NaN = missing.
        multi: the multi-task arm's value for the same pairs, same order.
        seed: seed of the bootstrap resampling.

    Returns:
        ``n``, ``differences``, ``mean_difference``, ``sd_difference``, ``ci95`` ([low, high],
        percentile bootstrap of the mean difference), ``ci95_t`` (``mean -/+ t(0.975, n-1) sd / sqrt(n)``),
        ``n_positive`` / ``n_negative`` / ``n_zero``,
        ``wilcoxon_stat``, ``wilcoxon_p``, ``wilcoxon_method`` (``exact`` / ``approx``; zero
        differences are dropped, the Wilcoxon convention), ``ttest_t``, ``ttest_p``, and
        ``smallest_possible_p`` (of the exact Wilcoxon test at this ``n``). Tests need at least 2
        pairs (NaN otherwise).
    """
    if len(single) != len(multi):
        raise ValueError(f"paired samples differ in length: {len(single)} vs {len(multi)}")
    pairs = [(float(a), float(b)) for a, b in zip(single, multi, strict=True)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    d = np.asarray([b - a for a, b in pairs], dtype=float)
    out: dict[str, Any] = {
        "n": int(d.size),
        "differences": [float(x) for x in d],
        "mean_difference": float(d.mean()) if d.size else math.nan,
        "sd_difference": float(d.std(ddof=1)) if d.size > 1 else math.nan,
        "ci95": list(_bootstrap_ci(d, seed)) if d.size else [math.nan, math.nan],
        "ci95_t": _t_interval(d),
        "n_positive": int((d > 0).sum()),
        "n_negative": int((d < 0).sum()),
        "n_zero": int((d == 0).sum()),
        "wilcoxon_stat": math.nan,
        "wilcoxon_p": math.nan,
        "wilcoxon_method": None,
        "ttest_t": math.nan,
        "ttest_p": math.nan,
        "smallest_possible_p": smallest_exact_wilcoxon_p(int((d != 0).sum())),
    }
    # rounded so that differences equal in exact arithmetic are ties here too (0.1 + 0.2 vs 0.3)
    d_test = np.round(d, 10)
    nonzero = d_test[d_test != 0]
    if nonzero.size >= 1 and d.size >= 2:
        # SciPy's "auto": the exact null distribution without ties or zeros (n <= 50), an exact
        # permutation test with them for small n (<= 13), the normal approximation otherwise
        res = stats.wilcoxon(d_test, zero_method="wilcox", alternative="two-sided", method="auto")
        _, counts = np.unique(np.abs(nonzero), return_counts=True)
        clean = (counts == 1).all() and nonzero.size == d.size
        method = ("exact" if clean and d.size <= 50 else
                  "exact permutation (ties or zeros)" if d.size <= 13 else "normal approximation")
        out.update(wilcoxon_stat=float(res.statistic), wilcoxon_p=float(res.pvalue), wilcoxon_method=method)
    elif d.size >= 2:  # every difference is zero: no evidence either way
        out.update(wilcoxon_p=1.0, wilcoxon_method="all differences zero")
    if d.size >= 2 and np.std(d) > 0:
        t = stats.ttest_rel(np.asarray([b for _, b in pairs]), np.asarray([a for a, _ in pairs]))
        out.update(ttest_t=float(t.statistic), ttest_p=float(t.pvalue))
    return out
