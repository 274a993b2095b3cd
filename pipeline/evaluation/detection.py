"""Lesions as boxes: ground-truth boxes from a mask, the boxes of a predicted mask, and how well
boxes with scores find the lesions (COCO-style average precision and recall, lesion sensitivity at
a number of false positives per case).

- A **lesion** is a connected component (26-neighbourhood) of the mask above ``min_volume_mm3``;
  its box is the component's extent in voxel indices, ``[x0, y0, z0, x1, y1, z1]`` with the upper
  corner exclusive (MONAI's ``StandardMode`` ``xyzxyz``, as ``convert_mask_to_box`` writes it).
  Unlike the BraTS lesion-wise metric (:mod:`pipeline.evaluation.lesions`), nearby components are
  not merged: a box per component is what a detector is asked to find and a reader counts.
- **Mask-derived detections**, the baseline any segmentation already gives: the components of the
  predicted mask, each scored by its mean tumour probability (a large confident lesion
  ranks above a faint speck; the maximum would rank every component touching a confident voxel 1).
- **Scores**: the detections of every case are matched to that case's lesions by MONAI's COCO
  matching (``matching_batch``: greedy by score, a lesion taken once, duplicates count as false
  positives) and summarised by MONAI's ``COCOMetric`` (AP and AR per IoU threshold, 101-point
  interpolated); the lesion sensitivity at ``k`` false positives per case is MONAI's FROC
  (``compute_froc_curve_data`` / ``compute_froc_score``, CAMELYON's interpolation) at the loosest
  IoU threshold. Hand-written here: only the components (SciPy) and the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric

from pipeline.data.boxes import component_box, lesion_boxes, lesion_components

__all__ = ["IOU_THRESHOLDS", "DetectionAP", "detection_scores", "labelled_boxes", "mask_detections"]

IOU_THRESHOLDS = (0.1, 0.25, 0.5)


def mask_detections(mask: Any, prob: Any = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    min_volume_mm3: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and scores of the components of a predicted mask (the baseline detections).

    Args:
        mask: the predicted binary mask ``(H, W, D)``.
        prob: the tumour probability on the same grid; each component scores its mean probability.
            Without it every component scores 1 (the ranking is then arbitrary: AP reads the
            precision at the mask's own operating point).
        spacing, min_volume_mm3: as :func:`pipeline.data.boxes.lesion_boxes` (0: every component, as a reader sees it).

    Returns:
        ``(boxes (N, 6), scores (N,))``, boxes as :func:`pipeline.data.boxes.lesion_boxes`.

    Raises:
        ValueError: ``prob`` and ``mask`` differ in shape.
    """
    mask = np.asarray(mask) != 0
    labels, kept = lesion_components(mask, spacing, min_volume_mm3)
    boxes = np.asarray([component_box(sl) for _, sl in kept], dtype=float).reshape(-1, 6)
    if prob is None:
        return boxes, np.ones(len(kept))
    prob = np.asarray(prob, dtype=float)
    if prob.shape != mask.shape:
        raise ValueError(f"probability map of shape {prob.shape} for a mask of shape {mask.shape}")
    scores = np.asarray([float(prob[sl][labels[sl] == lab].mean()) for lab, sl in kept], dtype=float)
    return boxes, scores


