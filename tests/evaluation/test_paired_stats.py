"""Paired statistics of the experiment summary against SciPy and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluation.paired_stats import mean_sd, paired_comparison, smallest_exact_wilcoxon_p
from pipeline.experiment.report import summarise

SINGLE = [0.70, 0.72, 0.75, 0.71, 0.69, 0.74]


def test_all_positive_differences_give_the_smallest_exact_p():
    # six differences of one sign and distinct sizes: the exact two-sided p is 2 / 2**6 by hand
    d = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    out = paired_comparison(SINGLE, [s + x for s, x in zip(SINGLE, d, strict=True)])
    assert out["wilcoxon_method"] == "exact"
    assert out["wilcoxon_p"] == pytest.approx(2 / 64)
    assert out["smallest_possible_p"] == pytest.approx(2 / 64)
    assert out["n_positive"] == 6 and out["n_negative"] == 0
    assert out["mean_difference"] == pytest.approx(0.035)


def test_mixed_signs_equal_scipy():
    d = np.array([0.03, 0.011, -0.02, 0.045, 0.052, -0.007])
    multi = [s + x for s, x in zip(SINGLE, d, strict=True)]
    out = paired_comparison(SINGLE, multi, seed=1)
    ref_w = stats.wilcoxon(np.array(multi) - np.array(SINGLE), method="exact")
    ref_t = stats.ttest_rel(multi, SINGLE)
    assert out["wilcoxon_p"] == pytest.approx(ref_w.pvalue)
    assert out["wilcoxon_stat"] == pytest.approx(ref_w.statistic)
    assert out["ttest_t"] == pytest.approx(ref_t.statistic)
    assert out["ttest_p"] == pytest.approx(ref_t.pvalue)
    # W+ by hand: ranks of |d| = 0.007(1) 0.011(2) 0.02(3) 0.03(4) 0.045(5) 0.052(6); negatives 1 + 3 = 4
    assert min(ref_w.statistic, 21 - ref_w.statistic) == 4
    low, high = out["ci95"]
    assert low <= out["mean_difference"] <= high
    assert d.min() <= low and high <= d.max()


def test_ties_and_zeros_stay_exact_for_few_pairs_and_missing_pairs_are_dropped():
    single = [0.5, 0.5, 0.5, 0.5, None, 0.5]
    multi = [0.75, 0.75, 0.5, 0.4, 0.9, float("nan")]
    out = paired_comparison(single, multi)
    assert out["n"] == 4 and out["n_zero"] == 1
    assert out["wilcoxon_method"].startswith("exact permutation")
    # by hand: zeros dropped, |d| = 0.25, 0.25, 0.1 -> ranks 2.5, 2.5, 1; the 2**3 sign patterns give
    # W- in {0, 1, 2.5, 2.5, 3.5, 3.5, 5, 6}; observed W- = 1: two-sided p = P(W <= 1 or W >= 5) = 4/8
    assert out["wilcoxon_p"] == pytest.approx(0.5)
    # the normal approximation would claim much more (no continuity correction): 0.2 here
    assert stats.wilcoxon([0.25, 0.25, 0.0, -0.1], method="approx").pvalue < 0.3


def test_too_few_pairs_give_nan_not_an_error():
    out = paired_comparison([0.5], [0.6])
    assert out["n"] == 1 and math.isnan(out["wilcoxon_p"]) and math.isnan(out["ttest_p"])
    assert smallest_exact_wilcoxon_p(3) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paired_comparison([0.1, 0.2], [0.1])


def test_mean_sd_ignores_missing():
    mean, sd, n = mean_sd([1.0, None, 3.0, float("nan")])
    assert (mean, n) == (2.0, 2) and sd == pytest.approx(math.sqrt(2))


def test_summary_pairs_arms_by_split_and_cases_by_id():
    rows, cases = [], []
    seg = [0.80, 0.82, 0.78]
    mtl = [0.83, 0.81, 0.84]
    for k, (a, b) in enumerate(zip(seg, mtl, strict=True)):
        rows += [{"arm": "seg", "split": k, "status": "complete", "test_dice": a, "val_dice": a},
                 {"arm": "mtl", "split": k, "status": "complete", "test_dice": b, "val_dice": b,
                  "test_balanced_accuracy": 0.5}]
        for i, (da, db) in enumerate(((0.7, 0.75), (0.9, 0.85))):
            cases += [{"arm": "seg", "split": k, "id": f"c{i}", "dice": da + k / 100},
                      {"arm": "mtl", "split": k, "id": f"c{i}", "dice": db + k / 100}]
    rows.append({"arm": "mtl", "split": 3, "status": "failed"})  # not paired, not counted
    s = summarise(rows, cases, ["seg", "mtl"])
    assert s["arms"]["seg"]["test_dice_mean"] == pytest.approx(np.mean(seg))
    assert s["arms"]["mtl"]["test_dice_sd"] == pytest.approx(np.std(mtl, ddof=1))
    assert s["arms"]["mtl"]["n_splits"] == 3 and s["arms"]["mtl"]["n_planned"] == 4
    p = s["paired"]
    assert p["single_task_arm"] == "seg" and p["metric"] == "test_dice"
    assert p["splits"]["differences"] == pytest.approx([0.03, -0.01, 0.06])
    assert p["mean_difference"] == pytest.approx(np.mean([0.03, -0.01, 0.06]))
    assert p["cases"]["n"] == 6
    ref = stats.wilcoxon(np.round([0.05, -0.05] * 3, 10), method="auto")  # W+ = W-: p = 1
    assert p["cases"]["wilcoxon_p"] == pytest.approx(ref.pvalue)


def test_t_interval_by_hand():
    # differences 0.01, 0.03, -0.01, 0.05: mean 0.02, sd sqrt(0.002 / 3), t(0.975, 3) = 3.182446
    single = [0.8, 0.8, 0.8, 0.8]
    out = paired_comparison(single, [0.81, 0.83, 0.79, 0.85])
    half = 3.182446 * math.sqrt(0.002 / 3) / 2
    assert out["ci95_t"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-6)
    assert all(math.isnan(x) for x in paired_comparison([0.5], [0.6])["ci95_t"])
