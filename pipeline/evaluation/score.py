"""Score an inference run against ground truth in each scan's own (native) space.

``python -m pipeline score --predictions OUT --datalist DATALIST [--split SPLIT --part test]``
reads ``OUT/<id>/seg.nii.gz`` and ``OUT/predictions.csv`` (written by the inference bundle) and
compares them with the datalist's native masks and classes: per-case Dice, HD95, surface Dice and
the BraTS lesion-wise Dice and HD95 on the native grid, their means, accuracy and balanced accuracy,
and how the predicted mask's components find the true lesions as boxes (``det_ap_iou0.25`` and the
rest of :func:`pipeline.evaluation.detection.detection_scores`; scored by their mean probability
when the run wrote ``prob.nii.gz``). Writes ``OUT/score.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.data.boxes import lesion_boxes
from pipeline.data.datalist import load_datalist
from pipeline.data.splits import load_splits
from pipeline.evaluation.detection import detection_scores, mask_detections
from pipeline.evaluation.lesions import lesion_scores, summarise_lesions
from pipeline.evaluation.surface import summarise_surface, surface_scores
from pipeline.io.errors import InputError
from pipeline.io.imageio import read_mask, write_text_atomic

__all__ = ["score_predictions", "dice", "main"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def score_predictions(pred_dir: str | Path, datalist: str | Path, ids: list[str] | None = None) -> dict:
    """Native-space Dice and class accuracy of an inference output folder.

    Args:
        pred_dir: inference output (``<id>/seg.nii.gz``, ``predictions.csv``).
        datalist: the cases' ground truth (native image, mask, class).
        ids: only these case ids (default: every datalist case found in the predictions).

    Returns:
        ``{"cases": [...], "dice": mean, "accuracy": ..., "balanced_accuracy": ..., "n": ...}``.
    """
    pred_dir = Path(pred_dir)
    dl = load_datalist(datalist)
    report = pred_dir / "predictions.csv"
    if not report.is_file():
        raise InputError(report, "no predictions.csv: run the inference bundle first")
    rows = {r["id"]: r for r in csv.DictReader(report.open(encoding="utf-8", newline=""))}
    cases, detections, truths = [], [], []
    for case in dl.cases:
        if (ids is not None and case.id not in ids) or case.id not in rows:
            continue
        row = rows[case.id]
        entry: dict = {"id": case.id, "status": row.get("status", "")}
        seg_path = pred_dir / case.id / "seg.nii.gz"
        if entry["status"] != "ok":  # a failed case has no prediction to score; counted apart
            cases.append(entry)
            continue
        if case.label is not None and seg_path.is_file():
            truth = read_mask(case.label)
            pred = read_mask(seg_path, reference=truth, reference_path=case.label)  # same grid, or an error
            p_arr, t_arr = sitk.GetArrayViewFromImage(pred) > 0, sitk.GetArrayViewFromImage(truth) > 0
            entry["dice"] = dice(p_arr, t_arr)
            entry.update(surface_scores(p_arr, t_arr, truth.GetSpacing()[::-1]))  # arrays are (z, y, x)
            entry.update(lesion_scores(p_arr, t_arr, truth.GetSpacing()[::-1]))
            prob_path = pred_dir / case.id / "prob.nii.gz"
            prob = (sitk.GetArrayViewFromImage(sitk.ReadImage(str(prob_path))) if prob_path.is_file() else None)
            truths.append(lesion_boxes(t_arr, truth.GetSpacing()[::-1]))
            detections.append(mask_detections(p_arr, prob, truth.GetSpacing()[::-1]))
            entry["boxes_true"], entry["boxes_pred"] = len(truths[-1]), len(detections[-1][0])
        if case.cls is not None and row.get("predicted_class"):
            entry["true_class"] = dl.classes[case.cls]
            entry["predicted_class"] = row["predicted_class"]
        cases.append(entry)
    if not cases:
        wanted = [c.id for c in dl.cases if ids is None or c.id in ids]
        raise InputError(report, f"none of the {len(wanted)} datalist case id(s) asked for ({', '.join(wanted[:5])}"
                                 f"{' ...' if len(wanted) > 5 else ''}) is in this report (its ids: "
                                 f"{', '.join(list(rows)[:5])}{' ...' if len(rows) > 5 else ''}): another run's "
                                 "predictions or another datalist?")
    dices = [c["dice"] for c in cases if "dice" in c]
    surface = summarise_surface([c for c in cases if "dice" in c])
    classified = [c for c in cases if "true_class" in c]
    recalls = []
    for name in dl.classes:
        of_class = [c for c in classified if c["true_class"] == name]
        if of_class:
            recalls.append(np.mean([c["predicted_class"] == name for c in of_class]))
    return {
        "n": len(cases),
        "n_failed": sum(c["status"] != "ok" for c in cases),
        "dice": float(np.mean(dices)) if dices else None,
        "dice_std": float(np.std(dices)) if dices else None,
        **surface,
        **summarise_lesions([c for c in cases if "dice" in c]),
        **({f"det_{k}": v for k, v in detection_scores(detections, truths).items()} if truths else {}),
        "accuracy": float(np.mean([c["predicted_class"] == c["true_class"] for c in classified])) if classified else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline score", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="inference output folder")
    p.add_argument("--datalist", required=True, help="datalist with the native ground truth")
    p.add_argument("--split", help="split file to take the case ids from")
    p.add_argument("--part", default="test", help="part of the split (default test)")
    a = p.parse_args(argv)
    ids = None
    if a.split:
        split = load_splits(a.split)[0]
        if a.part not in split:
            raise InputError(a.split, f"no part {a.part!r} in the split; parts: {[k for k in split if k != 'name']}")
        ids = split[a.part]
    s = score_predictions(a.predictions, a.datalist, ids)
    write_text_atomic(Path(a.predictions) / "score.json", json.dumps(s, indent=1))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    failed = f" ({s['n_failed']} failed, not scored)" if s["n_failed"] else ""
    print(f"native space, {s['n']} cases{failed}: Dice {fmt(s['dice'])} (sd {fmt(s['dice_std'])}), "
          f"HD95 {fmt(s['hd95_mm'])} mm, surface Dice {fmt(s['surface_dice'])} (1 mm), lesion-wise Dice "
          f"{fmt(s['lesion_dice'])} and HD95 {fmt(s['lesion_hd95_mm'])} mm, "
          f"mask components as boxes: AP {fmt(s.get('det_ap_iou0.25'))} (IoU 0.25), lesion sensitivity "
          f"{fmt(s.get('det_sensitivity_fp1'))} at 1 false positive per case, "
          f"accuracy {fmt(s['accuracy'])}, balanced accuracy {fmt(s['balanced_accuracy'])}")
    return 0
