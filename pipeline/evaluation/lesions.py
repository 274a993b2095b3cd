"""Lesion-wise Dice and HD95 as the BraTS challenges define them since 2023.

The definition (BraTS 2023 lesion-wise metrics, Saluja et al.; the challenges' own evaluation code):

1. Ground-truth lesions: the connected components (26-neighbourhood) of the ground truth, merged
   when they fall in one connected component of the ground truth dilated ``dilation`` times with
   the 18-neighbourhood (a satellite close to a tumour is part of it).
2. Each lesion is dilated the same way; every predicted component (26-neighbourhood) that touches
   that dilated lesion is matched to it. The lesion's Dice and HD95 are those of the lesion against
   the union of its matched components; a lesion with none (missed) scores Dice 0, HD95 374 mm.
3. Predicted components matched to no lesion are false positives: each adds a Dice of 0 and an
   HD95 of 374 mm.
4. Lesions of at most ``min_volume_mm3`` are left out of the scores (neither credited nor
   penalised); false positives count whatever their size, as in the challenge code.
5. Per case: lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false positives);
   lesion-wise HD95 likewise with 374 mm per false positive. A case with neither scores Dice 1 and
   HD95 0.

The challenge works on a 1 mm grid with ``dilation`` 3 (glioma, pediatric) and a 50 voxel
threshold; here the dilation is given in mm (``dilation_mm``, 3 mm: 3 iterations at 1 mm, 2 at
2 mm, rounded) and the threshold in mm^3 (50), so the figures keep their meaning on the 2 mm atlas
grid and in native space. Written here because the field's package (``brats-evaluation``, on
``panoptica``) now implements a different matching (maximum bipartite matching without dilation
or volume threshold, infinite HD95) and pulls some thirty dependencies; the components and
dilations are SciPy's, the HD95 is MONAI's (:mod:`pipeline.evaluation.surface`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MISSED_HD95_MM", "lesion_scores", "summarise_lesions"]

MISSED_HD95_MM = 374.0  # the challenges' penalty for a missed or spurious lesion (the SRI24 grid's diagonal)


def lesion_scores(pred: Any, truth: Any, spacing: Sequence[float], dilation_mm: float = 3.0,
                  min_volume_mm3: float = 50.0) -> dict[str, float | int]:
    """Lesion-wise Dice and HD95 of one binary mask against its ground truth (module docstring).

    Args:
        pred: predicted mask, array-like ``(H, W, D)`` (nonzero = tumour).
        truth: ground-truth mask of the same shape.
        spacing: voxel size along the three axes in mm, in the arrays' axis order.
        dilation_mm: extent of the dilation that merges and matches lesions.
        min_volume_mm3: ground-truth lesions of at most this volume are left out.

    Returns:
        ``{"lesion_dice", "lesion_hd95_mm", "lesions_tp", "lesions_fn", "lesions_fp", "lesions_ignored"}``.

    Raises:
        ValueError: the masks are not 3-D arrays of one shape.

    Example:
        >>> truth = np.zeros((40, 40, 40), bool); truth[5:15, 5:15, 5:15] = truth[25:35, 25:35, 25:35] = True
        >>> pred = np.zeros_like(truth); pred[5:15, 5:15, 5:15] = True  # the second lesion is missed
        >>> lesion_scores(pred, truth, (1.0, 1.0, 1.0))["lesion_dice"]
        0.5
    """
    from scipy import ndimage

    from pipeline.evaluation.surface import surface_scores

    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"expected two 3-D masks of one shape, got {p.shape} and {t.shape}")
    spacing = [float(s) for s in spacing]
    iterations = max(1, int(round(dilation_mm / min(spacing))))
    neighbours18, neighbours26 = ndimage.generate_binary_structure(3, 2), ndimage.generate_binary_structure(3, 3)
    voxel_mm3 = float(np.prod(spacing))

    pred_cc, n_pred = ndimage.label(p, neighbours26)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    dilated = ndimage.binary_dilation(t, neighbours18, iterations=iterations)
    groups, _ = ndimage.label(dilated, neighbours26)
    lesion_ids = np.unique(groups[t])
    boxes = ndimage.find_objects(groups)
    matched: set[int] = set()
    kept_dice: list[float] = []
    kept_hd: list[float] = []
    tp = fn = ignored = 0
    for lesion in lesion_ids:
        box = boxes[lesion - 1]  # the dilated lesion lies inside its dilated group's box
        lesion_mask = (groups[box] == lesion) & t[box]
        region = ndimage.binary_dilation(lesion_mask, neighbours18, iterations=iterations)
        hits = np.unique(pred_cc[box][region])
        hits = hits[hits > 0]
        matched.update(int(h) for h in hits)
        if float(lesion_mask.sum()) * voxel_mm3 <= min_volume_mm3:
            ignored += 1
            continue
        if hits.size == 0:
            fn += 1
            kept_dice.append(0.0)
            kept_hd.append(MISSED_HD95_MM)
            continue
        tp += 1
        full_lesion = np.zeros_like(t)
        full_lesion[box] = lesion_mask
        found = np.isin(pred_cc, hits)
        overlap = int((found & full_lesion).sum())
        kept_dice.append(2.0 * overlap / (int(pred_sizes[hits].sum()) + int(lesion_mask.sum())))
        crop = _union_box(found | full_lesion)
        hd = surface_scores(found[crop], full_lesion[crop], spacing)["hd95_mm"]
        kept_hd.append(MISSED_HD95_MM if hd is None else min(float(hd), MISSED_HD95_MM))
    fp = n_pred - len(matched)
    n = len(kept_dice) + fp
    return {
        "lesion_dice": 1.0 if n == 0 else float(sum(kept_dice)) / n,
        "lesion_hd95_mm": 0.0 if n == 0 else (float(sum(kept_hd)) + MISSED_HD95_MM * fp) / n,
        "lesions_tp": tp, "lesions_fn": fn, "lesions_fp": fp, "lesions_ignored": ignored,
    }


def _union_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (surfaces stay whole at the box's edge)."""
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + margin + 1) for i in idx)


def summarise_lesions(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Means of ``lesion_dice`` and ``lesion_hd95_mm`` and the summed lesion counts over rows."""
    scored = [r for r in rows if r.get("lesion_dice") is not None]
    return {
        "lesion_dice": float(np.mean([r["lesion_dice"] for r in scored])) if scored else None,
        "lesion_hd95_mm": float(np.mean([r["lesion_hd95_mm"] for r in scored])) if scored else None,
        **{key: int(sum(int(r.get(key) or 0) for r in scored)) for key in ("lesions_tp", "lesions_fn", "lesions_fp")},
    }