def detection_scores(detections: Sequence[tuple[Any, Any]], truths: Sequence[Any],
                     iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                     fp_per_case: Sequence[float] = (1.0,)) -> dict[str, float]:
    """Average precision and recall per IoU threshold and lesion sensitivity per false-positive rate.

    Args:
        detections: per case, ``(boxes (D, 6), scores (D,))``.
        truths: per case, the lesions' boxes ``(G, 6)`` (:func:`pipeline.data.boxes.lesion_boxes`); the same order.
        iou_thresholds: IoU at which a detection finds a lesion (each gets ``ap_iou<t>`` and
            ``ar_iou<t>``; the loosest also decides the sensitivity).
        fp_per_case: false positives per case at which the sensitivity is read
            (``sensitivity_fp<k>``).

    Returns:
        ``{"ap_iou0.10": ..., "ar_iou0.10": ..., ..., "sensitivity_fp1": ..., "lesions": G, "detections": D,
        "cases": n}``; AP, AR and sensitivity are ``nan`` when no case has a lesion.

    Raises:
        ValueError: ``detections`` and ``truths`` differ in length, or a box array is not ``(N, 6)``.
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} cases of detections for {len(truths)} cases of lesions")
    pred_boxes = [np.asarray(b, dtype=float).reshape(-1, 6) for b, _ in detections]
    pred_scores = [np.asarray(s, dtype=float).reshape(-1) for _, s in detections]
    gt_boxes = [np.asarray(b, dtype=float).reshape(-1, 6) for b in truths]
    for boxes, scores in zip(pred_boxes, pred_scores, strict=True):
        if len(boxes) != len(scores):
            raise ValueError(f"{len(boxes)} boxes with {len(scores)} scores")
    n_lesions = int(sum(len(b) for b in gt_boxes))
    out: dict[str, float] = {"lesions": n_lesions, "detections": int(sum(len(b) for b in pred_boxes)),
                             "cases": len(gt_boxes)}
    thresholds = sorted(float(t) for t in iou_thresholds)
    if n_lesions == 0:
        out.update({f"{k}_iou{t:.2f}": float("nan") for t in thresholds for k in ("ap", "ar")})
        out.update({f"sensitivity_fp{k:g}": float("nan") for k in fp_per_case})
        return out
    # COCOMetric evaluates every threshold of iou_range plus iou_list; a range of one point keeps it to ours
    metric = COCOMetric(classes=["lesion"], iou_list=thresholds, iou_range=(thresholds[0], thresholds[0], 1.0),
                        max_detection=(max(100, max(len(b) for b in pred_boxes)),), verbose=False)
    zeros = [np.zeros(len(b), dtype=int) for b in pred_boxes]
    matches = matching_batch(box_iou, metric.iou_thresholds, pred_boxes, zeros, pred_scores, gt_boxes,
                             [np.zeros(len(b), dtype=int) for b in gt_boxes], max_detections=metric.max_detections[-1])
    values, _ = metric(matches)
    for t in thresholds:
        out[f"ap_iou{t:.2f}"] = float(_pick(values, "AP", t))
        out[f"ar_iou{t:.2f}"] = float(_pick(values, "AR", t))
    loose = int(np.argmin(np.abs(np.asarray(metric.iou_thresholds) - thresholds[0])))
    tp, fp = [], []
    for case in matches:
        for result in case.values():
            hit = result["dtMatches"][loose].astype(bool)
            tp.extend(result["dtScores"][hit])
            fp.extend(result["dtScores"][~hit])
    for k in fp_per_case:
        if not tp and not fp:
            out[f"sensitivity_fp{k:g}"] = 0.0
            continue
        # MONAI's (CAMELYON's) curve skips its lowest threshold (there a missed target's 0 score):
        # a score below every detection's keeps the lowest-scored detection on the curve
        fps, sens = compute_froc_curve_data(np.asarray([*fp, -np.inf], dtype=float), np.asarray(tp, dtype=float),
                                            n_lesions, len(gt_boxes))
        out[f"sensitivity_fp{k:g}"] = float(compute_froc_score(fps, sens, eval_thresholds=(float(k),)))
    return out


def labelled_boxes(output: dict) -> tuple[list, list]:
    """Output transform for :class:`DetectionAP`: the detection head's ``(boxes, scores)`` and the
    mask ``(1, H, W, D)`` of each case that has a mask (none when the network does not detect)."""
    boxes = output["pred"].get("boxes")
    if boxes is None:
        return [], []
    target = output["label"]
    keep = [b for b in range(len(boxes)) if int(target["has_label"][b])]
    return [boxes[b] for b in keep], [target["label"][b].detach().cpu() for b in keep]


class DetectionAP(Metric):
    """The detection head's average precision at an IoU threshold over the validation cases (Ignite
    metric, :func:`pipeline.evaluation.detection.detection_scores`), each case's lesions the
    components of its mask above ``min_volume_mm3`` on the atlas grid of ``spacing_mm``: the key
    metric of a stage that trains the detection alone (``configs/stage3_det_recon.json``). ``nan``
    when no case has a lesion. Under a process group every rank's cases are gathered first."""

    def __init__(self, spacing_mm: float, iou: float = 0.25, min_volume_mm3: float = 50.0,
                 output_transform: Callable = labelled_boxes, device: str | torch.device = "cpu") -> None:
        self.spacing = (float(spacing_mm),) * 3
        self.iou = float(iou)
        self.min_volume_mm3 = float(min_volume_mm3)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._iterations: list[list[tuple[Any, Any]]] = []

    def update(self, output: tuple[list, list]) -> None:
        self._iterations.append([(found, lesion_boxes(mask[0].numpy() > 0, self.spacing, self.min_volume_mm3))
                                 for found, mask in zip(*output, strict=True)])

    def compute(self) -> float:
        from pipeline.runtime import distributed

        cases = [c for part in distributed.gather_in_sampler_order(self._iterations) for c in part]
        if not cases:
            return float("nan")
        scores = detection_scores([d for d, _ in cases], [t for _, t in cases], iou_thresholds=(self.iou,))
        return scores[f"ap_iou{self.iou:.2f}"]


def _pick(values: dict[str, float], kind: str, iou: float) -> float:
    key = f"{kind}_IoU_{iou:.2f}_MaxDet_"
    found = [v for k, v in values.items() if k.startswith(key)]
    if not found:
        raise KeyError(f"COCOMetric gave no {key}*")
    return found[0]
