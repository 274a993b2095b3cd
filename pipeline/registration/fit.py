"""Atlas registration: the ITK optimisation (Mattes MI method, start search, chain of stages)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import SimpleITK as sitk

from pipeline.registration.settings import STAGE_TYPES, RegistrationSettings
from pipeline.registration.transforms import to_affine

__all__ = ["as_stage", "initial_transform", "run_stages", "volume_mm3"]


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


def as_stage(previous: sitk.Transform, kind: str, center: tuple[float, float, float]) -> sitk.Transform:
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
    out = STAGE_TYPES[kind]()
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


def volume_mm3(mask: sitk.Image) -> float:
    """Foreground volume of a binary mask in mm^3."""
    return float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))


def initial_transform(fixed: sitk.Image, fixed_brain: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image,
                       moving_brain: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
    """Similarity start: brain centroids aligned, scale from the brain volumes, best start rotation.

    The isotropic scale is the cube root of the moving / atlas brain volume ratio (clipped to
    ``settings.initial_scale_range``): a rigid fit of a brain of another size has no sharp optimum.

    Every start is optimised at the coarsest pyramid level only (a few dozen iterations), so a
    start in the wrong basin is not chosen on its raw metric value alone.
    """
    c_fixed = _centre(fixed_mask)
    shift = tuple(np.subtract(_centre(moving_brain), c_fixed))
    scale = float(np.clip(np.cbrt(volume_mm3(moving_brain) / volume_mm3(fixed_brain)), *settings.initial_scale_range))
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


def run_stages(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image, moving_mask: sitk.Image | None,
                start: sitk.Transform, stages: tuple[str, ...], settings: RegistrationSettings) -> sitk.Transform:
    center = _centre(fixed_mask)
    current = start
    for kind in stages:
        reg = _registration_method(settings, fixed_mask, moving_mask)
        init = as_stage(current, kind, center)
        reg.SetInitialTransform(init, inPlace=True)
        reg.Execute(fixed, moving)
        current = init
    return current
