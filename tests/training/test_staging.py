"""Staged training: loss weights of the branches a config switches on, frozen branches."""

from __future__ import annotations

from pipeline.models.networks import MultiTaskSegResNet
from pipeline.training.staging import active_loss_weights, prepare_for_training


def test_switched_off_branches_weigh_nothing_and_are_frozen():
    assert active_loss_weights(1.0, 0.3, 0.5) == {"seg_weight": 1.0, "cls_weight": 0.3, "recon_weight": 0.0}
    assert active_loss_weights(1.0, 0.3, 0.5, segment=False, multitask=True, reconstruct=True) == {
        "seg_weight": 0.0, "cls_weight": 0.3, "recon_weight": 0.5}
    weights = active_loss_weights(1.0, 0.3, 0.0, multitask=False)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=3, cls_hidden=(4,),
                             coord_channels=0)
    prepare_for_training(net, None, weights)
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"classifier"}
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith("convInit"))
