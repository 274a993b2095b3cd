"""Atlas registration: working images (smoothed, resampled to the working spacing, intensity-normalised)."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from pipeline.registration.atlas import Atlas

__all__ = ["normalise_working", "working_fixed", "working_moving"]


def normalise_working(image: sitk.Image, mask: sitk.Image, percentiles: tuple[float, float]) -> sitk.Image:
    """Clip to percentiles of the voxels inside ``mask`` and rescale to [0, 1]."""
    arr = sitk.GetArrayViewFromImage(image)
    inside = arr[sitk.GetArrayViewFromImage(mask) > 0]
    lo, hi = np.percentile(inside if inside.size else arr, percentiles)
    hi = hi if hi > lo else lo + 1.0
    out = sitk.Clamp(image, sitk.sitkFloat32, float(lo), float(hi))
    return sitk.ShiftScale(out, -float(lo), 1.0 / float(hi - lo))


def working_moving(image: sitk.Image, spacing: float) -> sitk.Image:
    """The scan smoothed and resampled (same direction and extent) to voxels no finer than ``spacing`` mm."""
    old = np.array(image.GetSpacing())
    new = np.maximum(old, spacing)
    if np.allclose(new, old):
        return image
    size = [max(2, int(round(n * o / s))) for n, o, s in zip(image.GetSize(), old, new, strict=True)]
    sigma = [0.5 * math.sqrt(max(s**2 - o**2, 0.0)) for o, s in zip(old, new, strict=True)]
    smooth = sitk.SmoothingRecursiveGaussian(image, [max(v, 1e-3) for v in sigma])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    first = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    origin = first + direction @ (new / 2.0)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), new.tolist(),
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def working_fixed(atlas: Atlas, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """Atlas image (normalised) and brain mask on a grid no finer than ``spacing`` mm."""
    image = normalise_working(atlas.image, atlas.brain_mask, (0.0, 99.5))
    mask = atlas.brain_mask
    if min(image.GetSpacing()) < spacing - 1e-6:
        size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
        sigma = [0.5 * math.sqrt(max(spacing**2 - s**2, 0.0)) for s in image.GetSpacing()]
        smooth = sitk.SmoothingRecursiveGaussian(image, sigma)
        ref = sitk.Image(size, sitk.sitkFloat32)
        ref.SetSpacing([spacing] * 3)
        ref.SetDirection(image.GetDirection())
        ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([(spacing / s - 1) / 2 for s in image.GetSpacing()]))
        image = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
        mask = sitk.Cast(sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear) >= 0.5,
                         sitk.sitkUInt8)
    return image, mask
