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


def _three_level_net_and_batch() -> tuple[torch.nn.Module, dict]:
    """A seeded three-level multi-task SegResNet (no dropout) and a batch of two cases with both labels."""
    from pipeline.models.networks import MultiTaskSegResNet

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1), num_classes=3, cls_hidden=(8,),
                             cls_dropout=0.0)
    image = torch.randn(2, 1, 16, 16, 16)
    label = (image > 1.0).float()
    batch = {"image": image, "label": label, "class": torch.tensor([0, 2]), "has_label": torch.tensor([1, 1]),
             "has_class": torch.tensor([1, 1])}
    return net, batch


def _rule_step(method: str, levels: int = 0) -> tuple[dict, dict, dict, dict]:
    """One SGD step (lr 1) with ``EncoderGradientRule(method)``; returns the parameters before and
    after, and each task's gradient at the start, computed separately (by name)."""
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.training.engines import MultiTaskPrepareBatch
    from pipeline.training.gradients import EncoderGradientRule

    net, batch = _three_level_net_and_batch()
    image, label = batch["image"], batch["label"]
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
        EncoderGradientRule("cagrad")
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


def test_gradnorm_step_by_hand():
    from pipeline.training.gradients import gradnorm_weights

    w = torch.tensor([1.0, 0.3])
    # both terms as far from their start (ratios 1): the target is the mean norm, 1.25; the
    # segmentation pulls harder, so it loses weight and the class gains, by exp(0.1), then both are
    # rescaled to the sum 1.3: 1.3 * (e^-0.1, 0.3 e^0.1) / (e^-0.1 + 0.3 e^0.1)
    out = gradnorm_weights(w, torch.tensor([2.0, 0.5]), torch.tensor([0.8, 1.1]), torch.tensor([0.8, 1.1]), 1.5, 0.1)
    assert torch.allclose(out, torch.tensor([0.951390, 0.348610]), atol=1e-5)
    assert math.isclose(float(out.sum()), 1.3, rel_tol=1e-6)
    # equal pulls, but the segmentation has halved its loss and the class kept its own: alpha 1 sets
    # the targets to (2/3, 4/3) of the mean norm, so the class, behind, gains weight
    out = gradnorm_weights(w, torch.tensor([1.0, 1.0]), torch.tensor([0.4, 1.1]), torch.tensor([0.8, 1.1]), 1.0, 0.1)
    assert out[0] < w[0] and out[1] > w[1]
    # at the targets nothing moves
    assert torch.equal(gradnorm_weights(w, torch.tensor([1.0, 1.0]), torch.ones(2), torch.ones(2), 1.5, 0.1), w)


def test_gradnorm_rule_moves_the_loss_weights_against_the_harder_pull_at_the_deepest_level():
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.training.engines import MultiTaskPrepareBatch
    from pipeline.training.gradients import EncoderGradientRule, encoder_level

    net, batch = _three_level_net_and_batch()
    image, label = batch["image"], batch["label"]
    loss = MultiTaskLoss(mtl_method="gradnorm")
    terms = loss.compute(*net(image)[:2], label, batch["class"])
    deepest = [p for n, p in net.named_parameters() if encoder_level(n) == 2]
    norms = [float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(terms[k], deepest, retain_graph=True)]).norm())
             for k in ("seg_term", "cls_term")]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=loss,
                                prepare_batch=MultiTaskPrepareBatch(), decollate=False)
    EncoderGradientRule("gradnorm", gradnorm_lr=0.1).attach(trainer)
    trainer.run()
    assert torch.allclose(loss.initial_terms, torch.stack([terms["seg"], terms["cls"]]))
    sign = 1.0 if norms[0] > norms[1] else -1.0  # first step: the target is the mean of the two norms
    moved = torch.tensor([math.exp(-0.1 * sign), 0.3 * math.exp(0.1 * sign)])
    assert torch.allclose(loss.task_w, moved * 1.3 / moved.sum(), atol=1e-6)
    assert set(loss.state_dict()) == {"task_w", "initial_terms"}  # what the checkpoint keeps


def test_rules_refuse_a_head_that_reads_no_encoder_feature():
    from monai.engines import SupervisedTrainer

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.models.networks import MultiTaskSegResNet
    from pipeline.training.gradients import EncoderGradientRule

    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=3, cls_hidden=(8,),
                             coord_channels=3, cls_inputs="position")
    for method in ("pcgrad", "gradnorm"):
        trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[{}], network=net,
                                    optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                    loss_function=MultiTaskLoss(mtl_method=method))
        EncoderGradientRule(method).attach(trainer)
        with pytest.raises(ValueError, match="cls_inputs 'position'"):
            trainer.run()
