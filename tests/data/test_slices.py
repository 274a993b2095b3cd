"""2-D mode: slice sampling, slice-wise volume prediction back in place, area-weighted class,
the focal + Dice loss against a hand computation, and the 2-D overlay through the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.slices import predict_slicewise, slice_weights
from pipeline.inference.predict import PredictConfig, predict_raw
from pipeline.models.losses import MultiTaskLoss
from tests.helpers import ROOT


class SliceEcho(torch.nn.Module):
    """A '2-D network': the mask logits are the input, the class logits say which third of the
    index range the slice's value falls in."""

    spatial_dims = 2
    has_decoder = True

    def forward(self, x):
        seg = x[:, :1].clone()
        v = x[:, 0].flatten(1).mean(1)
        logits = torch.stack([-(v - 2.0) ** 2, -(v - 10.0) ** 2, -(v - 20.0) ** 2], 1)
        return seg, logits, v[:, None]


def test_slicewise_prediction_puts_every_slice_back_in_place():
    d = 23  # more than one chunk of 16
    vol = torch.arange(d, dtype=torch.float32).view(1, 1, 1, 1, d).expand(2, 1, 5, 6, d).clone()
    vol[1] = -vol[1]
    seg, logits = predict_slicewise(SliceEcho(), vol)
    assert seg.shape == (2, 1, 5, 6, d)
    torch.testing.assert_close(seg, torch.sigmoid(vol))  # slice k of the output is slice k of the input
    seg2, _ = predict_raw(SliceEcho(), vol, PredictConfig(roi_size=(5, 6, 1)))  # the bundle's path
    torch.testing.assert_close(seg2, seg)


def test_class_is_the_tumour_area_weighted_mean_of_the_slices():
    vol = torch.full((1, 1, 4, 4, 3), -20.0)
    vol[0, 0, :2, :2, 1] = 20.0  # slice 1 holds the "tumour"
    probs = torch.softmax(SliceEcho()(vol[0].permute(3, 0, 1, 2))[1], 1)
    seg = torch.sigmoid(vol[0].permute(3, 0, 1, 2))
    w = seg.flatten(1).sum(1) / seg.sum()
    _, logits = predict_slicewise(SliceEcho(), vol)
    torch.testing.assert_close(torch.softmax(logits, 1)[0], (w[:, None] * probs).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slice_weights(torch.zeros(4, 1, 2, 2)), torch.full((4,), 0.25))


class TinySliceNet(torch.nn.Module):
    """A real 2-D network (a convolution, a linear layer over the flattened slice) with no symmetry:
    neither its mask nor its class is unchanged by a flip of the slice."""

    spatial_dims = 2
    has_decoder = True

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.fc = torch.nn.Linear(size * size, 3)

    def forward(self, x):
        seg = self.conv(x)
        return seg, self.fc(torch.tanh(seg).flatten(1)), seg.flatten(1)


def test_flip_tta_in_2d_makes_the_prediction_flip_equivariant():
    """With TTA over {identity, flip of H}, predicting the flipped volume gives the flipped
    prediction (mask) and the same class; without TTA this network does not (so the check bites).
    A flip outside the training flips (``class_flip_axes``) averages the mask but not the class."""
    torch.manual_seed(0)
    net = TinySliceNet()
    vol = torch.randn(1, 1, 6, 6, 5)
    flipped = torch.flip(vol, dims=[2])
    plain = PredictConfig(roi_size=(6, 6, 1))
    seg, logits = predict_raw(net, vol, plain)
    seg_f, logits_f = predict_raw(net, flipped, plain)
    assert not torch.allclose(torch.flip(seg_f, dims=[2]), seg, atol=1e-3)
    assert not torch.allclose(logits_f, logits, atol=1e-3)
    tta = PredictConfig(roi_size=(6, 6, 1), tta_flips=[[0]], class_flip_axes=[0])
    seg, logits = predict_raw(net, vol, tta)
    seg_f, logits_f = predict_raw(net, flipped, tta)
    torch.testing.assert_close(torch.flip(seg_f, dims=[2]), seg)
    torch.testing.assert_close(logits_f, logits)
    # a depth flip only reorders slices predicted one by one: dropped, so [[2], [0, 2]] is [[0]]
    depth = PredictConfig(roi_size=(6, 6, 1), tta_flips=[[2], [0, 2]], class_flip_axes=[0, 2])
    for got, want in zip(predict_raw(net, vol, depth), (seg, logits), strict=True):
        torch.testing.assert_close(got, want)
    outside = PredictConfig(roi_size=(6, 6, 1), tta_flips=[[1]], class_flip_axes=[0])
    seg_o, logits_o = predict_raw(net, vol, outside)
    torch.testing.assert_close(logits_o, predict_raw(net, vol, plain)[1])  # the class ignores the W flip
    assert not torch.allclose(seg_o, predict_raw(net, vol, plain)[0], atol=1e-3)  # the mask does not


