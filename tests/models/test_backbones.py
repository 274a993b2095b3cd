"""Swappable backbones: each adapter runs MONAI's own stages (same segmentation as the MONAI
network), the head is attached to the deepest features, shapes in 2-D and 3-D, TorchScript."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, SwinUNETR, UNet

from pipeline.models.backbones import (
    BACKBONES,
    AttentionUNetStages,
    BasicUNetStages,
    SwinUNETRStages,
    UNetStages,
    multitask_network,
)

OTHERS = [b for b in BACKBONES if b != "segresnet"]


@pytest.mark.parametrize("make, stages, size", [
    (lambda: BasicUNet(3, 1, 1, features=(8, 8, 16, 32, 64, 8)), BasicUNetStages, 32),
    (lambda: UNet(3, 1, 1, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2), UNetStages, 32),
    (lambda: AttentionUnet(3, 1, 1, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2)), AttentionUNetStages, 32),
    (lambda: SwinUNETR(in_channels=1, out_channels=1, feature_size=12), SwinUNETRStages, 64),
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
    with pytest.raises(ValueError, match="built on basic_unet"):
        multitask_network("unet", decoder=False, cls_pooling="mean")
    with pytest.raises(ValueError, match="SegResNet only"):
        multitask_network("unet", reconstruct=True)


@pytest.mark.slow
def test_unet_backbone_trains_evaluates_exports_infers_and_embeds(tmp_path):
    """A non-SegResNet backbone through every workflow of the bundle (tiny cohort, one epoch)."""
    import csv
    import json

    from tests.helpers import DEMO, INFER, TRAIN, bundle, train_and_evaluate

    datalist, run, overlay, _ = train_and_evaluate(tmp_path, [DEMO, "TINY", "configs/backbone_unet.json"], seed=3)
    configs = [DEMO, overlay, "configs/backbone_unet.json"]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["dice"] <= 1.0 and "balanced_accuracy" in metrics
    ts = tmp_path / "model.ts"
    done = bundle(["ckpt_export", "network_def"], [INFER, *configs], filepath=ts, ckpt_file=run / "models" / "model.pt")
    assert done.returncode == 0 and ts.stat().st_size > 0, done.stderr[-2000:]
    scans = tmp_path / "scans"
    for cid in ("c000", "c001"):
        (scans / f"{cid}.nii.gz").parent.mkdir(parents=True, exist_ok=True)
        (scans / f"{cid}.nii.gz").write_bytes((datalist.parent / cid / "image.nii.gz").read_bytes())
    out = tmp_path / "pred"
    done = bundle(["run"], [INFER, *configs], input_dir=scans, output_dir=out, ckpt=ts)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all((out / r["id"]).is_dir() for r in rows)
    from pipeline.retrieval.index import case_features, load_model

    model = load_model([TRAIN, *configs], run / "models" / "model.pt", tmp_path / "work", "cpu",
                       {"already_registered": True})
    item = {"id": "c000", "image": str(datalist.parent / "c000" / "image.nii.gz"),
            "label": str(datalist.parent / "c000" / "mask.nii.gz"), "class": 0, "has_label": 1, "has_class": 1,
            "brain": model.brain_mask}
    feats = case_features(model, item)
    assert feats.embedding().shape == (model.network.embedding_dim,) and feats.strides == model.network.encoder_strides


def test_head_classes_follow_multitask():
    from pipeline.models.backbones import head_classes

    assert head_classes(3, True) == 3 and head_classes(3, False) == 0
