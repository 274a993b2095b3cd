"""Calibration: top-label ECE on hand-made probabilities, temperature fit against SciPy, diagram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from pipeline.inference.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    reliability_diagram,
)


def test_ece_by_hand():
    # two cases at confidence 0.9 (one right, one wrong): bin [0.8, 0.9], gap |0.5 - 0.9| = 0.4
    # two cases at confidence 0.6, both right: bin [0.5, 0.6], gap |1.0 - 0.6| = 0.4
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.3, 0.1, 0.6]])
    target = np.array([0, 1, 1, 2])
    assert expected_calibration_error(probs, target, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    bins = reliability_bins(probs, target, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    assert bins[8]["accuracy"] == 0.5 and bins[8]["confidence"] == pytest.approx(0.9)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 4 cases at confidence 0.75, three right: perfectly calibrated
    probs = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0)))


def test_temperature_fit_matches_scipy_and_softens_an_overconfident_classifier():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 3, 40))
    logits = torch.randn(40, 3)
    logits[torch.arange(40), target] += 1.0
    logits = logits * 4.0  # right two times in three, but with near-certain probabilities
    t = fit_temperature(logits, target)
    ref = minimize_scalar(lambda lt: nll(logits, target, float(np.exp(lt))), bounds=(np.log(0.5), np.log(10)),
                          method="bounded", options={"xatol": 1e-6})
    assert t == pytest.approx(float(np.exp(ref.x)), rel=1e-3)
    assert t > 1.0 and nll(logits, target, t) < nll(logits, target)
    assert fit_temperature(logits[:1], target[:1]) == 1.0  # nothing to fit on one case
    # every validation case right: the NLL falls for ever as T -> 0; the fit stops at its bound
    right = torch.nn.functional.one_hot(target, 3).float() * 3.0
    assert fit_temperature(right, target) == pytest.approx(0.5, rel=1e-3)


def test_reliability_diagram_is_a_png(tmp_path):
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    path = reliability_diagram(probs, np.array([0, 1, 1]), tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "reliability.png"]  # no temporary left