def test_classifier_alone_weighs_slices_by_the_true_tumour_area():
    from pipeline.training.engines import MultiTaskPrepareBatch

    class NoDecoder(SliceEcho):
        has_decoder = False

        def forward(self, x):
            return None, *super().forward(x)[1:]

    vol = torch.zeros(1, 1, 4, 4, 3)
    vol[..., 0], vol[..., 1], vol[..., 2] = 2.0, 10.0, 20.0  # each slice its own class
    mask = torch.zeros(1, 1, 4, 4, 3)
    mask[0, 0, :2, :2, 2] = 1  # the tumour is in slice 2 only
    _, logits = predict_slicewise(NoDecoder(), vol, weights_from=mask)
    assert int(logits.argmax()) == 2
    tta = PredictConfig(roi_size=(4, 4, 1), tta_flips=[[0], [2]], class_flip_axes=[0, 2])
    _, with_tta = predict_raw(NoDecoder(), vol, tta, mask=mask)  # the mask flips with the image
    torch.testing.assert_close(with_tta, logits)  # this network ignores in-plane flips
    _, uniform = predict_slicewise(NoDecoder(), vol)
    torch.testing.assert_close(torch.softmax(uniform, 1), torch.full((1, 3), 1 / 3), atol=1e-3, rtol=0)
    batch = {"image": vol, "label": mask, "class": torch.tensor([2]), "has_label": torch.tensor([0])}
    image, target, args, kwargs = MultiTaskPrepareBatch(mask_to_inferer=True)(batch)
    assert args == () and float(kwargs["mask"].sum()) == 0.0  # a case without mask hands no tumour


def test_focal_plus_dice_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 5, generator=g)
    mask = (torch.rand(3, 1, 5, 5, generator=g) > 0.6).float()
    has_label = torch.tensor([1, 0, 1])
    out = MultiTaskLoss(cls_weight=0.0, seg_loss="dice_focal").compute(logits, None, mask, torch.full((3,), -1),
                                                                      has_label)
    x, y = logits[[0, 2]].double().numpy(), mask[[0, 2]].double().numpy()
    p = 1 / (1 + np.exp(-x))
    dice = 1 - 2 * (p * y).sum() / ((p ** 2).sum() + (y ** 2).sum() + 1e-5)
    focal = -(y * (1 - p) ** 2 * np.log(p) + (1 - y) * p ** 2 * np.log(1 - p)).mean()
    assert float(out["seg"]) == pytest.approx(dice + focal, rel=1e-5)
    whole = MultiTaskLoss(cls_weight=0.0, seg_loss="dice_focal")._whole_batch(
        logits, None, mask, torch.full((3,), -1), has_label.bool(), torch.zeros(3, dtype=torch.bool))
    assert float(whole["seg"]) == pytest.approx(dice + focal, rel=1e-5)  # the multi-process form


@pytest.mark.slow
def test_slice_sampling_and_the_2d_overlay_through_the_bundle(tmp_path):
    import csv

    import nibabel as nib
    from monai.bundle import ConfigParser

    from pipeline.data.phantom.build import make_cohort
    from tests.helpers import DEMO, INFER, TINY, TRAIN, bundle, train_and_evaluate

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=5, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**TINY, "slice_size": [48, 48], "batch_size": 4, "num_samples": 2}), encoding="utf-8")
    configs = [DEMO, "configs/mtl2d.json", overlay]
    # the training chain: 2-D slices, through the tumour with the stated fraction
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in [TRAIN, *configs]])
    parser.update({"datalist": str(datalist), "output_dir": str(tmp_path / "chain"), "pos_fraction": 0.75})
    chain = parser.get_parsed_content("train#preprocessing")
    item = parser.get_parsed_content("cohort").train[0]
    chain.set_random_state(0)
    through = []
    for _ in range(60):
        for s in chain(dict(item)):
            assert s["image"].shape == (4, 48, 48) and s["label"].shape == (1, 48, 48)  # image + 3 coordinates
            through.append(bool(s["label"].sum() > 0))
    assert 0.6 <= np.mean(through) <= 0.9  # 0.75 asked (a slice at the tumour's edge may show none of it)
    _, run, _, _ = train_and_evaluate(tmp_path, configs, seed=5, datalist=datalist)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    # the inference bundle on new scans with the 2-D overlay (it once failed to parse: the overlay
    # named a key of train.json), with flip TTA, writing a mask on each scan's grid
    scans = tmp_path / "scans"
    scans.mkdir()
    for cid in ("c000", "c001"):
        (scans / f"{cid}.nii.gz").write_bytes((Path(datalist).parent / cid / "image.nii.gz").read_bytes())
    out = tmp_path / "pred"
    done = bundle(["run"], [INFER, *configs], input_dir=scans, output_dir=out, ckpt=run / "models" / "model.pt",
                  tta_flips=[[0], [1]])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for cid in ("c000", "c001"):
        seg, scan = nib.load(out / cid / "seg.nii.gz"), nib.load(scans / f"{cid}.nii.gz")
        assert seg.shape == scan.shape and np.allclose(seg.affine, scan.affine, atol=1e-4)
    # the 2-D classifier alone: trained, decided on validation and evaluated with the masks' slices
    _, alone, _, trained = train_and_evaluate(tmp_path, [DEMO, "configs/cls2d.json", overlay], seed=5,
                                              datalist=datalist, name="alone")
    assert "[decide]" in trained
    assert "balanced_accuracy" in json.loads((alone / "metrics.json").read_text(encoding="utf-8"))


def test_crop_size_and_training_chain_order():
    from pipeline.data.slices import crop_size, training_chain

    assert crop_size([64, 64, 48]) == [64, 64, 48]
    assert crop_size([64, 64, 48], 2, [96, 80]) == [96, 80, 1]
    with pytest.raises(ValueError, match="slice_size"):
        crop_size([64, 64, 48], 2, None)
    chain = training_chain(["load"], ["crop"], ["aug"], 3, ["coords"])
    assert chain == ["load", "crop", "aug", "coords"]
    flat = training_chain(["load"], ["crop"], [], 2, ["coords"])
    assert flat[:2] == ["load", "crop"] and flat[-1] == "coords" and type(flat[2]).__name__ == "SqueezeDimd"
