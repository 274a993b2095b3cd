"""HD95 and normalised surface Dice (:mod:`pipeline.evaluation.surface`): hand-made cases, and the five
real algorithm segmentations of TCGA-FG-6692 against their consensus, checked with medpy's own
surface distances (an independent implementation; skipped when the data or medpy is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.surface import summarise_surface, surface_scores

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real" / "TCGA-FG-6692" / "sri24"


def ball(shape: tuple[int, int, int], radius: float, centre: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.indices(shape)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius ** 2


def test_a_shifted_mask_is_its_shift_away():
    """A box moved by 3 voxels along an axis of spacing 2 mm: the surface points that move furthest
    are 6 mm from the other surface; with a 1 mm tolerance only the unshifted faces agree."""
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=0)
    s = surface_scores(a, b, spacing=(2.0, 1.0, 1.0), tolerance_mm=1.0)
    assert s["hd95_mm"] == pytest.approx(6.0, abs=1e-6)
    assert 0.0 < s["surface_dice"] < 1.0
    wide = surface_scores(a, b, spacing=(2.0, 1.0, 1.0), tolerance_mm=6.0)
    assert wide["surface_dice"] == pytest.approx(1.0)
    same = surface_scores(a, a, spacing=(2.0, 1.0, 1.0))
    assert same == {"hd95_mm": 0.0, "surface_dice": 1.0}


def test_concentric_balls_and_empty_masks():
    small, big = ball((40, 40, 40), 8, (20, 20, 20)), ball((40, 40, 40), 12, (20, 20, 20))
    s = surface_scores(small, big, spacing=(1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert 3.0 <= s["hd95_mm"] <= 5.0  # the radii differ by 4 voxels
    assert s["surface_dice"] < 0.1
    empty = np.zeros_like(small)
    assert surface_scores(empty, empty, (1, 1, 1)) == {"hd95_mm": 0.0, "surface_dice": 1.0}
    assert surface_scores(empty, small, (1, 1, 1)) == {"hd95_mm": None, "surface_dice": 0.0}
    summary = summarise_surface([s, surface_scores(empty, small, (1, 1, 1))])
    assert summary["hd95_mm"] == pytest.approx(s["hd95_mm"]) and summary["n_hd95_undefined"] == 1
    assert summary["surface_dice"] == pytest.approx(s["surface_dice"] / 2)


@pytest.mark.real
def test_real_algorithm_segmentations_agree_with_medpy():
    if not (REAL / "seg_consensus.nii.gz").is_file():
        pytest.skip("../shared/data/real is absent")
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    import nibabel as nib

    surface_distances = getattr(medpy_binary, "__surface_distances")  # medpy's per-voxel distances
    truth_img = nib.load(REAL / "seg_consensus.nii.gz")
    truth = np.asarray(truth_img.dataobj) > 0
    spacing = truth_img.header.get_zooms()[:3]
    files = sorted((REAL / "seg_by_algorithm").glob("*.nii.gz"))
    assert len(files) == 5
    for f in files:
        pred = np.asarray(nib.load(f).dataobj) > 0
        ours = surface_scores(pred, truth, spacing, tolerance_mm=1.0)
        a, b = surface_distances(pred, truth, spacing, 1), surface_distances(truth, pred, spacing, 1)
        hd95 = max(np.percentile(a, 95), np.percentile(b, 95))
        nsd = ((a <= 1.0).sum() + (b <= 1.0).sum()) / (len(a) + len(b))
        assert ours["hd95_mm"] == pytest.approx(hd95, abs=0.1), f.name
        assert ours["surface_dice"] == pytest.approx(nsd, abs=0.01), f.name


def test_score_reports_surface_metrics_in_native_space(tmp_path):
    """``pipeline score``: a prediction equal to the truth scores Dice 1, HD95 0 mm, surface Dice 1;
    one shifted by a voxel along the slice axis is that slice spacing away."""
    import csv
    import shutil

    import nibabel as nib

    from pipeline.data.phantom.build import make_cohort
    from pipeline.evaluation.score import score_predictions

    datalist = make_cohort(tmp_path / "cohort", cases=2, seed=1, spacing=6.0, space="atlas").datalist
    pred = tmp_path / "pred"
    rows = []
    for cid, shift in (("c000", 0), ("c001", 1)):
        (pred / cid).mkdir(parents=True)
        truth = nib.load(tmp_path / "cohort" / cid / "mask.nii.gz")
        data = np.roll(np.asarray(truth.dataobj) > 0, shift, axis=2).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, truth.affine, truth.header), pred / cid / "seg.nii.gz")
        rows.append({"id": cid, "status": "ok", "predicted_class": ""})
    with (pred / "predictions.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "status", "predicted_class"])
        w.writeheader()
        w.writerows(rows)
    s = score_predictions(pred, datalist)
    by = {c["id"]: c for c in s["cases"]}
    assert by["c000"]["dice"] == 1.0 and by["c000"]["hd95_mm"] == 0.0 and by["c000"]["surface_dice"] == 1.0
    assert by["c001"]["hd95_mm"] == pytest.approx(6.0)  # one 6 mm voxel along the third axis
    assert s["hd95_mm"] == pytest.approx(3.0) and s["n_hd95_undefined"] == 0
    # the mask's components as boxes: the exact copy finds its lesions box for box, the shifted one
    # still overlaps each of them (no probabilities written: every box scores 1)
    assert by["c000"]["boxes_pred"] == by["c000"]["boxes_true"] >= 1
    assert s["det_ar_iou0.10"] == pytest.approx(1.0) and s["det_lesions"] == sum(c["boxes_true"] for c in s["cases"])
    shutil.rmtree(pred)
