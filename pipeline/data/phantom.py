"""Synthetic pLGG cohort built from real anatomy: the MNI152 2009 template shipped inside nilearn.

``python -m pipeline phantom --out DIR --cases N --seed S`` writes, per case ``DIR/<id>/``:

- ``image.nii.gz``: FLAIR-like float32 volume (WM darker than GM, CSF dark, optional skull/scalp
  shell, one hyperintense tumour, sometimes with a dark cyst), bias field, Rician noise and an
  arbitrary intensity scale. ``--space native`` (default) also applies a random pose, thick slices
  along a random axis and varied orientation codes (some oblique); ``--space atlas`` writes the
  case on the atlas grid directly.
- ``mask.nii.gz``: uint8 whole-tumour mask on the image grid (``mask_truth.nii.gz`` instead when the
  case's label is left out of the datalist, so it is not used by mistake).
- ``to_atlas.tfm``: the true ITK ``AffineTransform`` mapping atlas physical points (LPS) to native
  physical points: ``sitk.Resample(native_image, atlas_grid, T)`` brings the case onto the atlas.
- ``truth.json``: class, region, appearance, pose, slice thickness, orientation, skull, volumes.

and ``DIR/datalist.json`` (decathlon style, written last) with a ``"phantom"`` block holding the
settings, the priors and the Bayes-optimal class accuracy they allow.

How cases are drawn. Classes are balanced: a seeded shuffle of round-robin labels 0, 1, 2, 0, ...
(so class frequencies are n_c / N, each within one case of N / 3). Given the class, the tumour
centre's region is drawn from a discrete prior over :data:`REGIONS` (defined on MNI RAS mm in
:func:`region_of`) and its appearance (solid / cystic) from a weaker discrete prior; both are the
only class cues, so :func:`bayes_accuracy` is the exact ceiling of any classifier. The anatomy
and tumour come from a per-case random stream, the acquisition (pose, slices, orientation,
bias, noise, scale) from a second one, so ``--space atlas`` and ``--space native`` runs with the
same seed and case count hold the very same tumours. Left-out labels / classes and skulls are
exact counts (``round(fraction * N)`` cases), chosen by a seeded shuffle.

Every case is built on the atlas grid at ``--spacing`` (the grid of
:func:`pipeline.atlas.load_atlas`), then resampled onto its native grid through the inverse of
the true transform, so image, mask and ``to_atlas.tfm`` agree by construction. The anatomy is
the same template for every case (the pose is the only geometric difference), so registration
error can be measured exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.imageio import write_image_atomic, write_text_atomic
from pipeline.registration import write_transform_atomic

__all__ = [
    "CLASSES",
    "REGIONS",
    "APPEARANCES",
    "ORIENTATIONS",
    "PhantomConfig",
    "CohortSummary",
    "Cues",
    "Anatomy",
    "bayes_accuracy",
    "balanced_classes",
    "sample_cues",
    "region_of",
    "load_anatomy",
    "make_cohort",
    "main",
]

CLASSES: tuple[str, ...] = ("BRAF V600E", "BRAF fusion", "other")
REGIONS: tuple[str, ...] = ("hemispheric", "infratentorial", "midline")
APPEARANCES: tuple[str, ...] = ("solid", "cystic")
#: Orientation codes of native grids (NIfTI/nibabel convention: axis i, j, k point to these).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LAS", "LPS", "RSA", "ASR")
SPACES: tuple[str, ...] = ("native", "atlas")
SPACING_RANGE_MM: tuple[float, float] = (0.5, 8.0)

_LPS_OF_LETTER = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
_RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class PhantomConfig:
    """The generator's knobs (priors, tumour size, pose and acquisition ranges).

    Attributes:
        region_prior: P(region | class), one row per class in :data:`CLASSES`, columns in
            :data:`REGIONS` order. Default: each class 0.7 on its typical region (V600E
            hemispheric, fusion infratentorial, other midline).
        appearance_prior: P(appearance | class), columns in :data:`APPEARANCES` order (solid,
            cystic); fusion tumours (pilocytic-like) are mostly cystic.
        skull_fraction: fraction of cases with a skull/scalp shell (the others look skull-stripped).
        volume_ml: tumour volume range in mL, drawn log-uniformly.
        min_depth_mm: tumour centres lie at least this deep inside the brain mask.
        max_rotation_deg: pose rotation, uniform in +-this about each axis.
        max_translation_mm: pose translation, uniform in +-this along each axis.
        scale_range: isotropic pose scale range.
        thickness_mm: slice thickness range (never below the in-plane spacing).
        oblique_fraction: fraction of native grids whose direction matrix is tilted (oblique).
        max_oblique_deg: tilt of oblique grids, uniform in +-this about each axis.
        intensity_scale: range of the arbitrary intensity scale, drawn log-uniformly.
        noise_sigma: Rician noise sigma range, relative to grey matter (1.0).
        bias_strength: std of the log bias-field polynomial coefficients.
        margin_mm: margin of the native field of view around the head.
    """

    region_prior: tuple[tuple[float, ...], ...] = ((0.8, 0.05, 0.15), (0.05, 0.8, 0.15), (0.1, 0.1, 0.8))
    appearance_prior: tuple[tuple[float, ...], ...] = ((0.75, 0.25), (0.3, 0.7), (0.85, 0.15))
    skull_fraction: float = 0.5
    volume_ml: tuple[float, float] = (10.0, 60.0)
    min_depth_mm: float = 10.0
    max_rotation_deg: float = 15.0
    max_translation_mm: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    thickness_mm: tuple[float, float] = (1.0, 6.0)
    oblique_fraction: float = 0.3
    max_oblique_deg: float = 20.0
    intensity_scale: tuple[float, float] = (50.0, 3000.0)
    noise_sigma: tuple[float, float] = (0.02, 0.05)
    bias_strength: float = 0.08
    margin_mm: float = 10.0

    def __post_init__(self) -> None:
        _check_prior(self.region_prior, len(REGIONS), "region_prior")
        _check_prior(self.appearance_prior, len(APPEARANCES), "appearance_prior")
        _check_fraction(self.skull_fraction, "skull fraction")
        _check_fraction(self.oblique_fraction, "oblique fraction")
        for name in ("volume_ml", "scale_range", "thickness_mm", "intensity_scale", "noise_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise InputError(None, f"{name} must be a range 0 < low <= high, got ({lo}, {hi})")


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`make_cohort` wrote.

    Attributes:
        datalist: path of ``datalist.json``.
        cases: number of cases.
        bayes_accuracy: Bayes-optimal class accuracy of the priors at this cohort's class frequencies.
        class_counts: cases per class name (ground truth, including cases whose class is left out).
        region_counts: cases per region.
        labelled: cases whose mask is referenced as ``label`` in the datalist.
        classified: cases whose ``class`` is in the datalist.
        seconds: wall time.
    """

    datalist: Path
    cases: int
    bayes_accuracy: float
    class_counts: dict[str, int]
    region_counts: dict[str, int]
    labelled: int
    classified: int
    seconds: float


