"""Affine registration of a scan onto the atlas (SimpleITK), resampling both ways, and a disk cache.

Transform convention (ITK, the one ``sitk.Resample`` takes): every transform here maps an ATLAS
physical point to the NATIVE physical point it comes from, so

* ``sitk.Resample(native, atlas.image, T)`` brings a native image onto the atlas grid, and
* ``sitk.Resample(atlas_grid_image, native, T.GetInverse())`` brings it back.

It is the same convention as the synthetic cohort's ``to_atlas.tfm`` ground truth.

Method (:func:`register_to_atlas`), all on a working grid of about 2 mm (the transform is
physical, so it applies to any atlas grid):

1. the moving scan is smoothed/resampled to the working spacing (thick slices stay thick),
   clipped to intensity percentiles of its head and rescaled to [0, 1];
2. its brain is found (``skull_strip``: the deepbet network when installed, else morphology)
   and everything else is set to 0, so a skull-on scan looks like the brain-only template and
   the skull cannot drive the fit (this is what makes skull-on, thick-slice clinical FLAIR work);
3. start: brain centroids aligned, isotropic scale from the brain volumes, and the best of a
   few start rotations after a short coarse fit each;
4. multi-resolution stages (default similarity then affine) maximise Mattes mutual information
   over the dilated atlas brain mask (template and FLAIR contrasts differ);
5. refinement: the atlas brain mask is taken back to native space, dilated a little and
   intersected with the brain mask, and the last stage is run again on that.

Measured (``benchmarks/registration.py``, 2 cores): synthetic native-space phantoms (skull on
for half, slices up to 6 mm, oblique) TRE median 0.6 mm / p95 1.4 mm; the real skull-on
5.5 mm FLAIR agrees with the BraTS-prepared route within 1.9 mm median / 4.5 mm p95.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.atlas import Atlas, same_grid
from pipeline.errors import InputError
from pipeline.imageio import atomic_write, read_volume

__all__ = [
    "RegistrationSettings",
    "RegistrationCache",
    "register_to_atlas",
    "resample_image_to_atlas",
    "resample_mask_to_atlas",
    "map_to_native",
    "head_mask",
    "brain_estimate",
    "to_affine",
    "read_transform",
    "write_transform_atomic",
    "file_sha256",
]

logger = logging.getLogger(__name__)

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class RegistrationSettings:
    """Every knob of :func:`register_to_atlas`; :meth:`key` hashes them for the cache.

    Attributes:
        stages: transform stages run in order, each initialised by the previous one; any of
            ``"rigid"`` (6 dof), ``"similarity"`` (7), ``"affine"`` (12). Similarity comes first
            by default: a rigid fit of a brain of another size has no sharp optimum (on the
            phantoms it drifted 10-25 mm in some cases).
        working_spacing: mm; the atlas is smoothed and resampled to this spacing when finer
            (a 1 mm atlas is registered on a 2 mm copy; the transform is physical, so it applies
            to the 1 mm grid unchanged).
        histogram_bins: Mattes mutual information bins.
        sampling_percentage: fraction of the fixed-mask voxels sampled (random, seeded) per level.
        shrink_factors: pyramid shrink factor per level (fixed image, in voxels).
        smoothing_sigmas: Gaussian sigma per level, in mm.
        iterations: maximum optimiser iterations per level.
        learning_rate: initial step (mm-equivalent, scales from physical shift) of regular-step
            gradient descent.
        initial_rotations: degrees; the identity and each non-zero angle about each axis alone
            (1 + 6 starts for the default) get a short coarse similarity fit; the best is kept.
        initial_scale_range: clip of the start scale (cube root of the moving / atlas brain
            volume ratio); a truncated field of view gives a too small brain volume.
        skull_strip: how the moving scan's brain is found before registration (the scan is
            masked with it, so a skull-on scan matches the brain-only template):
            ``"deepbet"`` (the deepbet network, CPU ~5-8 s; needs the ``deepbet`` package),
            ``"morphology"`` (erosion / largest component / dilation of the head mask: no extra
            dependency, but it leaks into the scalp and neck of skull-on scans), ``"auto"``
            (deepbet when importable, else morphology), ``"none"`` (head mask only).
        refine_passes: passes of atlas-mask refinement after the last stage (0 disables): the
            atlas brain mask is brought back to native space, dilated by ``refine_dilation``
            mm, intersected with the moving brain mask and used to mask the scan again.
        refine_dilation: mm.
        fixed_mask_dilation: mm; dilation of the atlas brain mask used as fixed metric mask.
        clip_percentiles: moving intensities are clipped to these percentiles of the head.
        threads: SimpleITK threads (0: SimpleITK's default, all cores).
        seed: sampling seed (results are reproducible for a given thread count).
    """

    stages: tuple[str, ...] = ("similarity", "affine")
    working_spacing: float = 2.0
    histogram_bins: int = 32
    sampling_percentage: float = 0.15
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (4.0, 2.0, 1.0)
    iterations: int = 100
    learning_rate: float = 2.0
    initial_rotations: tuple[float, ...] = (-20.0, 0.0, 20.0)
    initial_scale_range: tuple[float, float] = (0.8, 1.25)
    skull_strip: str = "auto"
    refine_passes: int = 1
    refine_dilation: float = 3.0
    fixed_mask_dilation: float = 6.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    threads: int = 0
    seed: int = 1

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in _STAGE_TYPES]
        if bad or not self.stages:
            raise InputError(None, f"registration stages must be among {sorted(_STAGE_TYPES)}, got {self.stages}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise InputError(None, "shrink_factors and smoothing_sigmas need one value per level")
        if self.skull_strip not in _SKULL_STRIP:
            raise InputError(None, f"skull_strip must be one of {_SKULL_STRIP}, got {self.skull_strip!r}")
        if self.working_spacing <= 0 or not 0 < self.sampling_percentage <= 1 or self.iterations < 1:
            raise InputError(None, "registration settings: working_spacing must be > 0, sampling_percentage in "
                                   "(0, 1] and iterations >= 1")
        lo, hi = self.initial_scale_range
        if not 0 < lo <= hi:
            raise InputError(None, f"registration settings: initial_scale_range must be 0 < low <= high, got "
                                   f"{self.initial_scale_range}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RegistrationSettings:
        """Settings from a config dict (lists become tuples); an unknown key is an ``InputError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(None, f"unknown registration setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def key(self) -> str:
        """Hex digest (16 chars) of every setting except ``threads`` (it does not change the result's
        meaning); ``skull_strip="auto"`` counts as the method it resolves to on this machine."""
        d = asdict(self)
        d.pop("threads")
        if d["skull_strip"] == "auto":
            d["skull_strip"] = "deepbet" if deepbet_available() else "morphology"
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_SKULL_STRIP = ("auto", "deepbet", "morphology", "none")
_STAGE_TYPES = {"rigid": sitk.Euler3DTransform, "similarity": sitk.Similarity3DTransform, "affine": sitk.AffineTransform}


# ----------------------------------------------------------------------------- transforms


def to_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Collapse a 3-D linear transform (Euler, similarity, affine, or a composite of them) into one affine."""
    matrix, offset = np.eye(3), np.zeros(3)
    # a composite applies its last-added transform first; compose point by point numerically
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1.0
        matrix[:, i] = np.array(transform.TransformPoint(tuple(e))) - origin
    offset = origin
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(matrix.ravel()))
    out.SetTranslation(tuple(offset))
    return out


def read_transform(path: str | Path) -> sitk.AffineTransform:
    """Read a ``.tfm`` written by :func:`write_transform_atomic` (or any 3-D linear ITK transform)."""
    try:
        return to_affine(sitk.ReadTransform(str(path)))
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an ITK transform: {str(exc).strip().splitlines()[-1][:200]}") from None


def write_transform_atomic(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK ``.tfm`` through a temporary file in the same folder, then rename."""
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, tmp), ".tfm")


