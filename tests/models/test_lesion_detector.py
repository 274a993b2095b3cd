"""The detection head on the shared encoder: outputs, targets from masks, its loss with missing masks,
and that it learns to box bright lesions on tiny volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.detection import LesionDetector, mask_box_targets
from pipeline.models.losses import MultiTaskLoss
from pipeline.models.networks import MultiTaskSegResNet


def tiny(detect: bool = True, det_detach: bool = False) -> MultiTaskSegResNet:
    return MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1), num_classes=0,
                              detect=detect, det_levels=(2, 3), det_channels=16, det_anchors=2, det_detach=det_detach)


def lesions(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy volume with ``n`` bright boxes of 5-9 voxels per side, and their mask."""
    img = rng.normal(0, 0.3, (size,) * 3).astype(np.float32)
    mask = np.zeros((size,) * 3, np.float32)
    for _ in range(n):
        e = rng.integers(5, 10, 3)
        lo = rng.integers(1, size - e - 1)
        mask[lo[0]:lo[0] + e[0], lo[1]:lo[1] + e[1], lo[2]:lo[2] + e[2]] = 1
    img += 2.0 * mask
    return torch.from_numpy(img)[None], torch.from_numpy(mask)[None]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:3], b[:3]), np.minimum(a[3:], b[3:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    return inter / (np.prod(a[3:] - a[:3]) + np.prod(b[3:] - b[:3]) - inter)


def test_head_outputs_one_map_pair_per_level_and_is_absent_when_off():
    x = torch.zeros(2, 1, 32, 32, 32)
    out = tiny()(x)
    assert len(out) == 4 and isinstance(out[-1], list)
    shapes = [tuple(m.shape) for m in out[-1]]
    assert shapes == [(2, 2, 8, 8, 8), (2, 2, 4, 4, 4), (2, 12, 8, 8, 8), (2, 12, 4, 4, 4)]
    off = tiny(detect=False)
    assert len(off(x)) == 3 and not any(n.startswith("det_head") for n, _ in off.named_parameters())
    with pytest.raises(ValueError, match="det_levels"):
        MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), num_classes=0, detect=True,
                           det_levels=(2,))


def test_targets_are_the_lesions_of_each_mask_patch_above_the_minimum_volume():
    m = torch.zeros(2, 1, 16, 16, 16)
    m[0, 0, 1:4, 2:6, 3:8] = 1  # 60 voxels of 8 mm3: 480 mm3
    m[0, 0, 10:11, 10:11, 10:12] = 1  # 2 voxels: 16 mm3, under the minimum
    boxes = mask_box_targets(m, spacing_mm=2.0, min_volume_mm3=50.0)
    assert boxes[0].tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 8.0]]
    assert boxes[1].shape == (0, 6)


def test_detection_term_skips_samples_without_mask_and_trains_the_head():
    torch.manual_seed(0)
    net = tiny()
    rng = np.random.default_rng(0)
    pairs = [lesions(rng, 1) for _ in range(3)]
    x = torch.stack([p[0] for p in pairs])
    mask = torch.stack([p[1] for p in pairs])
    det = LesionDetector(levels=(2, 3), spacing_mm=2.0, anchor_sizes_mm=(12.0, 20.0))
    loss = MultiTaskLoss(cls_weight=0.0, det_weight=1.0, detector=det)
    out = net(x)
    has_label = torch.tensor([1, 0, 1])
    torch.manual_seed(5)  # the hard-negative sampler draws at random
    terms = loss.compute(out[0], None, mask, torch.full((3,), -1), has_label=has_label, det=out[-1])
    terms["loss"].backward()
    assert torch.isfinite(terms["det"]) and terms["det"] > 0
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("det_head"))
    # the term equals the detector's loss on the two labelled samples alone
    with torch.no_grad():
        maps = [m[[0, 2]] for m in net(x)[-1]]
        torch.manual_seed(5)
        cls_l, box_l = det.loss(maps, mask_box_targets(mask[[0, 2]], 2.0, 50.0), (32, 32, 32))
    assert float(terms["det"]) == pytest.approx(float(cls_l + box_l), rel=1e-4)
    with pytest.raises(ValueError, match="detector"):
        MultiTaskLoss(det_weight=1.0)
    # stage 3 (segmentation weight 0): no Dice term, the detection term still has the masks' boxes
    stage3 = MultiTaskLoss(cls_weight=0.0, seg_weight=0.0, det_weight=1.0, detector=det)
    torch.manual_seed(5)
    only_det = stage3.compute(out[0], None, mask, torch.full((3,), -1), has_label=has_label, det=out[-1])
    assert torch.isnan(only_det["seg"]) and float(only_det["loss"].detach()) == pytest.approx(float(terms["det"]), rel=1e-5)


def test_learns_to_box_bright_lesions():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    net = tiny()
    det = LesionDetector(levels=(2, 3), spacing_mm=2.0, anchor_sizes_mm=(12.0, 20.0))
    loss = MultiTaskLoss(cls_weight=0.0, det_weight=1.0, detector=det)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    first = last = None
    for _ in range(80):
        pairs = [lesions(rng, int(rng.integers(1, 3))) for _ in range(2)]
        x, mask = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        out = net(x)
        terms = loss.compute(out[0], None, mask, torch.full((2,), -1), det=out[-1])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = float(terms["det"]) if first is None else first
        last = float(terms["det"])
    assert last < 0.5 * first
    net.eval()
    found = 0
    for _ in range(4):
        x, mask = lesions(rng, 1)
        truth = mask_box_targets(mask[None], 2.0, 50.0)[0].numpy()[0]
        boxes, scores = det.decode(net(x[None])[-1], (32, 32, 32))[0]
        found += bool(len(boxes)) and iou(boxes[0], truth) > 0.3
    assert found >= 1  # an untrained head keeps no box (scores start at 0.01 < 0.05); 80 steps find some, not all


