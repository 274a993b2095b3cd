"""The field's boundary metrics beside Dice: 95th-percentile Hausdorff distance and normalised
surface Dice, in millimetres, from MONAI's implementations.

Definitions (MONAI's, those of the BraTS challenges' surface-distance code):

- ``hd95_mm``: the larger of the two directed 95th percentiles of the distances from each mask's
  surface voxels to the other mask's surface (``compute_hausdorff_distance(percentile=95)``);
- ``surface_dice``: the fraction of both surfaces lying within ``tolerance_mm`` of the other
  surface (``compute_surface_dice``, voxel surfaces; Nikolov et al. 2021), 1 mm by default.

Surfaces are the mask voxels removed by one binary erosion with the 6-neighbourhood; distances are
Euclidean, with the voxel spacing. Empty masks: both empty gives ``hd95_mm`` 0 and ``surface_dice``
1 (nothing to find, nothing found); exactly one empty gives ``hd95_mm`` undefined (``None``,
counted apart in the summaries; the challenges substitute a large constant instead) and
``surface_dice`` 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["surface_scores", "summarise_surface"]


def surface_scores(pred: Any, truth: Any, spacing: Sequence[float], tolerance_mm: float = 1.0) -> dict[str, float | None]:
    """HD95 (mm) and normalised surface Dice of one binary mask against its ground truth.

    Args:
        pred: predicted mask, any array-like of shape ``(H, W, D)`` (nonzero = tumour).
        truth: ground-truth mask of the same shape.
        spacing: voxel size along the three axes, in mm, in the arrays' axis order.
        tolerance_mm: the surface Dice's tolerance.

    Returns:
        ``{"hd95_mm": float | None, "surface_dice": float}``.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.as_tensor(np.asarray(pred) > 0)
    t = torch.as_tensor(np.asarray(truth) > 0)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"expected two 3-D masks of one shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if not p.any() and not t.any():
        return {"hd95_mm": 0.0, "surface_dice": 1.0}
    if not p.any() or not t.any():
        return {"hd95_mm": None, "surface_dice": 0.0}
    spacing = [float(s) for s in spacing]
    y_pred, y = p[None, None].float(), t[None, None].float()
    hd = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing).item())
    nsd = float(compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=True,
                                     spacing=spacing).item())
    return {"hd95_mm": round(hd, 4), "surface_dice": round(nsd, 6)}


def summarise_surface(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Means of ``hd95_mm`` (over the cases where it is defined) and ``surface_dice`` over rows."""
    hd = [r["hd95_mm"] for r in rows if r.get("hd95_mm") is not None and not _nan(r["hd95_mm"])]
    nsd = [r["surface_dice"] for r in rows if r.get("surface_dice") is not None and not _nan(r["surface_dice"])]
    return {"hd95_mm": float(np.mean(hd)) if hd else None,
            "surface_dice": float(np.mean(nsd)) if nsd else None,
            "n_hd95_undefined": sum(1 for r in rows if "surface_dice" in r and r.get("hd95_mm") is None)}


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
