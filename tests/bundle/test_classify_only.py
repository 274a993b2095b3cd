"""The classifier alone (experiment arm ``cls``): no decoder built or run, loss and prediction cope,
and the validation history the experiment reads its best epoch from."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine

from pipeline.inference.predict import PredictConfig, predict_raw
from pipeline.models.losses import MultiTaskLoss
from pipeline.models.networks import MultiTaskSegResNet
from pipeline.training.history import ValidationHistory, best_validation

KW = {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1), "cls_hidden": (8,), "num_classes": 3}


def test_network_without_decoder_has_no_decoder_weights_and_returns_no_mask():
    full = MultiTaskSegResNet(**KW)
    alone = MultiTaskSegResNet(**KW, decoder=False)
    n_full = sum(p.numel() for p in full.parameters())
    n_alone = sum(p.numel() for p in alone.parameters())
    n_decoder = sum(p.numel() for m in (full.up_layers, full.up_samples, full.conv_final) for p in m.parameters())
    assert n_alone == n_full - n_decoder > 0
    seg, logits, emb = alone(torch.randn(2, 1, 16, 16, 16))
    assert seg is None and logits.shape == (2, 3) and emb.shape == (2, 32)
    with pytest.raises(ValueError, match="classifier alone"):
        MultiTaskSegResNet(**KW, decoder=False, cls_pooling="tumour")


def test_loss_without_mask_output_is_the_weighted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    cls = torch.tensor([0, 2, -1, 1])
    w = [1.0, 2.0, 0.5]
    out = MultiTaskLoss(cls_weight=1.0, class_weights=w).compute(None, logits, torch.zeros(4, 1, 2, 2, 2), cls)
    keep = cls >= 0
    ref = torch.nn.functional.cross_entropy(logits[keep], cls[keep], weight=torch.tensor(w))
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()))
    assert int(out["n_seg"]) == 0 and torch.isnan(out["seg"])
    out["loss"].backward()
    assert logits.grad is not None


def test_prediction_of_the_classifier_alone_reads_the_whole_volume():
    torch.manual_seed(0)
    net = MultiTaskSegResNet(**KW, decoder=False).eval()
    image = torch.randn(1, 1, 20, 18, 16)  # not a multiple of 4: padded to 20 x 20 x 16
    seg, logits = predict_raw(net, image, PredictConfig(roi_size=(8, 8, 8), classify="patch"))
    assert seg is None
    padded = torch.nn.functional.pad(image, (0, 0, 1, 1, 0, 0))  # SpatialPad centres the padding
    with torch.no_grad():
        assert torch.allclose(logits, net(padded)[1], atol=1e-5)


def _validate(handler: ValidationHistory, epoch: int, dice: float) -> None:
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.metrics = {"val_mean_dice": dice, "val_auc": float("nan")}
    handler(engine)


def test_validation_history_keeps_the_best_epoch_across_a_resume(tmp_path):
    path = tmp_path / "validation.json"
    h = ValidationHistory(path, "val_mean_dice")
    for epoch, dice in ((2, 0.5), (4, 0.8), (6, 0.7)):
        _validate(h, epoch, dice)
    best = best_validation(path)
    assert (best["epoch"], best["val_mean_dice"], best["n_validations"]) == (4, 0.8, 3)
    # a run resumed from the epoch-4 checkpoint validates epoch 6 again: the old entry is replaced
    _validate(ValidationHistory(path, "val_mean_dice"), 6, 0.9)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert [h["epoch"] for h in doc["history"]] == [2, 4, 6]
    assert best_validation(path)["epoch"] == 6
    assert doc["history"][0]["val_auc"] is None or "val_auc" not in doc["history"][0]
    assert best_validation(tmp_path / "absent.json") is None


def test_whole_volume_patch_is_the_atlas_grid_rounded_up():
    from pipeline.registration.atlas import grid_patch_size, load_atlas

    size = load_atlas(None, None, 2.0).size
    patch = grid_patch_size(None, None, 2.0, 8)
    assert all(p % 8 == 0 and 0 <= p - s < 8 for p, s in zip(patch, size, strict=True))


@pytest.mark.slow
def test_classifier_alone_on_the_tumour_patch_trains_and_evaluates_on_that_patch(tmp_path):
    """``configs/classify_patch.json``: validation items are one training-size patch around the true
    tumour (not the whole brain, as for ``cls``); training and evaluation run through the bundle."""
    from monai.bundle import ConfigParser

    from pipeline.data.phantom.build import make_cohort
    from tests.helpers import DEMO, ROOT, TINY, TRAIN, train_and_evaluate

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=7, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in [TRAIN, DEMO, overlay, "configs/classify_patch.json"]])
    parser.update({"datalist": str(datalist), "output_dir": str(tmp_path / "chain")})
    item = parser.get_parsed_content("validate#preprocessing")(dict(parser.get_parsed_content("cohort").val[0]))
    assert tuple(item["image"].shape[1:]) == tuple(TINY["patch_size"])
    label = item["label"][0].numpy()
    assert label.sum() > 0  # the case's tumour is inside its evaluation patch
    _, run, _, trained = train_and_evaluate(tmp_path, [DEMO, "TINY", "configs/classify_patch.json"], seed=7,
                                            datalist=datalist)
    assert "loss_seg" not in trained
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics.get("dice") is None
