"""Staged training: loss weights of the branches a config switches on, frozen branches."""

from __future__ import annotations

from pipeline.models.networks import MultiTaskSegResNet
from pipeline.training.staging import active_loss_weights, prepare_for_training


def test_switched_off_branches_weigh_nothing_and_are_frozen():
    assert active_loss_weights(1.0, 0.3, 0.5, det_weight=2.0) == {"seg_weight": 1.0, "cls_weight": 0.3,
                                                                  "recon_weight": 0.0, "det_weight": 0.0}
    assert active_loss_weights(1.0, 0.3, 0.5, segment=False, multitask=True, reconstruct=True) == {
        "seg_weight": 0.0, "cls_weight": 0.3, "recon_weight": 0.5, "det_weight": 0.0}
    assert active_loss_weights(1.0, 0.0, 0.5, det_weight=2.0, detect=True)["det_weight"] == 2.0
    weights = active_loss_weights(1.0, 0.3, 0.0, multitask=False, det_weight=1.0, detect=False)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=3, cls_hidden=(4,),
                             coord_channels=0, detect=True, det_levels=(1,), det_channels=8)
    prepare_for_training(net, None, weights)
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"classifier", "det_head"}
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith("convInit"))


def test_gradient_rules_fall_back_to_fixed_without_both_tasks():
    from pipeline.training.staging import effective_mtl_method

    both = {"seg_weight": 1.0, "cls_weight": 0.3, "recon_weight": 0.0}
    for method in ("fixed", "uncertainty", "pcgrad", "stop"):
        assert effective_mtl_method(method, both) == method
    classifier_only = {"seg_weight": 0.0, "cls_weight": 1.0, "recon_weight": 0.5}
    segmentation_only = {"seg_weight": 1.0, "cls_weight": 0.0, "recon_weight": 0.0}
    for weights in (classifier_only, segmentation_only):
        assert effective_mtl_method("stop", weights) == "fixed" and effective_mtl_method("pcgrad", weights) == "fixed"
        assert effective_mtl_method("uncertainty", weights) == "uncertainty"


def test_bundle_resolves_the_method_each_arm_uses():
    """An overlay that sets ``stop`` for the multi-task network leaves the classifier-alone arm and
    stage 1 of the staged recipe training their encoder with the class term."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[2]
    train = root / "bundles/plgg_mtl/configs/train.json"
    for overlay, expected in (([], "stop"), (["configs/classify_only.json"], "fixed"),
                              (["configs/stage1_cls_recon.json"], "fixed"), (["configs/single_task.json"], "fixed")):
        parser = ConfigParser()
        parser.read_config([str(train), str(root / "configs/demo.json"), str(root / "configs/mtl_stop.json"),
                            *(str(root / o) for o in overlay)])
        assert parser.get_parsed_content("mtl_method_used") == expected, overlay


def test_a_frozen_encoder_gives_the_same_features_before_and_after_a_segmentation_step():
    """``freeze: ["encoder"]`` (stage 2 keeping stage 1's class): the decoder learns, the encoder and so
    the bottleneck the classifier reads do not move, in training mode as in evaluation mode."""
    import torch

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.training.engines import param_groups

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1), num_classes=3, cls_hidden=(4,),
                             cls_pooling="mean", coord_channels=0)
    prepare_for_training(net, None, active_loss_weights(1.0, 0.0, 0.0), freeze=["encoder"])
    assert not any(p.requires_grad for n, p in net.named_parameters() if n.startswith(("convInit", "down_layers")))
    assert not any(p.requires_grad for p in net.classifier.parameters())
    x = torch.randn(2, 1, 16, 16, 16)
    net.train()
    before = [f.detach().clone() for f in net.encoder_features(x)]
    decoder = net.conv_final[-1].conv.weight.detach().clone()
    opt = torch.optim.Adam(param_groups(net, 1e-2))
    target = {"label": (x > 1).float(), "class": torch.tensor([0, 1]), "has_label": torch.ones(2),
              "has_class": torch.zeros(2), "image": x}
    MultiTaskLoss(cls_weight=0.0)(net(x), target).backward()
    opt.step()
    after = net.encoder_features(x)
    net.eval()
    with torch.no_grad():
        in_eval = net.encoder_features(x)
    for b, a, e in zip(before, after, in_eval, strict=True):
        assert torch.equal(b, a) and torch.allclose(b, e)
    moved = [n for n, p in net.named_parameters() if p.requires_grad]
    assert moved and all(n.startswith(("up_", "conv_final")) for n in moved)
    assert not torch.equal(net.conv_final[-1].conv.weight, decoder)


def test_a_frozen_classifier_gives_stage_1s_class_after_stage_2_steps():
    """Stage 2 with the encoder frozen and the class term off: after training steps on other batches,
    the class logits in evaluation mode are those before (the classifier's batch norm statistics
    held too), while a trained classifier's statistics do move."""
    import torch

    from pipeline.models.losses import MultiTaskLoss
    from pipeline.training.engines import param_groups

    def network():
        torch.manual_seed(0)
        return MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1), num_classes=3,
                                  cls_hidden=(4,), cls_pooling="mean", coord_channels=0)

    probe = torch.randn(3, 1, 16, 16, 16)
    for freeze, cls_weight in ((["encoder"], 0.0), ([], 0.3)):
        net = network()
        assert any(n.endswith("running_mean") for n, _ in net.classifier.named_buffers())
        prepare_for_training(net, None, active_loss_weights(1.0, cls_weight, 0.0), freeze=freeze)
        net.eval()
        with torch.no_grad():
            before = net(probe)[1].clone()
        opt = torch.optim.Adam(param_groups(net, 1e-2))
        net.train()
        for step in range(3):
            x = 3.0 * torch.randn(2, 1, 16, 16, 16) + step
            target = {"label": (x > 1).float(), "class": torch.tensor([0, 1]), "has_label": torch.ones(2),
                      "has_class": torch.ones(2), "image": x}
            opt.zero_grad()
            MultiTaskLoss(cls_weight=cls_weight)(net(x), target).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            after = net(probe)[1]
        assert torch.equal(before, after) == bool(freeze), (freeze, before, after)


def test_freeze_refuses_an_unknown_branch_and_a_network_left_with_nothing_to_train():
    import pytest

    from pipeline.io.errors import InputError

    net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=3, cls_hidden=(4,),
                             coord_channels=0)
    with pytest.raises(InputError, match="'encodr' is not a branch; the branches are encoder, seg, cls"):
        prepare_for_training(net, None, None, freeze=["encodr"])
    with pytest.raises(InputError, match="leaves no parameter to train"):
        prepare_for_training(net, None, None, freeze=["encoder", "seg", "cls"])


def test_bundle_freezes_the_branches_freeze_names():
    from pathlib import Path

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[2]
    parser = ConfigParser()
    parser.read_config([str(root / "bundles/plgg_mtl/configs/train.json"), str(root / "configs/demo.json"),
                        str(root / "configs/stage2_seg_recon.json")])
    parser["freeze"] = ["encoder"]
    parser["init_filters"] = 8
    net = parser.get_parsed_content("network_init")
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"convInit", "down_layers", "classifier"}
