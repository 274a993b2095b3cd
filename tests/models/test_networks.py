"""MultiTaskSegResNet: output shapes in both modes, identical segmentation path, paper structure."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNet

from pipeline.models.networks import MultiTaskSegResNet, SegmentationOutput
from tests.helpers import ROOT


@pytest.mark.parametrize("num_classes", [3, 0])
def test_output_shapes(num_classes):
    net = MultiTaskSegResNet(num_classes=num_classes, init_filters=8, cls_hidden=(16,))
    seg, logits, emb = net(torch.randn(2, 1, 32, 32, 16))
    assert seg.shape == (2, 1, 32, 32, 16)
    assert emb.shape == (2, 64)  # 8 filters doubled over 3 down-samplings
    if num_classes:
        assert logits.shape == (2, num_classes)
    else:
        assert logits is None


def test_single_task_segmentation_path_is_segresnet():
    torch.manual_seed(0)
    mt = MultiTaskSegResNet(num_classes=0, init_filters=8).eval()
    ref = SegResNet(init_filters=8, in_channels=1, out_channels=1).eval()
    ref.load_state_dict(mt.state_dict())  # same parameter names and shapes: nothing added
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(SegmentationOutput(mt)(x), ref(x))


def test_head_does_not_change_segmentation():
    torch.manual_seed(0)
    mt = MultiTaskSegResNet(num_classes=3, init_filters=8).eval()
    st = MultiTaskSegResNet(num_classes=0, init_filters=8).eval()
    st.load_state_dict({k: v for k, v in mt.state_dict().items() if not k.startswith("classifier")})
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(mt(x)[0], st(x)[0])


def test_paper_network_has_study_structure():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / "configs/paper.json")])
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, MultiTaskSegResNet)
    assert net.init_filters == 32 and tuple(net.blocks_down) == (1, 2, 2, 4) and tuple(net.blocks_up) == (1, 1, 1)
    assert parser.get_parsed_content("patch_size") == [128, 128, 112]
    assert parser.get_parsed_content("batch_size") == 4 and parser.get_parsed_content("lr") == pytest.approx(1e-4)
    assert parser.get_parsed_content("cls_weight") == pytest.approx(0.3)
    assert parser.get_parsed_content("epochs") == 400
    # each level halves the size and doubles the features: 32, 64, 128, 256
    widths = [layer[-1].conv1.conv.out_channels for layer in net.down_layers]
    assert widths == [32, 64, 128, 256]
    assert net.embedding_dim == 256 and net.classifier[-1].out_features == 3
    n_params = sum(p.numel() for p in net.parameters())
    n_seg = sum(p.numel() for p in SegResNet(init_filters=32, out_channels=1).parameters())
    assert 0 < n_params - n_seg < 0.01 * n_seg  # the head is a small addition
    print(f"paper network: {n_params:,} parameters ({n_params - n_seg:,} in the classifier)")


def test_torchscript_export_matches():
    net = MultiTaskSegResNet(num_classes=3, init_filters=8).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 16, 16, 16)
    for a, b in zip(net(x), scripted(x), strict=True):
        torch.testing.assert_close(a, b)


def test_metadata_declares_network_format():
    meta = json.loads((ROOT / "bundles/plgg_mtl/configs/metadata.json").read_text(encoding="utf-8"))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json")])
    net = parser.get_parsed_content("network_def")
    declared = meta["network_data_format"]["inputs"]["image"]
    assert declared["num_channels"] == net.image_channels + net.coord_channels == len(declared["channel_def"])


def test_classifier_trains_with_batch_of_one():
    net = MultiTaskSegResNet(num_classes=3, init_filters=8).train()
    _, logits, _ = net(torch.randn(1, 1, 16, 16, 16))
    logits.sum().backward()
    assert logits.shape == (1, 3)


def test_tumour_pooling_and_atlas_position_match_a_hand_computation():
    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_hidden=(16,), cls_pooling="tumour", coord_channels=3).eval()
    image = torch.randn(2, 1, 32, 32, 16)
    coords = torch.rand(2, 3, 32, 32, 16) - 0.5
    seen = {}
    net.classifier.register_forward_pre_hook(lambda _m, args: seen.setdefault("head_input", args[0]))
    seg, logits, emb = net(torch.cat([image, coords], 1))

    bottleneck = net.encode(image)[0]  # (2, 64, 4, 4, 2): each bottleneck voxel covers 8^3 input voxels
    weight = torch.sigmoid(seg) + net.tumour_floor
    w_block = weight.reshape(2, 1, 4, 8, 4, 8, 2, 8).mean(dim=(3, 5, 7))  # area resampling by hand
    expected = (bottleneck * w_block).sum(dim=(2, 3, 4)) / w_block.sum(dim=(2, 3, 4))
    torch.testing.assert_close(emb, expected)
    centre = (coords * weight).sum(dim=(2, 3, 4)) / weight.sum(dim=(2, 3, 4))
    torch.testing.assert_close(seen["head_input"], torch.cat([expected, centre], 1))
    assert logits.shape == (2, 3)
    # the encoder never sees the coordinate channels: the mask is the image's alone
    torch.testing.assert_close(seg, net(torch.cat([image, torch.zeros_like(coords)], 1))[0])


def test_tumour_pooling_concentrates_on_the_tumour():
    """With a confident tumour in one corner, the pooled features are (nearly) those of that corner."""
    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_pooling="tumour").eval()
    x = torch.randn(1, 1, 32, 32, 16)
    bottleneck = net.encode(x)[0]

    def confident_corner(_module, _inputs, out):  # background everywhere but a confident 8^3 block
        logits = torch.full_like(out, -30.0)
        logits[:, :, :8, :8, :8] = 30.0
        return logits

    hook = net.conv_final.register_forward_hook(confident_corner)
    _, _, emb = net(x)
    hook.remove()
    torch.testing.assert_close(emb, bottleneck[:, :, 0, 0, 0], atol=0.05, rtol=0.05)


def test_the_studys_head_is_unchanged_by_the_new_options():
    torch.manual_seed(0)
    plain = MultiTaskSegResNet(init_filters=8).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    seg, logits, emb = plain(x)
    torch.testing.assert_close(emb, plain.encode(x)[0].mean(dim=(2, 3, 4)))
    torch.testing.assert_close(logits, plain.classifier(emb))
    with pytest.raises(ValueError, match="cls_pooling"):
        MultiTaskSegResNet(cls_pooling="max")


def test_position_reaches_the_head_in_absolute_terms_whatever_the_batch():
    """In training mode a sample's logits must not depend on where the *other* tumours of its
    batch lie (batch norm over the position would make it relative to them)."""
    from pipeline.models.networks import PositionAwareHead

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_hidden=(16,), cls_pooling="tumour", coord_channels=3)
    head = net.classifier.train()
    assert isinstance(head, PositionAwareHead)
    features = torch.randn(4, net.embedding_dim)
    position = torch.rand(4, 3) - 0.5
    others_moved = position.clone()
    others_moved[1:] = -others_moved[1:]
    head.mlp[2].p = 0.0  # no dropout noise in the comparison
    a = head(torch.cat([features, position], 1))
    b = head(torch.cat([features, others_moved], 1))
    torch.testing.assert_close(a[0], b[0])
    moved_self = position.clone()
    moved_self[0] = -moved_self[0]
    assert not torch.allclose(head(torch.cat([features, moved_self], 1))[0], a[0])


def test_mirrored_position_reads_alike_along_the_flip_axes_only():
    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_hidden=(16,), cls_pooling="tumour", coord_channels=3,
                             coord_mirror_axes=(0,)).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    coords = torch.rand(1, 3, 16, 16, 16) - 0.5
    logits = net(torch.cat([image, coords], 1))[1]
    mirrored = coords.clone()
    mirrored[:, 0] = -mirrored[:, 0]  # the tumour's mirror image across the mid-sagittal plane
    torch.testing.assert_close(net(torch.cat([image, mirrored], 1))[1], logits)
    flipped_up = coords.clone()
    flipped_up[:, 2] = -flipped_up[:, 2]  # not a flip axis: a different position
    assert not torch.allclose(net(torch.cat([image, flipped_up], 1))[1], logits)
    torch.testing.assert_close(torch.jit.script(net)(torch.cat([image, mirrored], 1))[1], logits)
    with pytest.raises(ValueError, match="coord_mirror_axes"):
        MultiTaskSegResNet(coord_channels=3, coord_mirror_axes=(3,))


def test_a_position_only_head_reads_the_tumours_place_and_not_its_features():
    torch.manual_seed(0)
    kw = {"init_filters": 8, "cls_hidden": (16,), "cls_pooling": "tumour", "coord_channels": 3}
    net = MultiTaskSegResNet(**kw, cls_inputs="position").eval()
    scripted = torch.jit.script(net)
    image = torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    coords = torch.rand(2, 3, 16, 16, 16) - 0.5
    seen = {}
    net.classifier.register_forward_pre_hook(lambda _m, args: seen.setdefault("head_input", args[0]))
    seg, logits, emb = net(torch.cat([image, coords], 1))
    weight = torch.sigmoid(seg) + net.tumour_floor
    torch.testing.assert_close(seen["head_input"], (coords * weight).sum(dim=(2, 3, 4)) / weight.sum(dim=(2, 3, 4)))
    assert emb.shape == (2, net.embedding_dim)  # retrieval's embedding is still there
    # the image moves the class only through the (detached) tumour probability: no gradient reaches it
    (grad,) = torch.autograd.grad(logits.sum(), image)
    assert float(grad.abs().sum()) == 0.0
    both = MultiTaskSegResNet(**kw).eval()
    (grad_both,) = torch.autograd.grad(both(torch.cat([image, coords], 1))[1].sum(), image)
    assert float(grad_both.abs().sum()) > 0.0
    torch.testing.assert_close(scripted(torch.cat([image, coords], 1))[1], logits)
    with pytest.raises(ValueError, match="coord_channels > 0"):
        MultiTaskSegResNet(init_filters=8, coord_channels=0, cls_inputs="position")
    MultiTaskSegResNet(init_filters=8, num_classes=0, coord_channels=0, cls_inputs="position")  # no head: nothing to read
    with pytest.raises(ValueError, match="cls_inputs"):
        MultiTaskSegResNet(init_filters=8, coord_channels=3, cls_inputs="embedding")
