"""Synthetic cohort (phantom): MNI152 tissue maps, brain mask and tumour-centre candidates on the atlas grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.data.phantom.cues import region_masks
from pipeline.io.errors import InputError

__all__ = ["Anatomy", "load_anatomy"]

RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Anatomy:
    """MNI152 tissue maps on the atlas grid; arrays in SimpleITK (z, y, x) order.

    Attributes:
        grid: the atlas template (float32); its geometry is the atlas grid.
        name: atlas name (``mni152_2009_<spacing>mm``).
        spacing: isotropic grid spacing in mm.
        gm, wm, csf: tissue fractions in [0, 1].
        brain: brain mask (the atlas brain mask).
        outside_mm: distance (mm) outside a smoothed brain hull, 0 inside (for the skull shell).
        centres: per region, (n, 3) voxel indices (z, y, x) where a tumour centre may lie.
        centre_lps: brain centroid (LPS mm), the pose's centre of rotation.
    """

    grid: sitk.Image
    name: str
    spacing: float
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    outside_mm: np.ndarray
    centres: dict[str, np.ndarray] = field(repr=False)
    centre_lps: np.ndarray = field(repr=False)


def voxel_lps(grid: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """Physical LPS points (n, 3) of voxel indices (n, 3) given in (z, y, x) order."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    xyz = zyx[:, ::-1].astype(float) * np.asarray(grid.GetSpacing())
    return np.asarray(grid.GetOrigin()) + xyz @ direction.T


def _tissue_on_grid(grid: sitk.Image, spacing: float) -> list[np.ndarray]:
    """nilearn's GM and WM maps on ``grid``: the native 1 / 2 mm files, else resampled 1 mm ones."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    from pipeline.registration.atlas import nifti_to_sitk, same_grid

    resolution = int(spacing) if spacing in (1.0, 2.0) else 1
    maps = []
    for loader in (load_mni152_gm_template, load_mni152_wm_template):
        nii = loader(resolution=resolution)
        img = nifti_to_sitk(np.asarray(nii.get_fdata(), dtype=np.float32), nii.affine)
        if not same_grid(img, grid):
            if spacing > resolution:  # anti-alias before going coarser
                img = sitk.SmoothingRecursiveGaussian(img, 0.4 * spacing)
            img = sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        maps.append(np.clip(sitk.GetArrayFromImage(img), 0.0, 1.0))
    return maps


@lru_cache(maxsize=2)
def load_anatomy(spacing: float = 2.0, min_depth_mm: float = 10.0) -> Anatomy:
    """Tissue maps, brain mask, skull distance and tumour-centre candidates on the atlas grid.

    The grid is :func:`pipeline.registration.atlas.load_atlas` ``(spacing=spacing)`` (cached per process).

    Args:
        spacing: atlas grid spacing in mm.
        min_depth_mm: minimum depth of tumour centres inside the brain mask.

    Returns:
        The :class:`Anatomy`.

    Raises:
        InputError: when a region has no candidate centre (spacing far too coarse).
    """
    from pipeline.registration.atlas import load_atlas

    atlas = load_atlas(spacing=spacing)
    grid = sitk.Cast(atlas.image, sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(atlas.brain_mask) > 0
    gm, wm = _tissue_on_grid(grid, spacing)
    gm, wm = gm * brain, wm * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    hull = ndimage.gaussian_filter(brain.astype(np.float32), 4.0 / spacing) > 0.3
    outside = ndimage.distance_transform_edt(~hull, sampling=spacing).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    idx = np.indices(brain.shape).reshape(3, -1).T
    ras = (voxel_lps(grid, idx) * RAS_FROM_LPS).T.reshape(3, *brain.shape)
    deep = brain & (depth >= min_depth_mm)
    centres = {name: np.argwhere(deep & m) for name, m in region_masks((ras[0], ras[1], ras[2])).items()}
    empty = [name for name, c in centres.items() if len(c) == 0]
    if empty:
        raise InputError(None, f"spacing {spacing} mm leaves no tumour centre in region(s) {empty}")
    centre_lps = voxel_lps(grid, np.argwhere(brain)).mean(axis=0)
    arrays = [gm.astype(np.float32), wm.astype(np.float32), csf, brain, outside, centre_lps, *centres.values()]
    for arr in arrays:  # shared by every case (cached): make accidental in-place edits fail loudly
        arr.flags.writeable = False
    return Anatomy(grid=grid, name=atlas.name, spacing=float(spacing), gm=arrays[0], wm=arrays[1], csf=csf,
                   brain=brain, outside_mm=outside, centres=centres, centre_lps=centre_lps)
