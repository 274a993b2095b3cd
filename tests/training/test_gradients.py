"""Per-task encoder gradients: the figures against a hand computation, and a measured training
step identical to an unmeasured one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.training.gradients import GradientConflictHandler, encoder_gradient_stats


def test_stats_of_two_linear_terms():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    a, b = np.array([3.0, 0.0, 4.0]), np.array([-1.0, 2.0, 0.5])
    out = encoder_gradient_stats((w * torch.tensor(a)).sum(), (w * torch.tensor(b)).sum(), [w])
    assert math.isclose(out["grad_seg"], 5.0, rel_tol=1e-6)
    assert math.isclose(out["grad_cls"], float(np.linalg.norm(b)), rel_tol=1e-6)
    assert math.isclose(out["grad_cos"], float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), rel_tol=1e-6)
    assert w.grad is None  # measured, not accumulated


def _train_one_step(measure: bool) -> tuple[dict, list[torch.Tensor]]:
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.models.networks import MultiTaskSegResNet
    from pipeline.training.engines import LossTermsHandler, MultiTaskPrepareBatch

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=3, cls_hidden=(8,))
    image = torch.randn(2, 1, 16, 16, 16)
    label = (image > 1.0).float()
    batch = {"image": image, "label": label, "class": torch.tensor([0, 2]), "has_label": torch.tensor([1, 1]),
             "has_class": torch.tensor([1, 1])}
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=MultiTaskLoss(),
                                prepare_batch=MultiTaskPrepareBatch(), decollate=False)
    LossTermsHandler().attach(trainer)
    if measure:
        GradientConflictHandler(interval=1).attach(trainer)
    trainer.run()
    return dict(trainer.state.output), [p.detach().clone() for p in net.parameters()]


def test_measured_step_equals_unmeasured_step():
    measured, after = _train_one_step(True)
    plain, after_plain = _train_one_step(False)
    assert {"grad_seg", "grad_cls", "grad_cos"} <= set(measured) and "grad_cos" not in plain
    assert measured["grad_seg"] > 0 and measured["grad_cls"] > 0 and -1.0 <= measured["grad_cos"] <= 1.0
    assert all(torch.equal(x, y) for x, y in zip(after, after_plain, strict=True))


def test_pcgrad_of_two_conflicting_gradients_by_hand():
    from pipeline.training.gradients import pcgrad_combine

    g_seg, g_cls = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # dot -1: g_seg - (-1 / 2) g_cls = (0.5, 0.5); g_cls - (-1 / 1) g_seg = (0, 1)
    combined, conflicted = pcgrad_combine(g_seg, g_cls)
    assert conflicted and torch.allclose(combined, torch.tensor([0.5, 1.5]))
    agreeing, conflicted = pcgrad_combine(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]))
    assert not conflicted and torch.equal(agreeing, torch.tensor([4.0, 1.0]))


def test_encoder_levels_of_segresnet_names():
    from pipeline.models.networks import MultiTaskSegResNet
    from pipeline.training.gradients import encoder_level

    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1), num_classes=3)
    levels = {encoder_level(n) for n, _ in net.named_parameters()}
    assert levels == {None, 0, 1, 2}
    assert encoder_level("convInit.conv.weight") == 0 and encoder_level("down_layers.2.1.conv1.conv.weight") == 2
    assert encoder_level("up_layers.0.0.conv1.conv.weight") is None and encoder_level("classifier.1.weight") is None


def _rule_step(method: str, levels: int = 0) -> tuple[dict, dict, dict, dict]:
    """One SGD step (lr 1) with ``EncoderGradientRule(method)``; returns the parameters before and
    after, and each task's gradient at the start, computed separately (by name)."""
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.models.networks import MultiTaskSegResNet
    from pipeline.training.engines import MultiTaskPrepareBatch
    from pipeline.training.gradients import EncoderGradientRule

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1), num_classes=3, cls_hidden=(8,),
                             cls_dropout=0.0)
    image = torch.randn(2, 1, 16, 16, 16)
    label = (image > 1.0).float()
    batch = {"image": image, "label": label, "class": torch.tensor([0, 2]), "has_label": torch.tensor([1, 1]),
             "has_class": torch.tensor([1, 1])}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = MultiTaskLoss()
    terms = loss.compute(*net(image)[:2], label, batch["class"])
    names = [n for n, _ in net.named_parameters()]
    grads = {}
    for key in ("seg_term", "cls_term"):
        g = torch.autograd.grad(terms[key], list(net.parameters()), retain_graph=True, allow_unused=True)
        grads[key] = {n: (x if x is not None else torch.zeros_like(before[n])) for n, x in zip(names, g, strict=True)}
    net.zero_grad()
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=1.0), loss_function=loss,
                                prepare_batch=MultiTaskPrepareBatch(), decollate=False)
    EncoderGradientRule(method, levels).attach(trainer)
    trainer.run()
    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    return before, after, grads["seg_term"], grads["cls_term"]


def test_stop_keeps_the_class_gradient_out_of_the_shallow_encoder_levels():
    before, after, g_seg, g_cls = _rule_step("stop", levels=1)  # the class gradient reaches level 2 only
    from pipeline.training.gradients import encoder_level

    for n in before:
        step = before[n] - after[n]  # SGD, lr 1: the gradient applied
        lvl = encoder_level(n)
        expected = g_seg[n] if lvl is not None and lvl < 2 else g_seg[n] + g_cls[n]
        assert torch.allclose(step, expected, atol=1e-5), n
    assert any(g_cls[n].abs().max() > 1e-6 for n in before if encoder_level(n) == 0)  # the rule removed something


def test_pcgrad_step_applies_the_projected_encoder_gradient():
    from pipeline.training.gradients import encoder_level, pcgrad_combine

    before, after, g_seg, g_cls = _rule_step("pcgrad")
    enc = [n for n in before if encoder_level(n) is not None]
    a = torch.cat([g_seg[n].reshape(-1) for n in enc])
    b = torch.cat([g_cls[n].reshape(-1) for n in enc])
    expected, _ = pcgrad_combine(a, b)
    step = torch.cat([(before[n] - after[n]).reshape(-1) for n in enc])
    assert torch.allclose(step, expected, atol=1e-5)
    # PCGrad's guarantee: the update never increases either task's loss to first order
    assert float(step @ a) >= -1e-6 and float(step @ b) >= -1e-6
    for n in before:  # decoder and head: their own task's gradient, untouched
        if encoder_level(n) is None:
            assert torch.allclose(before[n] - after[n], g_seg[n] + g_cls[n], atol=1e-5), n


def test_rule_refuses_an_unknown_method_and_a_network_without_segresnet_encoder():
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.training.gradients import EncoderGradientRule

    with pytest.raises(ValueError, match="mtl_method"):
        EncoderGradientRule("gradnorm")
    net = torch.nn.Conv3d(1, 1, 3)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": torch.zeros(1)}],
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                loss_function=MultiTaskLoss())
    EncoderGradientRule("pcgrad").attach(trainer)
    with pytest.raises(ValueError, match="SegResNet"):
        trainer.run()


def test_stop_at_no_level_detaches_the_head_input_and_trains_the_encoder_on_the_mask_alone():
    from pipeline.training.gradients import encoder_level

    before, after, g_seg, g_cls = _rule_step("stop", levels=0)
    for n in before:
        step = before[n] - after[n]
        expected = g_seg[n] if encoder_level(n) is not None else g_seg[n] + g_cls[n]
        assert torch.allclose(step, expected, atol=1e-5), n
    assert any(g_cls[n].abs().max() > 1e-6 for n in before if encoder_level(n) is not None)
