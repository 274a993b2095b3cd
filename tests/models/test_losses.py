"""MultiTaskLoss against a hand computation of the study's formula, with missing labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models.losses import MultiTaskLoss


def hand_dice_loss(logits: np.ndarray, mask: np.ndarray, eps: float = 1e-5) -> float:
    p = 1 / (1 + np.exp(-logits))
    return 1 - 2 * (p * mask).sum() / ((p**2).sum() + (mask**2).sum() + eps)


def hand_weighted_ce(logits: np.ndarray, cls: np.ndarray, w: np.ndarray) -> float:
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    picked = -logp[np.arange(len(cls)), cls]
    return float((w[cls] * picked).sum() / w[cls].sum())


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    seg = torch.randn(4, 1, 6, 6, 6, generator=g)
    mask = (torch.rand(4, 1, 6, 6, 6, generator=g) > 0.7).float()
    logits = torch.randn(4, 3, generator=g)
    cls = torch.tensor([0, 2, 1, 2])
    return seg, mask, logits, cls


def test_matches_hand_formula(batch):
    seg, mask, logits, cls = batch
    w = np.array([1.0, 2.0, 0.5])
    out = MultiTaskLoss(cls_weight=0.3, class_weights=w).compute(seg, logits, mask, cls)
    expected_seg = hand_dice_loss(seg.numpy(), mask.numpy())  # over the whole batch at once
    expected_cls = hand_weighted_ce(logits.numpy(), cls.numpy(), w)
    assert out["seg"].item() == pytest.approx(expected_seg, rel=1e-5)
    assert out["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_seg + 0.3 * expected_cls, rel=1e-5)


def test_missing_labels_drop_their_terms(batch):
    seg, mask, logits, cls = batch
    has_label = torch.tensor([1, 0, 1, 0])
    cls_missing = torch.tensor([0, -1, -1, 2])
    out = MultiTaskLoss(cls_weight=0.3).compute(seg, logits, mask, cls_missing, has_label=has_label)
    keep_s = np.array([0, 2])
    keep_c = np.array([0, 3])
    expected_seg = hand_dice_loss(seg.numpy()[keep_s], mask.numpy()[keep_s])
    expected_cls = hand_weighted_ce(logits.numpy()[keep_c], cls_missing.numpy()[keep_c], np.ones(3))
    assert out["seg"].item() == pytest.approx(expected_seg, rel=1e-5)
    assert out["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert int(out["n_seg"]) == 2 and int(out["n_cls"]) == 2


def test_samples_without_labels_get_no_gradient(batch):
    seg, mask, logits, cls = batch
    seg = seg.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    out = MultiTaskLoss().compute(seg, logits, mask, torch.tensor([0, -1, 1, -1]), has_label=torch.tensor([1, 1, 0, 0]))
    out["loss"].backward()
    assert seg.grad[2:].abs().sum() == 0 and seg.grad[:2].abs().sum() > 0
    assert logits.grad[[1, 3]].abs().sum() == 0 and logits.grad[[0, 2]].abs().sum() > 0


def test_batch_with_no_labels_is_valid_zero(batch):
    seg, mask, logits, _ = batch
    seg = seg.clone().requires_grad_(True)
    out = MultiTaskLoss().compute(seg, logits, mask, torch.full((4,), -1), has_label=torch.zeros(4))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert seg.grad is not None and seg.grad.abs().sum() == 0
    assert math.isnan(out["seg"].item()) and math.isnan(out["cls"].item())


def test_single_task_ignores_classifier(batch):
    seg, mask, logits, cls = batch
    out = MultiTaskLoss(cls_weight=0.3).compute(seg, None, mask, cls)
    assert out["loss"].item() == pytest.approx(hand_dice_loss(seg.numpy(), mask.numpy()), rel=1e-5)


def test_engine_adapter_keeps_terms(batch):
    seg, mask, logits, cls = batch
    loss = MultiTaskLoss(cls_weight=0.5)
    total = loss((seg, logits, None), {"label": mask, "class": cls, "has_label": torch.ones(4), "has_class": torch.ones(4)})
    assert total.item() == pytest.approx(loss.last_terms["seg"].item() + 0.5 * loss.last_terms["cls"].item(), rel=1e-6)


def test_uncertainty_weighting_starts_at_the_fixed_weights_and_learns_one_over_twice_the_loss():
    seg_logits = torch.randn(2, 1, 8, 8, 8)
    mask = (torch.rand(2, 1, 8, 8, 8) > 0.7).float()
    cls_logits = torch.randn(2, 3)
    cls = torch.tensor([0, 2])
    fixed = MultiTaskLoss(cls_weight=0.3).compute(seg_logits, cls_logits, mask, cls)
    learnt = MultiTaskLoss(cls_weight=0.3, mtl_method="uncertainty")
    out = learnt.compute(seg_logits, cls_logits, mask, cls)
    # exp(-s) L + s / 2 per term, s starting at -log(w): the fixed loss plus -log(0.3) / 2
    assert float(out["loss"].detach()) == pytest.approx(float(fixed["loss"]) - 0.5 * math.log(0.3), rel=1e-5)
    assert learnt.task_weights() == pytest.approx({"w_seg": 1.0, "w_cls": 0.3})
    # with the losses held constant, each weight goes to 1 / (2 L) (the minimum of exp(-s) L + s / 2)
    opt = torch.optim.Adam(learnt.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        learnt.compute(seg_logits, cls_logits, mask, cls)["loss"].backward()
        opt.step()
    w = learnt.task_weights()
    assert w["w_seg"] == pytest.approx(1 / (2 * float(fixed["seg"])), rel=0.02)
    assert w["w_cls"] == pytest.approx(1 / (2 * float(fixed["cls"])), rel=0.02)


def test_uncertainty_weighting_learns_nothing_with_one_task_and_refuses_unknown_methods():
    assert MultiTaskLoss(cls_weight=0.0, mtl_method="uncertainty").log_vars is None
    assert list(MultiTaskLoss(mtl_method="pcgrad").parameters()) == []
    assert MultiTaskLoss(cls_weight=0.0, mtl_method="gradnorm").state_dict() == {}  # one term: nothing to balance
    with pytest.raises(ValueError, match="mtl_method"):
        MultiTaskLoss(mtl_method="cagrad")


def test_dice_ce_adds_the_binary_cross_entropy_of_the_masked_samples(batch):
    seg, mask, logits, cls = batch
    has_label = torch.tensor([1, 1, 0, 1])
    keep = np.array([0, 1, 3])
    out = MultiTaskLoss(cls_weight=0.0, seg_loss="dice_ce").compute(seg, logits, mask, cls, has_label=has_label)
    x, y = seg.numpy()[keep].astype(np.float64), mask.numpy()[keep]
    p = 1 / (1 + np.exp(-x))
    bce = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    assert out["seg"].item() == pytest.approx(hand_dice_loss(x, y) + bce, rel=1e-5)
    with pytest.raises(ValueError, match="dice_ce"):
        MultiTaskLoss(seg_loss="ce")
