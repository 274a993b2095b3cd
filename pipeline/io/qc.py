"""Quality-control pictures: three orthogonal slices with a mask outline, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from pipeline.io.imageio import atomic_write  # noqa: E402

__all__ = ["save_orthogonal_slices", "mask_center_index"]


def mask_center_index(mask: sitk.Image) -> tuple[int, int, int] | None:
    """Voxel index (x, y, z, SimpleITK order) of a mask's centre of mass, or ``None`` if empty."""
    arr = sitk.GetArrayViewFromImage(mask) > 0
    if not arr.any():
        return None
    zyx = np.argwhere(arr).mean(axis=0).round().astype(int)
    return int(zyx[2]), int(zyx[1]), int(zyx[0])


def _to_ras_display(img: sitk.Image) -> sitk.Image:
    """Reorient to a canonical orientation so every picture is shown the same way up."""
    return sitk.DICOMOrient(img, "LPS")


def save_orthogonal_slices(
    image: sitk.Image,
    path: str | Path,
    outline: sitk.Image | None = None,
    center_index: tuple[int, int, int] | None = None,
    title: str = "",
    boxes: sitk.Image | None = None,
) -> Path:
    """Save axial, coronal and sagittal slices of ``image`` with ``outline``'s contour in red.

    Args:
        image: 3-D scalar image (any orientation; shown in the radiological convention, the
            patient's right on the picture's left, with R/L and A/P marked, at the physical
            aspect ratio so thick slices look thick).
        path: PNG file to write (through a temporary file, then renamed).
        outline: optional mask on the same grid as ``image``; its boundary is drawn.
        center_index: voxel index (x, y, z) in ``image`` where the three planes cross;
            default: the outline's centre of mass, else the image centre.
        title: text above the panels.
        boxes: optional mask on the same grid holding detected boxes; drawn dashed in cyan.

    Returns:
        The written path.
    """
    if center_index is None and outline is not None:
        center_index = mask_center_index(outline)
    if center_index is None:
        center_index = tuple(s // 2 for s in image.GetSize())
    center_pt = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in center_index])

    img = _to_ras_display(sitk.Cast(image, sitk.sitkFloat32))
    arr = sitk.GetArrayFromImage(img)  # z, y, x in LPS order
    c = img.TransformPhysicalPointToIndex(center_pt)
    cx, cy, cz = (int(np.clip(v, 0, s - 1)) for v, s in zip(c, img.GetSize(), strict=True))
    sx, sy, sz = img.GetSpacing()
    mask_arr = None
    if outline is not None:
        mimg = _to_ras_display(sitk.Cast(outline > 0, sitk.sitkUInt8))
        mask_arr = sitk.GetArrayFromImage(mimg)
    box_arr = None
    if boxes is not None:
        box_arr = sitk.GetArrayFromImage(_to_ras_display(sitk.Cast(boxes > 0, sitk.sitkUInt8)))

    lo, hi = np.percentile(arr, [1, 99.5]) if arr.size else (0, 1)
    # Radiological convention, as clinical viewers show it. The LPS array's x index runs from the
    # patient's right to left, y from anterior to posterior, z from inferior to superior; imshow
    # draws row 0 at the top and column 0 at the left.
    planes = [  # (name, slice of the z, y, x array, aspect, label at the left edge, at the right edge)
        ("axial", lambda a: a[cz, :, :], sy / sx, "R", "L"),         # anterior at top, patient right on the left
        ("coronal", lambda a: a[::-1, cy, :], sz / sx, "R", "L"),    # superior at top
        ("sagittal", lambda a: a[::-1, :, cx], sz / sy, "A", "P"),   # superior at top, anterior on the left
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (name, take, aspect, left, right) in zip(axes, planes, strict=True):
        ax.imshow(take(arr), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if mask_arr is not None:
            m = take(mask_arr)
            if m.any():
                ax.contour(m, levels=[0.5], colors="red", linewidths=1.0)
        if box_arr is not None:
            m = take(box_arr)
            if m.any():
                ax.contour(m, levels=[0.5], colors="cyan", linewidths=1.0, linestyles="dashed")
        ax.set_title(name, color="white", fontsize=9)
        for x, text, ha in ((0.01, left, "left"), (0.99, right, "right")):
            ax.text(x, 0.5, text, color="yellow", fontsize=9, ha=ha, va="center", transform=ax.transAxes)
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, facecolor="black", format="png"), ".png")
    finally:
        plt.close(fig)