@dataclass(frozen=True)
class Cues:
    """The discrete class cues of a set of cases (index arrays of equal length)."""

    classes: np.ndarray
    regions: np.ndarray
    appearances: np.ndarray


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(None, f"{name} must be in [0, 1], got {value}")


def _check_prior(prior: Sequence[Sequence[float]], n_cols: int, name: str) -> None:
    arr = np.asarray(prior, dtype=float)
    if arr.shape != (len(CLASSES), n_cols) or np.any(arr < 0) or not np.allclose(arr.sum(1), 1.0):
        raise InputError(None, f"{name} must be {len(CLASSES)} rows of {n_cols} probabilities summing to 1")


# ----------------------------------------------------------------------------- class cues


def bayes_accuracy(region_prior: Sequence[Sequence[float]], appearance_prior: Sequence[Sequence[float]],
                   class_freq: Sequence[float] | None = None) -> float:
    """Exact accuracy of the Bayes-optimal classifier that sees the region and appearance cues.

    ``sum over (region, appearance) of max_c P(c) P(region | c) P(appearance | c)``; the cues are
    independent given the class and are the only class information in a phantom case.

    Args:
        region_prior: P(region | class), shape (C, R).
        appearance_prior: P(appearance | class), shape (C, A).
        class_freq: P(class), shape (C,); uniform when ``None``.

    Returns:
        The accuracy in [0, 1].
    """
    reg = np.asarray(region_prior, dtype=float)
    app = np.asarray(appearance_prior, dtype=float)
    pc = np.full(len(reg), 1.0 / len(reg)) if class_freq is None else np.asarray(class_freq, dtype=float)
    joint = pc[:, None, None] * reg[:, :, None] * app[:, None, :]  # (C, R, A)
    return float(joint.max(axis=0).sum() / pc.sum())


