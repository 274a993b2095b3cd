"""Per-task encoder gradients: the figures against a hand computation, and a measured training
step identical to an unmeasured one."""

from __future__ import annotations

import math

import numpy as np
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