# ----------------------------------------------------------------------------- masks


def _radius_vox(image: sitk.Image, mm: float) -> list[int]:
    """Per-axis kernel radius (voxels) for a physical radius of ``mm`` (0 along thick axes is fine)."""
    return [int(round(mm / s)) for s in image.GetSpacing()]


def _grow(mask: sitk.Image, mm: float) -> sitk.Image:
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


def deepbet_available() -> bool:
    """True when the optional ``deepbet`` brain-extraction package can be imported."""
    try:
        import deepbet.bet  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing compiled dependency)
        return False
    return True


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


def _moving_brain(native: sitk.Image, working: sitk.Image, head: sitk.Image,
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


# ----------------------------------------------------------------------------- preprocessing


def _normalise(image: sitk.Image, mask: sitk.Image, percentiles: tuple[float, float]) -> sitk.Image:
    """Clip to percentiles of the voxels inside ``mask`` and rescale to [0, 1]."""
    arr = sitk.GetArrayViewFromImage(image)
    inside = arr[sitk.GetArrayViewFromImage(mask) > 0]
    lo, hi = np.percentile(inside if inside.size else arr, percentiles)
    hi = hi if hi > lo else lo + 1.0
    out = sitk.Clamp(image, sitk.sitkFloat32, float(lo), float(hi))
    return sitk.ShiftScale(out, -float(lo), 1.0 / float(hi - lo))


def _working_moving(image: sitk.Image, spacing: float) -> sitk.Image:
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


def _working_fixed(atlas: Atlas, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """Atlas image (normalised) and brain mask on a grid no finer than ``spacing`` mm."""
    image = _normalise(atlas.image, atlas.brain_mask, (0.0, 99.5))
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


# ----------------------------------------------------------------------------- registration


def _registration_method(settings: RegistrationSettings, fixed_mask: sitk.Image,
                         moving_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(settings.sampling_percentage, seed=settings.seed)
    reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(settings.learning_rate, 1e-3, settings.iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if settings.threads:
        reg.SetNumberOfThreads(settings.threads)
    return reg


def _as_stage(previous: sitk.Transform, kind: str, center: tuple[float, float, float]) -> sitk.Transform:
    """A transform of type ``kind`` that starts where ``previous`` (Euler/similarity/affine) ends."""
    aff = to_affine(previous)
    m = np.array(aff.GetMatrix()).reshape(3, 3)
    c = np.array(center)
    t = np.array(aff.TransformPoint(tuple(c))) - c  # translation about the centre
    if kind == "affine":
        out = sitk.AffineTransform(3)
        out.SetCenter(center)
        out.SetMatrix(tuple(m.ravel()))
        out.SetTranslation(tuple(t))
        return out
    # rigid / similarity: nearest rotation (and isotropic scale) of the current matrix
    u, s, vt = np.linalg.svd(m)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        u[:, -1] *= -1
        rot = u @ vt
    out = _STAGE_TYPES[kind]()
    out.SetCenter(center)
    out.SetMatrix(tuple(rot.ravel()))
    if kind == "similarity":  # after SetMatrix, which resets the scale of a Similarity3DTransform to 1
        out.SetScale(float(np.cbrt(abs(np.linalg.det(m)))))
    out.SetTranslation(tuple(t))
    return out


def _centre(mask: sitk.Image) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return tuple(stats.GetCentroid(1))  # type: ignore[return-value]


def _rotation_starts(angles: tuple[float, ...]) -> list[tuple[float, float, float]]:
    """Identity plus each non-zero angle (degrees) about each axis alone: 1 + 6 starts for (-20, 0, 20)."""
    starts = [(0.0, 0.0, 0.0)]
    for a in angles:
        if a:
            starts += [(a, 0.0, 0.0), (0.0, a, 0.0), (0.0, 0.0, a)]
    return starts


def _volume(mask: sitk.Image) -> float:
    """Foreground volume of a binary mask in mm^3."""
    return float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))


def _initial_transform(fixed: sitk.Image, fixed_brain: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image,
                       moving_brain: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
    """Similarity start: brain centroids aligned, scale from the brain volumes, best start rotation.

    The isotropic scale is the cube root of the moving / atlas brain volume ratio (clipped to
    ``settings.initial_scale_range``): a rigid fit of a brain of another size has no sharp optimum.

    Every start is optimised at the coarsest pyramid level only (a few dozen iterations), so a
    start in the wrong basin is not chosen on its raw metric value alone.
    """
    c_fixed = _centre(fixed_mask)
    shift = tuple(np.subtract(_centre(moving_brain), c_fixed))
    scale = float(np.clip(np.cbrt(_volume(moving_brain) / _volume(fixed_brain)), *settings.initial_scale_range))
    coarse = RegistrationSettings(**{**asdict(settings), "shrink_factors": settings.shrink_factors[:1],
                                     "smoothing_sigmas": settings.smoothing_sigmas[:1],
                                     "iterations": min(settings.iterations, 40)})
    best, best_value = None, math.inf
    for angles in _rotation_starts(settings.initial_rotations):
        tx = sitk.Similarity3DTransform()
        tx.SetCenter(c_fixed)
        rot = sitk.Euler3DTransform()
        rot.SetRotation(*(math.radians(a) for a in angles))
        tx.SetMatrix(rot.GetMatrix())
        tx.SetScale(scale)
        tx.SetTranslation(shift)
        reg = _registration_method(coarse, fixed_mask, None)
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(fixed, moving)
        if reg.GetMetricValue() < best_value:
            best, best_value = tx, reg.GetMetricValue()
    return best


def _run_stages(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image, moving_mask: sitk.Image | None,
                start: sitk.Transform, stages: tuple[str, ...], settings: RegistrationSettings) -> sitk.Transform:
    center = _centre(fixed_mask)
    current = start
    for kind in stages:
        reg = _registration_method(settings, fixed_mask, moving_mask)
        init = _as_stage(current, kind, center)
        reg.SetInitialTransform(init, inPlace=True)
        reg.Execute(fixed, moving)
        current = init
    return current


def register_to_atlas(moving: sitk.Image, atlas: Atlas, settings: RegistrationSettings | None = None) -> sitk.AffineTransform:
    """Affine registration of a scan onto the atlas (skull on or off, any orientation, thick slices).

    Args:
        moving: the native scan (3-D, any pixel type, any direction/spacing).
        atlas: the target (:func:`pipeline.atlas.load_atlas`).
        settings: knobs (defaults: :class:`RegistrationSettings`).

    Returns:
        An invertible ``sitk.AffineTransform`` mapping an atlas physical point to the native
        physical point (what ``sitk.Resample(moving, atlas.image, T)`` takes).

    Raises:
        InputError: no head-sized foreground in the scan (the caller knows the file name).
    """
    s = settings or RegistrationSettings()
    native = sitk.Cast(moving, sitk.sitkFloat32)
    moving = _working_moving(native, s.working_spacing)
    fixed, fixed_brain = _working_fixed(atlas, s.working_spacing)
    fixed_mask = _grow(fixed_brain, s.fixed_mask_dilation)
    head = head_mask(moving)
    if _volume(head) < 50_000.0:  # mm^3: 50 mL, far below any head or brain
        raise InputError(None, f"no head found in the scan (foreground {_volume(head) / 1000:.1f} mL): "
                               "is it a brain MRI volume?")
    moving_n = _normalise(moving, head, s.clip_percentiles)
    brain = _moving_brain(native, moving_n, head, s)
    masked = sitk.Mask(moving_n, brain)
    try:
        start = _initial_transform(fixed, fixed_brain, fixed_mask, masked, brain, s)
        transform = _run_stages(fixed, fixed_mask, masked, None, start, s.stages, s)
        for _ in range(s.refine_passes):
            back = map_to_native(fixed_brain, transform, moving, is_mask=True)  # on the working grid
            back = _grow(back, s.refine_dilation)
            masked = sitk.Mask(moving_n, sitk.And(back, brain))
            transform = _run_stages(fixed, fixed_mask, masked, None, transform, s.stages[-1:], s)
    except RuntimeError as exc:  # ITK optimiser failures, e.g. too little overlap with the atlas
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if not ln.startswith("Exception thrown")), lines[-1] if lines else "")
        raise InputError(None, f"registration to the atlas failed: {detail[:200]} (is the scan a brain MRI "
                               "volume with enough of the head in view?)") from None
    return to_affine(transform)


# ----------------------------------------------------------------------------- resampling


def resample_image_to_atlas(moving: sitk.Image, transform: sitk.Transform, atlas: Atlas,
                            interpolator: str = "linear") -> sitk.Image:
    """Resample a native image onto the atlas grid; float32, 0 outside the scan.

    Args:
        interpolator: ``"linear"`` or ``"bspline"`` (cubic; may overshoot slightly).
    """
    if interpolator not in ("linear", "bspline"):
        raise InputError(None, f"image interpolator must be 'linear' or 'bspline', got {interpolator!r}")
    return sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), atlas.image, transform, _INTERPOLATORS[interpolator],
                         0.0, sitk.sitkFloat32)


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


