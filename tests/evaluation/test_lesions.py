"""Lesion-wise Dice and HD95 (BraTS 2023+ definition) on hand-made masks whose answers are worked
out by hand in each test."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.lesions import MISSED_HD95_MM, lesion_scores, summarise_lesions

ONE_MM = (1.0, 1.0, 1.0)


def cube(shape, corner, size) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(c, c + size) for c in corner)] = True
    return m


def test_perfect_prediction_of_two_lesions() -> None:
    truth = cube((50, 50, 50), (5, 5, 5), 8) | cube((50, 50, 50), (30, 30, 30), 8)
    s = lesion_scores(truth, truth, ONE_MM)
    assert s["lesion_dice"] == pytest.approx(1.0) and s["lesion_hd95_mm"] == pytest.approx(0.0)
    assert (s["lesions_tp"], s["lesions_fn"], s["lesions_fp"]) == (2, 0, 0)


def test_one_missed_lesion_scores_zero_and_374() -> None:
    a, b = cube((50, 50, 50), (5, 5, 5), 8), cube((50, 50, 50), (30, 30, 30), 8)
    s = lesion_scores(a, a | b, ONE_MM)
    # lesion a perfect (Dice 1, HD95 0), lesion b missed (0, 374): means over the two lesions
    assert s["lesion_dice"] == pytest.approx(0.5)
    assert s["lesion_hd95_mm"] == pytest.approx(MISSED_HD95_MM / 2)
    assert (s["lesions_tp"], s["lesions_fn"], s["lesions_fp"]) == (1, 1, 0)
    # the case-level Dice would have hidden it: 2 * 512 / (512 + 1024)
    assert 2 * (a & (a | b)).sum() / (a.sum() + (a | b).sum()) == pytest.approx(2 / 3)


def test_one_spurious_lesion_counts_whatever_its_size() -> None:
    truth = cube((50, 50, 50), (5, 5, 5), 8)
    spurious = cube((50, 50, 50), (40, 40, 40), 2)  # 8 voxels, far below the 50 mm^3 threshold
    s = lesion_scores(truth | spurious, truth, ONE_MM)
    assert s["lesion_dice"] == pytest.approx(0.5)
    assert s["lesion_hd95_mm"] == pytest.approx(MISSED_HD95_MM / 2)
    assert (s["lesions_tp"], s["lesions_fn"], s["lesions_fp"]) == (1, 0, 1)


def test_two_close_lesions_merge_into_one_and_are_matched_together() -> None:
    # two ground-truth cubes 2 voxels apart: one lesion once dilated by 3 mm; a prediction that
    # bridges them is one component matched to that lesion
    a, b = cube((40, 40, 40), (10, 10, 10), 6), cube((40, 40, 40), (10, 10, 18), 6)
    bridge = np.zeros_like(a)
    bridge[10:16, 10:16, 10:24] = True
    s = lesion_scores(bridge, a | b, ONE_MM)
    assert (s["lesions_tp"], s["lesions_fn"], s["lesions_fp"]) == (1, 0, 0)
    expected = 2 * (a | b).sum() / (bridge.sum() + (a | b).sum())  # 2 * 432 / (504 + 432)
    assert s["lesion_dice"] == pytest.approx(expected)
    # far apart they stay two lesions, and the one prediction covering both is matched to each
    far = cube((40, 40, 40), (10, 10, 30), 6)
    s2 = lesion_scores(a | far, a | far, ONE_MM)
    assert s2["lesions_tp"] == 2


def test_small_ground_truth_lesions_are_ignored() -> None:
    big, small = cube((40, 40, 40), (5, 5, 5), 8), cube((40, 40, 40), (30, 30, 30), 3)  # 27 voxels
    s = lesion_scores(big, big | small, ONE_MM)
    assert s["lesion_dice"] == pytest.approx(1.0) and s["lesions_ignored"] == 1 and s["lesions_fn"] == 0
    # on a 2 mm grid the same 27 voxels are 216 mm^3: counted (and missed)
    s2 = lesion_scores(big, big | small, (2.0, 2.0, 2.0))
    assert s2["lesions_fn"] == 1 and s2["lesion_dice"] == pytest.approx(0.5)


def test_a_prediction_near_but_outside_the_lesion_is_matched_by_the_dilation() -> None:
    truth = cube((40, 40, 40), (10, 10, 10), 8)
    shifted = cube((40, 40, 40), (10, 10, 20), 8)  # 2 voxels past the lesion's edge, no overlap
    s = lesion_scores(shifted, truth, ONE_MM)
    assert (s["lesions_tp"], s["lesions_fp"]) == (1, 0) and s["lesion_dice"] == pytest.approx(0.0)
    assert s["lesion_hd95_mm"] == pytest.approx(10.0, abs=1.0)  # the cube moved by 10 voxels


def test_empty_masks_and_bad_shapes() -> None:
    empty = np.zeros((10, 10, 10), bool)
    assert lesion_scores(empty, empty, ONE_MM)["lesion_dice"] == 1.0
    assert lesion_scores(empty, empty, ONE_MM)["lesion_hd95_mm"] == 0.0
    with pytest.raises(ValueError):
        lesion_scores(empty, np.zeros((10, 10), bool), ONE_MM)


def test_summary_means_and_counts() -> None:
    rows = [{"lesion_dice": 1.0, "lesion_hd95_mm": 0.0, "lesions_tp": 1, "lesions_fn": 0, "lesions_fp": 0},
            {"lesion_dice": 0.5, "lesion_hd95_mm": 187.0, "lesions_tp": 1, "lesions_fn": 1, "lesions_fp": 0},
            {"id": "no mask"}]
    s = summarise_lesions(rows)
    assert s["lesion_dice"] == pytest.approx(0.75) and s["lesion_hd95_mm"] == pytest.approx(93.5)
    assert (s["lesions_tp"], s["lesions_fn"]) == (2, 1)
