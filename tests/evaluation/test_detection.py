"""Lesion boxes, mask-derived detections and detection scores on hand-made masks and boxes whose
answers are worked out by hand in each test."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.detection import detection_scores, mask_detections


def test_mask_detections_score_each_component_by_its_mean_probability() -> None:
    p = np.zeros((30, 30, 30))
    p[2:4, 2:4, 2:4] = 0.6
    p[2:4, 2:4, 4:6] = 1.0  # the same component: mean (0.6 + 1.0) / 2
    p[20:22, 20:22, 20:22] = 0.55
    p[10:12, 10:12, 10:12] = 0.4  # below the threshold
    boxes, scores = mask_detections(p >= 0.5, p)
    assert boxes.tolist() == [[2, 2, 2, 4, 4, 6], [20, 20, 20, 22, 22, 22]]
    assert scores == pytest.approx([0.8, 0.55])
    assert mask_detections(p >= 0.5)[1].tolist() == [1.0, 1.0]  # no probabilities: every component 1
    with pytest.raises(ValueError, match="shape"):
        mask_detections(p >= 0.5, p[:10])


def test_average_precision_follows_the_iou_threshold() -> None:
    truth = [np.array([[0, 0, 0, 10, 10, 4]])]  # 400 voxels
    found = [(np.array([[0, 0, 0, 10, 10, 10]]), np.array([0.9]))]  # 1000 voxels, overlap 400: IoU 0.4
    s = detection_scores(found, truth)
    assert s["ap_iou0.10"] == pytest.approx(1.0) and s["ap_iou0.25"] == pytest.approx(1.0)
    assert s["ap_iou0.50"] == pytest.approx(0.0) and s["ar_iou0.50"] == pytest.approx(0.0)
    assert s["ar_iou0.10"] == pytest.approx(1.0)
    assert (s["lesions"], s["detections"], s["cases"]) == (1, 1, 1)


def test_a_missed_lesion_halves_recall_and_a_spurious_box_costs_precision() -> None:
    truth = [np.array([[0, 0, 0, 5, 5, 5], [20, 20, 20, 25, 25, 25]]), np.zeros((0, 6))]
    found = [(np.array([[0, 0, 0, 5, 5, 5]]), np.array([0.5])),  # the second lesion missed
             (np.array([[1, 1, 1, 4, 4, 4]]), np.array([0.9]))]  # a box where there is no lesion, ranked first
    s = detection_scores(found, truth)
    assert s["ar_iou0.10"] == pytest.approx(0.5)
    # ranked: FP (0.9) then TP (0.5): precision 0.5 at recall 0.5; 101-point interpolation: 51 of 101 points
    assert s["ap_iou0.10"] == pytest.approx(0.5 * 51 / 101)


def test_sensitivity_at_one_false_positive_per_case() -> None:
    lesion = np.array([[0, 0, 0, 5, 5, 5]])
    far = [[30, 30, 30, 35, 35, 35], [40, 40, 40, 45, 45, 45], [50, 50, 50, 55, 55, 55]]
    truth = [lesion, lesion]
    found = [(lesion.astype(float), np.array([0.9])),
             (np.array(far + [[0, 0, 0, 5, 5, 5]], float), np.array([0.95, 0.8, 0.7, 0.3]))]
    # at the score 0.8: 2 false positives over 2 cases (1 per case) and 1 of 2 lesions found;
    # both lesions only at 0.3, with 1.5 false positives per case
    s = detection_scores(found, truth, fp_per_case=(1.0, 2.0))
    assert s["sensitivity_fp1"] == pytest.approx(0.5)
    assert s["sensitivity_fp2"] == pytest.approx(1.0)


def test_no_lesion_anywhere_gives_nan_and_mismatched_inputs_are_refused() -> None:
    s = detection_scores([(np.zeros((0, 6)), np.zeros(0))], [np.zeros((0, 6))])
    assert np.isnan(s["ap_iou0.10"]) and np.isnan(s["sensitivity_fp1"])
    with pytest.raises(ValueError, match="2 cases of detections for 1"):
        detection_scores([(np.zeros((0, 6)), np.zeros(0))] * 2, [np.zeros((0, 6))])
    with pytest.raises(ValueError, match="2 boxes with 1 scores"):
        detection_scores([(np.zeros((2, 6)), np.zeros(1))], [np.zeros((0, 6))])
