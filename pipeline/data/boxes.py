"""Lesions of a mask as boxes: one box per connected component (26-neighbourhood) above a
minimum volume, its extent in voxel indices ``[x0, y0, z0, x1, y1, z1]`` with the upper corner
exclusive (MONAI's ``StandardMode`` ``xyzxyz``, as ``convert_mask_to_box`` writes it). Nearby
components are not merged (unlike the BraTS lesion-wise metric): a box per component is what a
detector is asked to find and a reader counts. The detection head trains on these boxes
(:mod:`pipeline.models.detection`) and the evaluation scores against them
(:mod:`pipeline.evaluation.detection`). Hand-written: SciPy's components and the bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["component_box", "lesion_boxes", "lesion_components"]


def lesion_components(mask: np.ndarray, spacing: Sequence[float], min_volume_mm3: float) -> tuple[np.ndarray, list]:
    """``(labels, [(label, slices), ...])``: the connected components (26-neighbourhood) of a 3-D
    binary mask and, for each above ``min_volume_mm3``, its label and bounding slices."""
    from scipy import ndimage

    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return labels, []
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    slices = ndimage.find_objects(labels)
    kept = [(i + 1, sl) for i, sl in enumerate(slices) if sizes[i] * voxel_mm3 > min_volume_mm3]
    return labels, kept


def component_box(sl: tuple[slice, ...]) -> list[float]:
    """A component's bounding slices as ``[x0, y0, z0, x1, y1, z1]`` (upper corner exclusive)."""
    return [float(s.start) for s in sl] + [float(s.stop) for s in sl]


def lesion_boxes(mask: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0), min_volume_mm3: float = 50.0) -> np.ndarray:
    """One box per lesion of a binary mask (module docstring).

    Args:
        mask: array-like ``(H, W, D)``, nonzero = lesion.
        spacing: voxel size in mm along the array's axes.
        min_volume_mm3: components of at most this volume give no box.

    Returns:
        ``(N, 6)`` float array, ``[x0, y0, z0, x1, y1, z1]`` voxel indices, upper corner exclusive,
        ordered by the components' first voxel.

    Example:
        >>> m = np.zeros((20, 20, 20), bool); m[2:5, 2:6, 2:7] = True
        >>> lesion_boxes(m, min_volume_mm3=0).tolist()
        [[2.0, 2.0, 2.0, 5.0, 6.0, 7.0]]
    """
    _, kept = lesion_components(np.asarray(mask) != 0, spacing, min_volume_mm3)
    return np.asarray([component_box(sl) for _, sl in kept], dtype=float).reshape(-1, 6)