def test_validation_average_precision_of_the_head():
    from pipeline.evaluation.detection import DetectionAP

    mask = torch.zeros(1, 16, 16, 16)
    mask[0, 2:6, 2:6, 2:6] = 1  # 64 voxels of 8 mm3
    mask[0, 10:14, 10:14, 10:14] = 1
    truth = np.array([[2, 2, 2, 6, 6, 6], [10, 10, 10, 14, 14, 14]], float)
    metric = DetectionAP(spacing_mm=2.0)
    metric.reset()
    metric.update(([(truth, np.array([0.9, 0.8]))], [mask]))
    assert metric.compute() == pytest.approx(1.0)
    metric.reset()  # one lesion found, a false positive ranked above it: precision 1/2 at recall 1/2
    metric.update(([(np.array([[0, 0, 0, 1, 1, 1], truth[0]], float), np.array([0.9, 0.8]))], [mask]))
    assert 0.2 < metric.compute() < 0.5


@pytest.mark.slow
def test_detection_overlay_trains_evaluates_and_infers_through_the_bundle(tmp_path, monkeypatch):
    """``configs/detect.json``: training logs the detection term, evaluation scores the head's boxes
    (``det_head_*``) next to the predicted mask's (``det_*``), and folder inference lists the boxes
    in ``predictions.json`` (native space) and counts them in ``predictions.csv``."""
    import csv
    import json

    from pipeline.data.phantom.build import make_cohort
    from pipeline.data.phantom.config import PhantomConfig
    from pipeline.inference.folder import runner_from_config
    from tests.helpers import DEMO, INFER, ROOT, train_and_evaluate

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=3, spacing=6.0, space="atlas",
                           config=PhantomConfig(satellite_fraction=1.0)).datalist
    extra = {"patch_size": [32, 32, 32], "det_channels": 16, "det_levels": [1, 2]}
    _, run, overlay, trained = train_and_evaluate(tmp_path, [DEMO, "TINY", "configs/detect.json"], seed=3,
                                                  extra=extra, datalist=datalist)
    assert "loss_det" in trained
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["det_head_cases"] == metrics["det_cases"] > 0 and metrics["det_head_lesions"] == metrics["det_lesions"]
    assert 0.0 <= metrics["det_head_ap_iou0.25"] <= 1.0
    rows = list(csv.DictReader((run / "cases.csv").open()))
    assert all(r["boxes_head"] != "" for r in rows if r["boxes_true"])

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "c001.nii.gz").write_bytes((datalist.parent / "c001" / "image.nii.gz").read_bytes())
    monkeypatch.chdir(ROOT)
    # a one-epoch head's scores depend on its random draws: every candidate box is kept, so the
    # output's form is checked whatever they are
    keep_all = tmp_path / "keep_all.json"
    keep_all.write_text(json.dumps({"detector#score_thresh": 0.0}), encoding="utf-8")
    runner, cases = runner_from_config([ROOT / INFER, ROOT / DEMO, overlay, ROOT / "configs/detect.json", keep_all],
                                       ckpt=str(run / "models" / "model.pt"), input_dir=str(inputs),
                                       output_dir=str(out))
    (row,) = runner.run(cases)
    assert row["status"] == "ok", row
    doc = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    boxes = doc["cases"][0]["boxes"]
    assert boxes and all(set(b) == {"score", "voxel_min", "voxel_max", "ras_min_mm", "ras_max_mm"} for b in boxes)
    assert [b["score"] for b in boxes] == sorted((b["score"] for b in boxes), reverse=True)
    header = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert "lesions_detected" in header and "boxes" not in header


def test_a_detached_head_trains_itself_and_leaves_the_encoder_to_the_segmentation():
    rng = np.random.default_rng(3)
    pairs = [lesions(rng, 2) for _ in range(2)]
    x, mask = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    det = LesionDetector(levels=(2, 3), spacing_mm=2.0, anchor_sizes_mm=(12.0, 20.0))

    def grads(det_detach: bool, det_weight: float) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        net = tiny(det_detach=det_detach)
        loss = MultiTaskLoss(cls_weight=0.0, det_weight=det_weight, detector=det)
        out = net(x)
        torch.manual_seed(5)
        loss.compute(out[0], None, mask, torch.full((2,), -1), has_label=torch.ones(2), det=out[-1])["loss"].backward()
        return {n: p.grad for n, p in net.named_parameters()}

    seg_only, detached, attached = grads(True, 0.0), grads(True, 1.0), grads(False, 1.0)
    encoder = [n for n in seg_only if not n.startswith(("det_head", "up_", "conv_final"))]
    assert encoder and all(torch.equal(seg_only[n], detached[n]) for n in encoder)  # no detection gradient there
    assert any(not torch.allclose(seg_only[n], attached[n]) for n in encoder)  # attached, it reaches the encoder
    assert all(detached[n] is not None and detached[n].abs().sum() > 0 for n in detached if n.startswith("det_head"))
