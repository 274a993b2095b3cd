"""Synthetic cohort (phantom): the simulated acquisition of an atlas-space case.

Pose (the true atlas -> native transform), native grid orientation (some oblique), thick
slices, bias field, Rician noise and intensity scale; all drawn from the case's acquisition stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.data.phantom.anatomy import Anatomy, voxel_lps
from pipeline.data.phantom.config import ORIENTATIONS, PhantomConfig

__all__ = ["Acquisition", "sample_acquisition", "pose_transform", "direction_matrix", "acquire_native"]

_LPS_OF_LETTER = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


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


def corrupt_image(signal: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Bias field, Rician noise (magnitude of complex Gaussian noise), intensity scale."""
    biased = signal * _bias_field(signal.shape, acq.bias_coeffs)
    sigma = acq.noise_sigma
    real = biased + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return (np.sqrt(real * real + imag * imag) * acq.intensity_scale).astype(np.float32)


def to_image(arr: np.ndarray, like: sitk.Image, pixel: int) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    return sitk.Cast(img, pixel)


def _head_points(anat: Anatomy, head_mm: float) -> np.ndarray:
    """LPS points (subsampled voxel centres) of the head: the brain, plus the shell if any."""
    head = anat.brain | ((anat.outside_mm > 0) & (anat.outside_mm <= head_mm)) if head_mm > 0 else anat.brain
    step = max(1, int(round(4.0 / anat.spacing)))
    zyx = np.argwhere(head[::step, ::step, ::step]) * step
    return voxel_lps(anat.grid, zyx)


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
    signal = _thick_resample(to_image(flair, anat.grid, sitk.sitkFloat32), grid, inverse, acq.thick_axis, k)
    native_mask = _thick_resample(to_image(mask.astype(np.float32), anat.grid, sitk.sitkFloat32), grid, inverse,
                                  acq.thick_axis, k) > 0.5
    return (to_image(signal, grid, sitk.sitkFloat32), to_image(native_mask.astype(np.uint8), grid, sitk.sitkUInt8),
            tfm)
