"""Swappable backbones: each adapter runs MONAI's own stages (same segmentation as the MONAI
network), the head is attached to the deepest features, shapes in 2-D and 3-D, TorchScript."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, SwinUNETR, UNet

from pipeline.backbones import (
    BACKBONES,
    _AttentionUNetStages,
    _BasicUNetStages,
    _SwinUNETRStages,
    _UNetStages,
    multitask_network,
)

OTHERS = [b for b in BACKBONES if b != "segresnet"]


@pytest.mark.parametrize("make, stages, size", [
    (lambda: BasicUNet(3, 1, 1, features=(8, 8, 16, 32, 64, 8)), _BasicUNetStages, 32),
    (lambda: UNet(3, 1, 1, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2), _UNetStages, 32),
    (lambda: AttentionUnet(3, 1, 1, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2)), _AttentionUNetStages, 32),
    (lambda: SwinUNETR(in_channels=1, out_channels=1, feature_size=12), _SwinUNETRStages, 64),
])
def test_adapter_segmentation_is_the_monai_network(make, stages, size):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(1, 1, size, size, size)
    seg, bottleneck = stages(net).eval()(x)
    torch.testing.assert_close(seg, net(x))  # the same modules, in MONAI's order
    assert bottleneck.shape[2] == size // (32 if isinstance(net, SwinUNETR) else 16)


@pytest.mark.parametrize("backbone", OTHERS)
@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_and_embedding_is_the_pooled_bottleneck(backbone, dims):
    shape = (40, 24, 16)[:dims]
    torch.manual_seed(0)
    net = multitask_network(backbone, spatial_dims=dims, init_filters=8, cls_hidden=[8]).eval()
    captured = {}
    net.backbone.register_forward_hook(lambda m, i, o: captured.update(bottleneck=o[1]))  # returns None
    x = torch.randn(2, 1, *shape)
    seg, logits, emb = net(x)
    assert seg.shape == (2, 1, *shape) and logits.shape == (2, 3) and emb.shape == (2, net.embedding_dim)
    deepest = net.encoder_features(x)[-1]
    torch.testing.assert_close(captured["bottleneck"], deepest)  # the head reads the deepest level
    torch.testing.assert_close(emb, deepest.flatten(2).mean(-1))  # mean pooling of the bottleneck
    assert deepest.shape[2] == -(-shape[0] // net.encoder_strides[-1])


@pytest.mark.parametrize("backbone", OTHERS)
def test_tumour_head_with_coordinates_on_every_backbone(backbone):
    torch.manual_seed(0)
    net = multitask_network(backbone, init_filters=8, cls_hidden=[8], cls_pooling="tumour", coord_channels=3,
                            coord_mirror_axes=[0]).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    seg, logits, emb = net(x)
    assert seg.shape == (1, 1, 32, 32, 32) and logits.shape == (1, 3)
    # the coordinates reach the head only: changing them changes the class, not the mask
    seg2, logits2, _ = net(torch.cat([x[:, :1], x[:, 1:] + 0.3], 1))
    torch.testing.assert_close(seg, seg2)
    assert not torch.allclose(logits, logits2)


@pytest.mark.parametrize("backbone", ["basic_unet", "unet", "attention_unet"])
def test_torchscript(backbone):
    net = multitask_network(backbone, init_filters=8, cls_hidden=[8], cls_pooling="tumour", coord_channels=3).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    for a, b in zip(net(x), torch.jit.script(net)(x), strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_backbone_and_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'vnet'"):
        multitask_network("vnet")
    with pytest.raises(ValueError, match="SegResNet only"):
        multitask_network("unet", decoder=False, cls_pooling="mean")
