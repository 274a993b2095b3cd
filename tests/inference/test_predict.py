"""Whole-volume prediction: tumour-centred classification patch, sliding window, shapes."""

from __future__ import annotations

import pytest
import torch

from pipeline.inference.predict import PredictConfig, crop_patch, predict_volume, tumour_patch_center
from pipeline.models.networks import MultiTaskSegResNet


def test_tumour_center_and_fallback():
    prob = torch.zeros(1, 20, 20, 20)
    prob[0, 4:8, 10:14, 15:19] = 0.9
    centre = tumour_patch_center(prob)
    assert all(abs(c - t) <= 0.5 for c, t in zip(centre, (5.5, 11.5, 16.5), strict=True))  # centre of mass
    prob = torch.zeros(1, 20, 20, 20)
    prob[0, 3, 4, 5] = 0.2  # nothing above threshold: the most probable voxel
    assert tumour_patch_center(prob) == [3, 4, 5]


def test_crop_patch_stays_inside_and_pads():
    img = torch.arange(20 * 20 * 20, dtype=torch.float32).view(1, 20, 20, 20)
    patch = crop_patch(img, [1, 19, 10], [8, 8, 8])
    assert patch.shape == (1, 8, 8, 8)
    torch.testing.assert_close(patch, img[:, 0:8, 12:20, 6:14])  # shifted to stay inside the image
    small = crop_patch(torch.ones(1, 6, 20, 20), [3, 10, 10], [8, 8, 8])
    assert small.shape == (1, 8, 8, 8) and small.sum() == 6 * 8 * 8  # zero-padded where too small


@pytest.mark.parametrize("classify", ["patch", "whole"])
def test_predict_volume_shapes_and_probabilities(classify):
    torch.manual_seed(0)
    net = MultiTaskSegResNet(num_classes=3, init_filters=8, cls_hidden=(8,)).eval()
    x = torch.randn(2, 1, 30, 26, 20)
    seg, cls = predict_volume(net, x, PredictConfig(roi_size=(16, 16, 16), sw_batch_size=4, classify=classify))
    assert seg.shape == (2, 1, 30, 26, 20) and seg.min() >= 0 and seg.max() <= 1
    assert cls.shape == (2, 3)
    torch.testing.assert_close(cls.sum(1), torch.ones(2))


def test_patch_classification_is_the_network_on_the_centred_patch():
    torch.manual_seed(0)
    net = MultiTaskSegResNet(num_classes=3, init_filters=8, cls_hidden=(8,)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    cfg = PredictConfig(roi_size=(16, 16, 16))
    seg, cls = predict_volume(net, x, cfg)
    centre = tumour_patch_center(seg[0], cfg.threshold)
    with torch.no_grad():
        expected = torch.softmax(net(crop_patch(x[0], centre, (16, 16, 16))[None])[1], 1)
    torch.testing.assert_close(cls, expected)


def test_single_task_network_has_no_class_output():
    net = MultiTaskSegResNet(num_classes=0, init_filters=8).eval()
    seg, cls = predict_volume(net, torch.randn(1, 1, 16, 16, 16), PredictConfig(roi_size=(16, 16, 16)))
    assert seg.shape == (1, 1, 16, 16, 16) and cls is None


def test_keep_largest_component_zeroes_smaller_blobs():
    from pipeline.inference.predict import keep_largest_component

    prob = torch.full((1, 1, 20, 20, 20), 0.1)
    prob[0, 0, 2:8, 2:8, 2:8] = 0.9  # 216 voxels: kept
    prob[0, 0, 14:16, 14:16, 14:16] = 0.8  # 8 voxels: removed
    out = keep_largest_component(prob, 0.5)
    assert (out >= 0.5).sum() == 216 and out[0, 0, 15, 15, 15] == 0
    assert out[0, 0, 10, 10, 10] == pytest.approx(0.1)  # sub-threshold probabilities untouched