def balanced_classes(n: int, rng: np.random.Generator, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Seeded shuffle of round-robin labels: every class within one case of ``n / n_classes``."""
    return rng.permutation(np.resize(np.arange(n_classes), n))


def _draw_rows(prior: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per entry of ``rows`` from ``prior[rows]`` (vectorised)."""
    cdf = np.cumsum(prior[rows], axis=1)
    return np.minimum((rng.random(len(rows))[:, None] >= cdf).sum(axis=1), prior.shape[1] - 1)


def sample_cues(n: int, rng: np.random.Generator, config: PhantomConfig | None = None) -> Cues:
    """Draw classes (balanced), then region and appearance given the class: the generator's sampler.

    Args:
        n: number of cases.
        rng: random generator (the cohort stream in :func:`make_cohort`).
        config: priors; defaults to ``PhantomConfig()``.

    Returns:
        :class:`Cues` with integer arrays of length ``n``.
    """
    cfg = config or PhantomConfig()
    classes = balanced_classes(n, rng)
    regions = _draw_rows(np.asarray(cfg.region_prior), classes, rng)
    appearances = _draw_rows(np.asarray(cfg.appearance_prior), classes, rng)
    return Cues(classes=classes, regions=regions, appearances=appearances)


def region_of(ras_mm: Sequence[float]) -> str | None:
    """The region of an MNI point (RAS mm), or ``None`` outside all three.

    - ``infratentorial`` (cerebellum): z < -25 and y < -40;
    - ``midline`` (thalamus, hypothalamus, optic chiasm, third ventricle): |x| < 12,
      -35 < y < 10, -15 < z < 20;
    - ``hemispheric`` (supratentorial lobar): |x| > 20 and z > 5.

    Tumour centres are also required to lie ``min_depth_mm`` inside the brain mask.
    """
    x, y, z = (float(v) for v in ras_mm)
    if z < -25 and y < -40:
        return "infratentorial"
    if abs(x) < 12 and -35 < y < 10 and -15 < z < 20:
        return "midline"
    if abs(x) > 20 and z > 5:
        return "hemispheric"
    return None


def _region_masks(ras: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Vectorised :func:`region_of` over coordinate arrays (keep the two in step)."""
    x, y, z = ras
    return {
        "infratentorial": (z < -25) & (y < -40),
        "midline": (np.abs(x) < 12) & (y > -35) & (y < 10) & (z > -15) & (z < 20),
        "hemispheric": (np.abs(x) > 20) & (z > 5),
    }


# ----------------------------------------------------------------------------- anatomy


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


def _voxel_lps(grid: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """Physical LPS points (n, 3) of voxel indices (n, 3) given in (z, y, x) order."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    xyz = zyx[:, ::-1].astype(float) * np.asarray(grid.GetSpacing())
    return np.asarray(grid.GetOrigin()) + xyz @ direction.T


def _tissue_on_grid(grid: sitk.Image, spacing: float) -> list[np.ndarray]:
    """nilearn's GM and WM maps on ``grid``: the native 1 / 2 mm files, else resampled 1 mm ones."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    from pipeline.atlas import nifti_to_sitk, same_grid

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

    The grid is :func:`pipeline.atlas.load_atlas` ``(spacing=spacing)`` (cached per process).

    Args:
        spacing: atlas grid spacing in mm.
        min_depth_mm: minimum depth of tumour centres inside the brain mask.

    Returns:
        The :class:`Anatomy`.

    Raises:
        InputError: when a region has no candidate centre (spacing far too coarse).
    """
    from pipeline.atlas import load_atlas

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
    ras = (_voxel_lps(grid, idx) * _RAS_FROM_LPS).T.reshape(3, *brain.shape)
    deep = brain & (depth >= min_depth_mm)
    centres = {name: np.argwhere(deep & m) for name, m in _region_masks((ras[0], ras[1], ras[2])).items()}
    empty = [name for name, c in centres.items() if len(c) == 0]
    if empty:
        raise InputError(None, f"spacing {spacing} mm leaves no tumour centre in region(s) {empty}")
    centre_lps = _voxel_lps(grid, np.argwhere(brain)).mean(axis=0)
    arrays = [gm.astype(np.float32), wm.astype(np.float32), csf, brain, outside, centre_lps, *centres.values()]
    for arr in arrays:  # shared by every case (cached): make accidental in-place edits fail loudly
        arr.flags.writeable = False
    return Anatomy(grid=grid, name=atlas.name, spacing=float(spacing), gm=arrays[0], wm=arrays[1], csf=csf,
                   brain=brain, outside_mm=outside, centres=centres, centre_lps=centre_lps)


# ----------------------------------------------------------------------------- tumour


@dataclass(frozen=True)
class Tumour:
    """A tumour in a box of the atlas grid: ``box`` slices (z, y, x) and boolean masks inside it."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray
    cyst: np.ndarray
    centre_zyx: tuple[int, int, int]
    target_ml: float


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to zero mean and unit std."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return (field_ - field_.mean()) / (field_.std() + 1e-8)


def _ellipsoid_norm(shape: tuple[int, ...], centre_vox: np.ndarray, spacing: float, radii: np.ndarray,
                    rot: np.ndarray) -> np.ndarray:
    """Ellipsoidal radius (1 on the surface) of every voxel of a box."""
    d = (np.indices(shape).reshape(3, -1).T - centre_vox) * spacing
    return np.sqrt((((d @ rot) / radii) ** 2).sum(axis=1)).reshape(shape)


def _box_around(centre: np.ndarray, half: int, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def make_tumour(anat: Anatomy, region: str, cystic: bool, rng: np.random.Generator,
                config: PhantomConfig) -> Tumour:
    """One irregular tumour centred in ``region``: smoothed noise thresholded in a deformed ellipsoid.

    The threshold is chosen so that the tumour (restricted to the brain mask) has the drawn volume;
    the largest connected piece is kept. A cystic tumour gets an ellipsoidal cyst inside its core.
    """
    s = anat.spacing
    centre = anat.centres[region][rng.integers(len(anat.centres[region]))]
    lo, hi = np.log(config.volume_ml)
    volume_ml = float(np.exp(rng.uniform(lo, hi)))
    r_eq = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    box = _box_around(centre, int(np.ceil(1.8 * r_eq / s)), anat.brain.shape)
    shape = tuple(b.stop - b.start for b in box)
    local_centre = centre - np.array([b.start for b in box])
    radii = r_eq * np.exp(rng.normal(0.0, 0.25, 3))
    radii *= r_eq / np.prod(radii) ** (1.0 / 3.0)
    rho = _ellipsoid_norm(shape, local_centre, s, radii, _random_rotation(rng))
    score = (1.0 - rho + 0.3 * _unit_noise(shape, 0.35 * r_eq / s, rng)
             + 0.12 * _unit_noise(shape, max(0.7, 2.0 / s), rng))
    allowed = anat.brain[box]
    n_target = max(1, int(round(volume_ml * 1000.0 / s**3)))
    values = np.sort(score[allowed])[::-1]
    mask = allowed & (score >= values[min(n_target, len(values)) - 1])
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    cyst = np.zeros_like(mask)
    if cystic:
        cyst_centre = local_centre + rng.normal(0.0, 0.15 * r_eq, 3) / s
        cyst_radii = r_eq * rng.uniform(0.4, 0.6) * np.exp(rng.normal(0.0, 0.15, 3))
        core = ndimage.binary_erosion(mask, iterations=max(1, int(round(2.0 / s))))
        cyst = core & (_ellipsoid_norm(shape, cyst_centre, s, cyst_radii, _random_rotation(rng)) < 1.0)
    return Tumour(box=box, mask=mask, cyst=cyst, centre_zyx=tuple(int(c) for c in centre),  # type: ignore[arg-type]
                  target_ml=volume_ml)


# ----------------------------------------------------------------------------- rendering


def _skull_shell(outside_mm: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """FLAIR intensity of a CSF / bone / scalp shell around the brain hull, and its outer radius."""
    f = rng.uniform(0.8, 1.25)
    csf, bone, scalp = 2.0 * f, 8.0 * f, 14.0 * f
    shell = np.zeros_like(outside_mm)
    shell[(outside_mm > 0) & (outside_mm <= csf)] = rng.uniform(0.05, 0.15)
    shell[(outside_mm > csf) & (outside_mm <= bone)] = rng.uniform(0.02, 0.08)
    shell[(outside_mm > bone) & (outside_mm <= scalp)] = rng.uniform(0.9, 1.4)
    return shell, scalp


def render_flair(anat: Anatomy, tumour: Tumour, skull: bool, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """FLAIR-like atlas-space volume (GM = 1) with the tumour painted in.

    Returns:
        The float32 array (z, y, x) and the head's outer radius beyond the brain hull in mm
        (0 without skull).
    """
    img = anat.gm + rng.uniform(0.7, 0.85) * anat.wm + rng.uniform(0.08, 0.2) * anat.csf
    img *= 1.0 + 0.04 * _unit_noise(img.shape, max(0.5, 1.5 / anat.spacing), rng)
    head_mm = 0.0
    if skull:
        shell, head_mm = _skull_shell(anat.outside_mm, rng)
        img += shell
    b = tumour.box
    level = rng.uniform(1.35, 1.7) * (1.0 + 0.06 * _unit_noise(tumour.mask.shape, max(0.5, 1.5 / anat.spacing), rng))
    level = np.where(tumour.cyst, rng.uniform(0.15, 0.35), level)
    weight = np.clip(ndimage.gaussian_filter(tumour.mask.astype(np.float32), 0.5), 0.0, 1.0)
    weight = np.where(tumour.mask, np.maximum(weight, 0.7), weight)
    img[b] = img[b] * (1.0 - weight) + level * weight
    return img.astype(np.float32), head_mm


# ----------------------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class Acquisition:
    """Random acquisition parameters of one case (all drawn, whatever the output space)."""

    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    scale: float
    orientation: str
    oblique_deg: tuple[float, float, float] | None
    thick_axis: int
    thickness_mm: float
    intensity_scale: float
    noise_sigma: float
    bias_coeffs: tuple[float, ...]


def sample_acquisition(rng: np.random.Generator, config: PhantomConfig, spacing: float) -> Acquisition:
    """Draw pose, orientation, slice thickness, bias, noise and intensity scale of one case."""
    c = config
    lo_t = max(c.thickness_mm[0], spacing)
    thickness = float(rng.uniform(lo_t, max(c.thickness_mm[1], lo_t)))
    oblique = rng.random() < c.oblique_fraction
    tilt = tuple(float(v) for v in rng.uniform(-c.max_oblique_deg, c.max_oblique_deg, 3))
    return Acquisition(
        rotation_deg=tuple(float(v) for v in rng.uniform(-c.max_rotation_deg, c.max_rotation_deg, 3)),  # type: ignore[arg-type]
        translation_mm=tuple(float(v) for v in rng.uniform(-c.max_translation_mm, c.max_translation_mm, 3)),  # type: ignore[arg-type]
        scale=float(rng.uniform(*c.scale_range)),
        orientation=ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))],
        oblique_deg=tilt if oblique else None,  # type: ignore[arg-type]
        thick_axis=int(rng.integers(3)),
        thickness_mm=thickness,
        intensity_scale=float(np.exp(rng.uniform(*np.log(c.intensity_scale)))),
        noise_sigma=float(rng.uniform(*c.noise_sigma)),
        bias_coeffs=tuple(float(v) for v in rng.normal(0.0, c.bias_strength, 9)),
    )


def _euler_matrix(degrees: Sequence[float]) -> np.ndarray:
    """Rotation Rz @ Ry @ Rx for angles (x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_transform(acq: Acquisition, centre_lps: np.ndarray) -> sitk.AffineTransform:
    """The true atlas -> native transform: ``x -> s R (x - c) + c + t`` flattened (centre 0)."""
    matrix = acq.scale * _euler_matrix(acq.rotation_deg)
    offset = centre_lps + np.asarray(acq.translation_mm) - matrix @ centre_lps
    tfm = sitk.AffineTransform(3)
    tfm.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    tfm.SetTranslation(tuple(float(v) for v in offset))
    return tfm


def direction_matrix(acq: Acquisition) -> np.ndarray:
    """ITK (LPS) direction matrix of the native grid: columns are the i, j, k axis directions."""
    base = np.array([_LPS_OF_LETTER[letter] for letter in acq.orientation], dtype=float).T
    return base if acq.oblique_deg is None else _euler_matrix(acq.oblique_deg) @ base


def _native_geometry(points: np.ndarray, direction: np.ndarray, spacing: np.ndarray,
                     margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Origin and size of a grid along ``direction`` covering ``points`` (n, 3) plus a margin."""
    q = points @ direction  # coordinates along the grid axes
    lo, hi = q.min(axis=0) - margin, q.max(axis=0) + margin
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    return direction @ lo, size


def _make_grid(origin: np.ndarray, size: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> sitk.Image:
    grid = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    grid.SetOrigin(tuple(float(v) for v in origin))
    grid.SetSpacing(tuple(float(v) for v in spacing))
    grid.SetDirection(tuple(float(v) for v in direction.ravel()))
    return grid


def _thick_resample(moving: sitk.Image, grid: sitk.Image, to_moving: sitk.Transform, axis: int,
                    k: int) -> np.ndarray:
    """Resample onto ``grid`` whose ``axis`` holds thick slices: mean of ``k`` thin sub-slices each."""
    spacing = np.asarray(grid.GetSpacing())
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    fine_spacing, fine_size = spacing.copy(), np.asarray(grid.GetSize())
    fine_spacing[axis] /= k
    fine_size[axis] *= k
    origin = np.asarray(grid.GetOrigin()) - direction[:, axis] * (k - 1) / 2.0 * fine_spacing[axis]
    fine = _make_grid(origin, fine_size, fine_spacing, direction)
    arr = sitk.GetArrayFromImage(sitk.Resample(moving, fine, to_moving, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    np_axis = 2 - axis
    arr = np.moveaxis(arr, np_axis, 0)
    arr = arr.reshape(arr.shape[0] // k, k, *arr.shape[1:]).mean(axis=1)
    return np.moveaxis(arr, 0, np_axis)


def _bias_field(shape: tuple[int, ...], coeffs: Sequence[float]) -> np.ndarray:
    """Smooth multiplicative field: exp of a quadratic polynomial of normalised voxel coordinates."""
    u = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*u, indexing="ij", sparse=True)
    terms = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z)
    return np.exp(sum(c * t for c, t in zip(coeffs, terms, strict=True))).astype(np.float32)


def _corrupt(signal: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Bias field, Rician noise (magnitude of complex Gaussian noise), intensity scale."""
    biased = signal * _bias_field(signal.shape, acq.bias_coeffs)
    sigma = acq.noise_sigma
    real = biased + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return (np.sqrt(real * real + imag * imag) * acq.intensity_scale).astype(np.float32)


def _to_image(arr: np.ndarray, like: sitk.Image, pixel: int) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    return sitk.Cast(img, pixel)


def _head_points(anat: Anatomy, head_mm: float) -> np.ndarray:
    """LPS points (subsampled voxel centres) of the head: the brain, plus the shell if any."""
    head = anat.brain | ((anat.outside_mm > 0) & (anat.outside_mm <= head_mm)) if head_mm > 0 else anat.brain
    step = max(1, int(round(4.0 / anat.spacing)))
    zyx = np.argwhere(head[::step, ::step, ::step]) * step
    return _voxel_lps(anat.grid, zyx)


def acquire_native(anat: Anatomy, flair: np.ndarray, mask: np.ndarray, head_mm: float, acq: Acquisition,
                   margin_mm: float) -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform]:
    """Pose, orient and slice an atlas-space case: native signal (before corruption), mask, transform.

    Returns:
        The native float32 noise-free signal image, the native uint8 mask, and the true
        atlas -> native transform.
    """
    tfm = pose_transform(acq, anat.centre_lps)
    inverse = tfm.GetInverse()
    direction = direction_matrix(acq)
    spacing = np.full(3, anat.spacing)
    spacing[acq.thick_axis] = acq.thickness_mm
    points = _head_points(anat, head_mm)
    native_points = points @ (acq.scale * _euler_matrix(acq.rotation_deg)).T + np.asarray(tfm.GetTranslation())
    origin, size = _native_geometry(native_points, direction, spacing, margin_mm)
    grid = _make_grid(origin, size, spacing, direction)
    k = max(1, int(round(acq.thickness_mm / anat.spacing)))
    signal = _thick_resample(_to_image(flair, anat.grid, sitk.sitkFloat32), grid, inverse, acq.thick_axis, k)
    native_mask = _thick_resample(_to_image(mask.astype(np.float32), anat.grid, sitk.sitkFloat32), grid, inverse,
                                  acq.thick_axis, k) > 0.5
    return (_to_image(signal, grid, sitk.sitkFloat32), _to_image(native_mask.astype(np.uint8), grid, sitk.sitkUInt8),
            tfm)


# ----------------------------------------------------------------------------- writing


def _write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _write_transform_atomic(tfm: sitk.Transform, path: Path) -> None:
    write_transform_atomic(tfm, path)


def _orientation_code(direction: np.ndarray) -> str:
    """Nearest NIfTI-style axis code (e.g. ``LAS``) of an ITK (LPS) direction matrix."""
    ras = direction * _RAS_FROM_LPS[:, None]
    letters = []
    for col in ras.T:
        a = int(np.argmax(np.abs(col)))
        letters.append(("RAS" if col[a] > 0 else "LPI")[a])
    return "".join(letters)


@dataclass(frozen=True)
class _CaseSpec:
    """Cohort-level draws of one case."""

    cid: str
    cls: int
    region: int
    appearance: int
    skull: bool
    has_label: bool
    has_class: bool
    seed: np.random.SeedSequence


def _render_case(spec: _CaseSpec, anat: Anatomy, space: str, config: PhantomConfig
                 ) -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform, dict[str, Any]]:
    """Build one case; returns image, mask, atlas -> native transform and its truth record."""
    anat_rng, acq_rng = (np.random.default_rng(s) for s in spec.seed.spawn(2))
    tumour = make_tumour(anat, REGIONS[spec.region], APPEARANCES[spec.appearance] == "cystic", anat_rng, config)
    flair, head_mm = render_flair(anat, tumour, spec.skull, anat_rng)
    mask = np.zeros(anat.brain.shape, dtype=bool)
    mask[tumour.box] = tumour.mask
    acq = sample_acquisition(acq_rng, config, anat.spacing)
    if space == "atlas":
        signal, seg, tfm = _to_image(flair, anat.grid, sitk.sitkFloat32), _to_image(
            mask.astype(np.uint8), anat.grid, sitk.sitkUInt8), sitk.AffineTransform(3)
    else:
        signal, seg, tfm = acquire_native(anat, flair, mask, head_mm, acq, config.margin_mm)
    image = _to_image(_corrupt(sitk.GetArrayFromImage(signal), acq, acq_rng), signal, sitk.sitkFloat32)
    truth = _truth_record(spec, anat, tumour, acq, space, image, seg, tfm)
    return image, seg, tfm, truth


def _truth_record(spec: _CaseSpec, anat: Anatomy, tumour: Tumour, acq: Acquisition, space: str,
                  image: sitk.Image, seg: sitk.Image, tfm: sitk.AffineTransform) -> dict[str, Any]:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre_ras = _voxel_lps(anat.grid, np.array([tumour.centre_zyx]))[0] * _RAS_FROM_LPS
    native_ml = float(sitk.GetArrayViewFromImage(seg).sum() * np.prod(seg.GetSpacing()) / 1000.0)
    rec: dict[str, Any] = {
        "id": spec.cid, "class": spec.cls, "class_name": CLASSES[spec.cls], "region": REGIONS[spec.region],
        "appearance": APPEARANCES[spec.appearance], "skull": spec.skull, "space": space,
        "label_in_datalist": spec.has_label, "class_in_datalist": spec.has_class,
        "mask_file": "mask.nii.gz" if spec.has_label else "mask_truth.nii.gz",
        "tumour_centre_mni_ras_mm": [round(float(v), 2) for v in centre_ras],
        "tumour_volume_ml_atlas": round(float(tumour.mask.sum()) * anat.spacing**3 / 1000.0, 3),
        "tumour_volume_ml_native": round(native_ml, 3),
        "cyst_volume_ml_atlas": round(float(tumour.cyst.sum()) * anat.spacing**3 / 1000.0, 3),
        "atlas": anat.name,
        "size": list(image.GetSize()), "spacing_mm": [round(v, 4) for v in image.GetSpacing()],
        "orientation": _orientation_code(direction), "direction": [round(v, 6) for v in image.GetDirection()],
        "intensity_scale": acq.intensity_scale, "noise_sigma_rel_gm": acq.noise_sigma,
        "bias_coeffs": list(acq.bias_coeffs),
        "to_atlas_matrix": list(tfm.GetMatrix()), "to_atlas_translation": list(tfm.GetTranslation()),
    }
    if space == "native":
        rec.update({
            "pose": {"rotation_deg_xyz": list(acq.rotation_deg), "translation_mm": list(acq.translation_mm),
                     "scale": acq.scale, "centre_lps_mm": [float(v) for v in anat.centre_lps]},
            "oblique": acq.oblique_deg is not None, "oblique_deg_xyz": acq.oblique_deg,
            "slice_thickness_mm": acq.thickness_mm, "thick_axis": acq.thick_axis,
        })
    else:
        rec.update({"pose": None, "oblique": False, "slice_thickness_mm": anat.spacing, "thick_axis": None})
    return rec


def _write_case(folder: Path, image: sitk.Image, seg: sitk.Image, tfm: sitk.Transform,
                truth: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_image_atomic(image, folder / "image.nii.gz")
    write_image_atomic(seg, folder / truth["mask_file"])
    stale = folder / ("mask_truth.nii.gz" if truth["mask_file"] == "mask.nii.gz" else "mask.nii.gz")
    stale.unlink(missing_ok=True)
    _write_transform_atomic(tfm, folder / "to_atlas.tfm")
    _write_json_atomic(truth, folder / "truth.json")


# ----------------------------------------------------------------------------- cohort


def _exact_subset(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean array with exactly ``round(fraction * n)`` True entries at seeded random places."""
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[: int(round(fraction * n))]] = True
    return chosen


def _case_specs(cases: int, seed: int, missing_mask: float, missing_class: float,
                config: PhantomConfig) -> list[_CaseSpec]:
    cohort_seq, case_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(cohort_seq)
    cues = sample_cues(cases, rng, config)
    skull = _exact_subset(cases, config.skull_fraction, rng)
    no_label = _exact_subset(cases, missing_mask, rng)
    no_class = _exact_subset(cases, missing_class, rng)
    width = max(3, len(str(cases - 1)))
    return [
        _CaseSpec(cid=f"c{i:0{width}d}", cls=int(cues.classes[i]), region=int(cues.regions[i]),
                  appearance=int(cues.appearances[i]), skull=bool(skull[i]), has_label=not no_label[i],
                  has_class=not no_class[i], seed=seq)
        for i, seq in enumerate(case_seq.spawn(cases))
    ]


def _check_options(out: Path, cases: int, spacing: float, space: str, missing_mask: float,
                   missing_class: float) -> None:
    if cases < 1:
        raise InputError(None, f"--cases must be >= 1, got {cases}")
    if not SPACING_RANGE_MM[0] <= spacing <= SPACING_RANGE_MM[1]:
        raise InputError(None, f"--spacing must be in [{SPACING_RANGE_MM[0]}, {SPACING_RANGE_MM[1]}] mm, got {spacing}")
    if space not in SPACES:
        raise InputError(None, f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    _check_fraction(missing_mask, "--missing-mask")
    _check_fraction(missing_class, "--missing-class")
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is not a folder")
    datalist = out / "datalist.json"
    if datalist.exists():
        try:
            ours = "phantom" in json.loads(datalist.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise InputError(datalist, "exists and is not a phantom datalist; refusing to overwrite it")


def _metadata(specs: list[_CaseSpec], anat: Anatomy, settings: dict[str, Any], config: PhantomConfig,
              accuracy: float) -> dict[str, Any]:
    counts = np.bincount([s.cls for s in specs], minlength=len(CLASSES))
    grid = anat.grid
    return {
        "generator": "pipeline.data.phantom", **settings,
        "class_sampling": "balanced: seeded shuffle of round-robin labels",
        "regions": list(REGIONS), "appearances": list(APPEARANCES),
        "region_definition_mni_ras_mm": {
            "infratentorial": "z < -25 and y < -40", "midline": "|x| < 12, -35 < y < 10, -15 < z < 20",
            "hemispheric": "|x| > 20 and z > 5",
        },
        "region_prior": {c: dict(zip(REGIONS, row, strict=True)) for c, row in zip(CLASSES, config.region_prior, strict=True)},
        "appearance_prior": {c: dict(zip(APPEARANCES, row, strict=True)) for c, row in zip(CLASSES, config.appearance_prior, strict=True)},
        "class_counts": dict(zip(CLASSES, counts.tolist(), strict=True)),
        "bayes_accuracy": round(accuracy, 4),
        "bayes_accuracy_uniform_classes": round(bayes_accuracy(config.region_prior, config.appearance_prior), 4),
        "atlas": {"name": anat.name, "size": list(grid.GetSize()), "spacing": list(grid.GetSpacing()),
                  "origin_lps": list(grid.GetOrigin()), "direction": list(grid.GetDirection())},
        "truth_files": {"transform": "<id>/to_atlas.tfm (atlas LPS -> native LPS)", "record": "<id>/truth.json",
                        "unlabelled_mask": "<id>/mask_truth.nii.gz"},
        "config": asdict(config),
    }


def make_cohort(out: str | Path, cases: int = 60, seed: int = 0, spacing: float = 2.0, space: str = "native",
                missing_mask: float = 0.0, missing_class: float = 0.0, config: PhantomConfig | None = None,
                progress: Callable[[str], None] | None = None) -> CohortSummary:
    """Write a synthetic cohort and its ``datalist.json`` (see the module docstring for the layout).

    ``out`` may exist: our files (``datalist.json``, ``<id>/...``) are overwritten, others are left
    alone; an existing ``datalist.json`` that is not a phantom datalist is never overwritten. The
    old datalist is removed first, so a datalist present means a complete cohort.

    Args:
        out: output folder.
        cases: number of cases (>= 1); ids ``c000``, ``c001``, ...
        seed: random seed; the same seed and options give identical output.
        spacing: atlas grid spacing and native in-plane spacing in mm, in [0.5, 8].
        space: ``"native"`` (posed, thick slices, varied orientation) or ``"atlas"``.
        missing_mask: fraction of cases without ``label`` in the datalist.
        missing_class: fraction of cases without ``class`` in the datalist.
        config: generator knobs; ``PhantomConfig()`` when ``None``.
        progress: called with one line per case (e.g. ``print``).

    Returns:
        A :class:`CohortSummary`.

    Raises:
        InputError: bad option, or ``out`` holds a datalist that is not ours.
    """
    start = time.perf_counter()
    out, cfg = Path(out), config or PhantomConfig()
    _check_options(out, cases, spacing, space, missing_mask, missing_class)
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").unlink(missing_ok=True)
    anat = load_anatomy(float(spacing), cfg.min_depth_mm)
    specs = _case_specs(cases, seed, missing_mask, missing_class, cfg)
    entries = []
    for n, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        image, seg, tfm, truth = _render_case(spec, anat, space, cfg)
        _write_case(out / spec.cid, image, seg, tfm, truth)
        entries.append(_entry(spec))
        if progress:
            progress(f"[{n:>{len(str(cases))}}/{cases}] {spec.cid}  {CLASSES[spec.cls]:<11} "
                     f"{REGIONS[spec.region]:<14} {APPEARANCES[spec.appearance]:<6} "
                     f"{truth['tumour_volume_ml_atlas']:5.1f} mL  {'skull' if spec.skull else 'brain'}  "
                     f"{truth['orientation']}{'*' if truth['oblique'] else ' '} "
                     f"{truth['slice_thickness_mm']:.1f} mm  {time.perf_counter() - t0:.2f} s")
    freq = np.bincount([s.cls for s in specs], minlength=len(CLASSES)) / cases
    accuracy = bayes_accuracy(cfg.region_prior, cfg.appearance_prior, freq)
    settings = {"cases": cases, "seed": seed, "spacing_mm": spacing, "space": space, "missing_mask": missing_mask,
                "missing_class": missing_class, "skull_fraction": cfg.skull_fraction}
    datalist = {"classes": list(CLASSES), "training": entries,
                "phantom": _metadata(specs, anat, settings, cfg, accuracy)}
    _write_json_atomic(datalist, out / "datalist.json")
    return CohortSummary(
        datalist=out / "datalist.json", cases=cases, bayes_accuracy=accuracy,
        class_counts=datalist["phantom"]["class_counts"],
        region_counts={r: sum(s.region == i for s in specs) for i, r in enumerate(REGIONS)},
        labelled=sum(s.has_label for s in specs), classified=sum(s.has_class for s in specs),
        seconds=time.perf_counter() - start)


def _entry(spec: _CaseSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": spec.cid, "image": f"{spec.cid}/image.nii.gz"}
    if spec.has_label:
        entry["label"] = f"{spec.cid}/mask.nii.gz"
    if spec.has_class:
        entry["class"] = spec.cls
    return entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline phantom",
                                description="Build the synthetic pLGG cohort from MNI152 anatomy.")
    p.add_argument("--out", type=Path, required=True, help="output folder (may exist; our files are overwritten)")
    p.add_argument("--cases", type=int, default=60, help="number of cases (default 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--spacing", type=float, default=2.0, help="atlas / in-plane spacing in mm (default 2)")
    p.add_argument("--space", default="native", help="native (posed, thick slices) or atlas (default native)")
    p.add_argument("--missing-mask", type=float, default=0.0, help="fraction of cases without label (default 0)")
    p.add_argument("--missing-class", type=float, default=0.0, help="fraction of cases without class (default 0)")
    p.add_argument("--skull-fraction", type=float, default=PhantomConfig.skull_fraction,
                   help=f"fraction of cases with a skull/scalp shell (default {PhantomConfig.skull_fraction})")
    return p


def main(argv: list[str]) -> int:
    """CLI entry: ``python -m pipeline phantom --out DIR --cases N --seed S [...]``."""
    args = _parser().parse_args(argv)
    config = PhantomConfig(skull_fraction=args.skull_fraction)
    summary = make_cohort(args.out, cases=args.cases, seed=args.seed, spacing=args.spacing, space=args.space,
                          missing_mask=args.missing_mask, missing_class=args.missing_class, config=config,
                          progress=print)
    counts = ", ".join(f"{k}: {v}" for k, v in summary.class_counts.items())
    print(f"wrote {summary.cases} cases ({counts}; {summary.labelled} with label, {summary.classified} with class) "
          f"to {summary.datalist} in {summary.seconds:.1f} s")
    uniform = bayes_accuracy(config.region_prior, config.appearance_prior)
    note = "" if abs(uniform - summary.bayes_accuracy) < 5e-3 else \
        f" (at this cohort's class counts; {uniform:.2f} with equal class frequencies)"
    print(f"Bayes-optimal class accuracy of these priors: {summary.bayes_accuracy:.2f}{note}")
    return 0
