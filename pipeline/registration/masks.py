"""Atlas registration: head and brain masks of the moving scan (morphology, or the deepbet network).

:func:`moving_brain_mask` picks the method of ``RegistrationSettings.skull_strip``; the scan is masked
with its result before registration so a skull-on scan matches the brain-only template.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.registration.settings import RegistrationSettings, deepbet_available

__all__ = ["head_mask", "brain_estimate", "deepbet_brain_mask"]

logger = logging.getLogger(__name__)


def _radius_vox(image: sitk.Image, mm: float) -> list[int]:
    """Per-axis kernel radius (voxels) for a physical radius of ``mm`` (0 along thick axes is fine)."""
    return [int(round(mm / s)) for s in image.GetSpacing()]


def grow(mask: sitk.Image, mm: float) -> sitk.Image:
    """Dilate (``mm`` > 0) or erode (``mm`` < 0) a binary mask by a physical radius."""
    if mm == 0:
        return mask
    op = sitk.BinaryDilate if mm > 0 else sitk.BinaryErode
    return op(mask, _radius_vox(mask, abs(mm)))


def _largest_component(mask: sitk.Image) -> sitk.Image:
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(labels == 1, sitk.sitkUInt8)


def _fill_holes_slicewise(mask: sitk.Image) -> sitk.Image:
    """3-D fill holes, then per axial slice (a head cut by the field of view is open at the ends)."""
    filled = sitk.BinaryFillhole(mask)
    arr = sitk.GetArrayFromImage(filled)
    from scipy.ndimage import binary_fill_holes

    for k in range(arr.shape[0]):
        arr[k] = binary_fill_holes(arr[k])
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def head_mask(image: sitk.Image) -> sitk.Image:
    """Foreground (head) of a scan: Otsu threshold, largest component, holes filled; uint8 0/1."""
    fg = sitk.OtsuThreshold(image, 0, 1)
    fg = sitk.BinaryMorphologicalOpening(fg, _radius_vox(image, 2.0))
    return _fill_holes_slicewise(_largest_component(fg))


def brain_estimate(image: sitk.Image, head: sitk.Image, erosion_mm: float = 5.0) -> sitk.Image:
    """Rough brain mask of a skull-on (or skull-off) scan by morphology; uint8 0/1.

    The head is eroded by ``erosion_mm`` (cutting the thin scalp/skull rim and the bridges
    through the dark skull), the largest remaining component is kept and dilated back, and holes
    are filled. On a skull-stripped scan it returns (nearly) the head mask itself.
    """
    eroded = sitk.BinaryErode(head, _radius_vox(head, erosion_mm))
    if not sitk.GetArrayViewFromImage(eroded).any():
        return head
    core = _largest_component(eroded)
    grown = sitk.BinaryDilate(core, _radius_vox(head, erosion_mm))
    return _fill_holes_slicewise(sitk.And(grown, head))


@lru_cache(maxsize=1)
def _deepbet_model():  # pragma: no cover - exercised when deepbet is installed
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def deepbet_brain_mask(image: sitk.Image, threads: int = 0) -> sitk.Image:
    """Brain mask of a scan (skull on or off, any orientation) by the deepbet network; uint8 0/1.

    The network's weights ship inside the ``deepbet`` wheel (nothing is downloaded); it runs on
    the CPU. Output on the image's grid.
    """
    import nibabel as nib
    import torch

    if threads:
        torch.set_num_threads(threads)
    linear = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ linear  # LPS -> RAS
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetOrigin())
    data = np.transpose(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)), (2, 1, 0))
    _, mask, _ = _deepbet_model().run(nib.Nifti1Image(data, affine))
    out = sitk.GetImageFromArray(np.transpose(np.asarray(mask.dataobj) > 0, (2, 1, 0)).astype(np.uint8))
    out.CopyInformation(image)
    return out


def _plausible_brain(mask: sitk.Image, min_ml: float = 200.0, max_ml: float = 4000.0) -> bool:
    """A brain mask whose volume is in [min_ml, max_ml] millilitres."""
    ml = float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
    return min_ml <= ml <= max_ml


def moving_brain_mask(native: sitk.Image, working: sitk.Image, head: sitk.Image,
                  settings: RegistrationSettings) -> sitk.Image:
    """Brain mask of the moving scan on the working grid, by ``settings.skull_strip``.

    deepbet runs on the native grid (its own resampling) and falls back to morphology when it
    fails or returns an implausible volume.
    """
    method = settings.skull_strip
    if method == "none":
        return head
    if method == "deepbet" or (method == "auto" and deepbet_available()):
        try:
            mask = deepbet_brain_mask(native, settings.threads)
        except ImportError:
            if method == "deepbet":
                raise InputError(None, "skull_strip='deepbet' needs the deepbet package (pip install deepbet)") from None
            mask = None
        except Exception as exc:  # the network failed on this scan: morphology instead, as documented
            logger.warning("deepbet brain extraction failed (%s): morphological brain estimate used instead",
                           str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            mask = None
        if mask is not None and _plausible_brain(mask):
            on_working = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), working, sitk.Transform(), sitk.sitkLinear)
            return sitk.And(sitk.Cast(on_working >= 0.5, sitk.sitkUInt8), head)
    return brain_estimate(working, head)
