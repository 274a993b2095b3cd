"""Brain atlases: the default MNI152 2009 template (shipped inside nilearn) and user atlases.

The atlas grid *is* the training and inference grid: every scan is registered onto it, and the
network sees volumes of exactly ``atlas.image.GetSize()`` voxels (x, y, z in SimpleITK order).

Geometry convention: images are ``SimpleITK`` images with ITK/LPS physical coordinates, exactly
as ``sitk.ReadImage`` gives them for the same NIfTI file (a NIfTI RAS affine ``A`` becomes
``direction = diag(-1, -1, 1) @ A[:3, :3] / spacing`` and ``origin = diag(-1, -1, 1) @ A[:3, 3]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.io.imageio import read_mask, read_volume

__all__ = ["Atlas", "load_atlas", "derive_brain_mask", "nifti_to_sitk", "same_grid"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Atlas:
    """A registration target: a template image and its brain mask on one grid.

    Attributes:
        image: float32 template; its grid (size, spacing, origin, direction) is the target grid.
        brain_mask: uint8 0/1 brain mask on the same grid.
        name: short name used in file names and cache keys (e.g. ``"mni152_2009_2mm"``).
    """

    image: sitk.Image
    brain_mask: sitk.Image
    name: str

    def fingerprint(self) -> str:
        """Stable hex digest (16 chars) of the grid and the voxel content of image and mask."""
        h = hashlib.sha256()
        for img in (self.image, self.brain_mask):
            geometry = (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
            h.update(repr(tuple(tuple(round(v, 6) for v in g) for g in geometry)).encode())
            h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(img)).tobytes())
        return h.hexdigest()[:16]

    @property
    def size(self) -> tuple[int, int, int]:
        """Grid size (x, y, z)."""
        return tuple(self.image.GetSize())  # type: ignore[return-value]


def nifti_to_sitk(data: np.ndarray, affine: np.ndarray, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """Build a SimpleITK image from a nibabel-style array (x, y, z) and its RAS affine (4 x 4).

    The result has the same physical (LPS) geometry as ``sitk.ReadImage`` of that NIfTI file.
    """
    linear = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = _RAS_TO_LPS @ (linear / spacing)
    origin = _RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, 3]
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    img = sitk.Cast(img, pixel_type)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    return img


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(1.0, float(np.max(np.abs(a.GetOrigin())))))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def derive_brain_mask(image: sitk.Image) -> sitk.Image:
    """Brain mask of a skull-stripped template: Otsu foreground, largest component, holes filled.

    Meant for user atlases given without a mask (templates such as SRI24 are brain-only, so
    the foreground is the brain). Returns uint8 0/1 on the image grid.
    """
    fg = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True) == 1
    filled = sitk.BinaryFillhole(sitk.Cast(largest, sitk.sitkUInt8))
    out = sitk.Cast(filled > 0, sitk.sitkUInt8)
    out.CopyInformation(image)
    return out


def _resample_to_spacing(image: sitk.Image, spacing: float, interpolator: int) -> sitk.Image:
    """Resample onto a grid of isotropic ``spacing`` covering the same field of view."""
    old_size = np.array(image.GetSize())
    old_spacing = np.array(image.GetSpacing())
    new_size = [max(1, int(round(n))) for n in old_size * old_spacing / spacing]
    # keep the field-of-view centre fixed
    centre = image.TransformContinuousIndexToPhysicalPoint(((old_size - 1) / 2.0).tolist())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(centre) - direction @ ((np.array(new_size) - 1) / 2.0 * spacing)
    return sitk.Resample(image, new_size, sitk.Transform(), interpolator, origin.tolist(),
                         [float(spacing)] * 3, image.GetDirection(), 0.0, image.GetPixelID())


@lru_cache(maxsize=4)
def _mni152(spacing: float) -> Atlas:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    resolution = 1 if spacing < 2 else 2  # nilearn ships 1 mm and 2 mm grids
    template = load_mni152_template(resolution=resolution)
    mask = load_mni152_brain_mask(resolution=resolution)
    image = nifti_to_sitk(np.asarray(template.get_fdata(), dtype=np.float32), template.affine)
    brain = nifti_to_sitk((np.asarray(mask.get_fdata()) > 0).astype(np.uint8), mask.affine, sitk.sitkUInt8)
    if float(spacing) != float(resolution):
        image = _resample_to_spacing(image, spacing, sitk.sitkLinear)
        brain = sitk.Cast(_resample_to_spacing(sitk.Cast(brain, sitk.sitkFloat32), spacing, sitk.sitkLinear) >= 0.5,
                          sitk.sitkUInt8)
    return Atlas(image=image, brain_mask=brain, name=f"mni152_2009_{spacing:g}mm")


@lru_cache(maxsize=4)
def _user_atlas(path: str, mask: str | None, spacing: float | None) -> Atlas:
    image = read_volume(path)
    brain = derive_brain_mask(image) if mask is None else read_mask(mask, image, path)
    name = Path(path).name.removesuffix(".gz").removesuffix(".nii")
    if spacing is not None:
        image = _resample_to_spacing(image, spacing, sitk.sitkLinear)
        brain = sitk.Cast(_resample_to_spacing(sitk.Cast(brain, sitk.sitkFloat32), spacing, sitk.sitkLinear) >= 0.5,
                          sitk.sitkUInt8)
        name = f"{name}_{spacing:g}mm"
    return Atlas(image=image, brain_mask=brain, name=name)


def load_atlas(path: str | Path | None = None, mask: str | Path | None = None,
               spacing: float | None = None) -> Atlas:
    """Load the registration target (cached in-process: repeated calls return the same object).

    Args:
        path: template NIfTI of a user atlas (e.g. SRI24, 240 x 240 x 155 at 1 mm); ``None`` for
            the MNI152 2009 template that ships inside nilearn (1 mm grid 197 x 233 x 189,
            2 mm grid 99 x 117 x 95).
        mask: brain mask of a user atlas (any value > 0 is brain). Without it the mask is derived
            from the template by :func:`derive_brain_mask` (Otsu threshold, largest component,
            holes filled), which assumes a skull-stripped template. Ignored for MNI152.
        spacing: isotropic grid spacing in mm. MNI152: 1 or 2 use nilearn's own grids, other
            values resample the nearest of them (default 2 mm). User atlas: ``None`` keeps the
            file's grid, a value resamples it over the same field of view.

    Returns:
        The :class:`Atlas`.

    Raises:
        InputError: unreadable atlas or mask, mask on another grid, spacing not positive.
    """
    if spacing is not None and not spacing > 0:
        raise InputError(None, f"atlas spacing must be > 0 mm, got {spacing}")
    if path is None:
        return _mni152(float(spacing or 2.0))
    return _user_atlas(str(path), None if mask is None else str(mask), None if spacing is None else float(spacing))


def grid_patch_size(path: str | Path | None = None, mask: str | Path | None = None, spacing: float | None = None,
                    multiple: int = 8) -> list[int]:
    """The atlas grid size (x, y, z, the array order of MONAI's loaders) rounded up to a multiple of
    ``multiple``: a "patch" that is the whole registered volume, for a network that reads the whole
    brain (the classifier alone, ``configs/classify_only.json``). ``multiple`` is the network's
    total down-sampling, ``2 ** (len(blocks_down) - 1)``."""
    size = load_atlas(path, mask, spacing).size
    return [int(-(-s // multiple) * multiple) for s in size]