# ----------------------------------------------------------------------------- cache


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a DICOM folder: of its sorted files' names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


@dataclass
class RegistrationCache:
    """Transforms on disk, keyed by file content, atlas and settings; registration runs once per key.

    ``root/<sha256(file)[:16]>_<atlas.fingerprint()>_<settings.key()>.tfm``. The file is written
    atomically, so concurrent workers registering the same case at worst both compute it.

    Attributes:
        root: cache folder (created on first write).
        registrations_performed: registrations this object ran (cache misses).
    """

    root: Path
    registrations_performed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key(self, image_path: str | Path, atlas: Atlas, settings: RegistrationSettings) -> str:
        """The cache key of one (file, atlas, settings) triple."""
        return f"{file_sha256(image_path)[:16]}_{atlas.fingerprint()}_{settings.key()}"

    def path_for(self, image_path: str | Path, atlas: Atlas, settings: RegistrationSettings) -> Path:
        """Where the transform of this triple is (or will be) stored."""
        return self.root / f"{self.key(image_path, atlas, settings)}.tfm"

    def get_or_register(self, image_path: str | Path, atlas: Atlas,
                        settings: RegistrationSettings | None = None,
                        image: sitk.Image | None = None) -> sitk.AffineTransform:
        """The cached transform of ``image_path``, registering (and storing) it on a miss.

        Args:
            image_path: the native scan's file (its bytes are hashed).
            atlas: registration target.
            settings: registration settings (default :class:`RegistrationSettings`).
            image: the already-read scan, to avoid reading it twice on a miss.

        Raises:
            InputError: unreadable or invalid image file.
        """
        s = settings or RegistrationSettings()
        if not Path(image_path).exists():
            raise InputError(image_path, "file not found")
        target = self.path_for(image_path, atlas, s)
        if target.exists():
            try:
                return read_transform(target)
            except InputError:
                target.unlink(missing_ok=True)  # a damaged cache entry is recomputed
        moving = image if image is not None else read_volume(image_path)
        try:
            transform = register_to_atlas(moving, atlas, s)
        except InputError as exc:
            if exc.path is None:
                raise InputError(image_path, exc.problem) from None
            raise
        write_transform_atomic(transform, target)
        with self._lock:
            self.registrations_performed += 1
        return transform

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def check_on_atlas_grid(image: sitk.Image, atlas: Atlas, path: str | Path) -> None:
    """Raise :class:`InputError` when an image said to be registered is not on the atlas grid."""
    if not same_grid(image, atlas.image):
        raise InputError(path, f"said to be on the atlas grid ({atlas.name}: size {atlas.image.GetSize()}, spacing "
                               f"{atlas.image.GetSpacing()}) but has size {image.GetSize()}, spacing "
                               f"{tuple(round(s, 3) for s in image.GetSpacing())}, origin "
                               f"{tuple(round(o, 2) for o in image.GetOrigin())}; register it first")
