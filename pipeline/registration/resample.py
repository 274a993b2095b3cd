"""Atlas registration: resampling native images and masks onto the atlas grid and back."""

from __future__ import annotations

import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.registration.atlas import Atlas

__all__ = ["resample_image_to_atlas", "resample_mask_to_atlas", "map_to_native"]

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}


def resample_image_to_atlas(moving: sitk.Image, transform: sitk.Transform, atlas: Atlas,
                            interpolator: str = "linear") -> sitk.Image:
    """Resample a native image onto the atlas grid; float32; outside the scan 0, or the scan's
    minimum where that is negative.

    A scan's background is 0 in scanner counts but negative in a z-scored copy: padding with it
    keeps the atlas-grid image an affine function of the input's intensities, so the padding
    never passes for tissue (:class:`~pipeline.data.transforms.BrainNormalised`).

    Args:
        interpolator: ``"linear"`` or ``"bspline"`` (cubic; may overshoot slightly).
    """
    if interpolator not in ("linear", "bspline"):
        raise InputError(None, f"image interpolator must be 'linear' or 'bspline', got {interpolator!r}")
    image = sitk.Cast(moving, sitk.sitkFloat32)
    background = min(0.0, float(sitk.GetArrayViewFromImage(image).min()))
    return sitk.Resample(image, atlas.image, transform, _INTERPOLATORS[interpolator], background, sitk.sitkFloat32)


def resample_mask_to_atlas(mask: sitk.Image, transform: sitk.Transform, atlas: Atlas, mode: str = "linear") -> sitk.Image:
    """Resample a native binary mask (any label > 0) onto the atlas grid; uint8 0/1.

    Args:
        mode: ``"nearest"`` (nearest neighbour) or ``"linear"`` (linear interpolation of the 0/1
            mask, then >= 0.5: smoother, with no staircase from thick slices).
    """
    if mode not in ("nearest", "linear"):
        raise InputError(None, f"mask mode must be 'nearest' or 'linear', got {mode!r}")
    binary = sitk.Cast(mask > 0, sitk.sitkFloat32)
    out = sitk.Resample(binary, atlas.image, transform, _INTERPOLATORS[mode], 0.0, sitk.sitkFloat32)
    return sitk.Cast(out >= 0.5, sitk.sitkUInt8)


def map_to_native(atlas_image: sitk.Image, transform: sitk.Transform, native_reference: sitk.Image,
                  is_mask: bool = True) -> sitk.Image:
    """Bring an atlas-grid mask or probability map back onto the native grid, exactly.

    Args:
        atlas_image: image on the atlas grid (mask: any value > 0 is foreground).
        transform: the case's atlas -> native transform (as returned by :func:`register_to_atlas`).
        native_reference: the native image; the output has its size, spacing, origin, direction.
        is_mask: ``True``: binary uint8 0/1 (linear interpolation of the 0/1 mask then >= 0.5, so
            thick native slices are not stair-cased); ``False``: float32 map, linear.

    Returns:
        The image on the native grid.
    """
    inverse = transform.GetInverse()
    ref = sitk.Image(native_reference.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(native_reference)
    if is_mask:
        binary = sitk.Cast(atlas_image > 0, sitk.sitkFloat32)
        out = sitk.Resample(binary, ref, inverse, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out = sitk.Cast(out >= 0.5, sitk.sitkUInt8)
    else:
        out = sitk.Resample(sitk.Cast(atlas_image, sitk.sitkFloat32), ref, inverse, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out.CopyInformation(native_reference)
    return out
