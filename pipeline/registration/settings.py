"""Atlas registration: :class:`RegistrationSettings`, the knobs of the registration and the key of its cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import SimpleITK as sitk

from pipeline.io.errors import InputError

__all__ = ["RegistrationSettings", "deepbet_available"]


def deepbet_available() -> bool:
    """True when the optional ``deepbet`` brain-extraction package can be imported."""
    try:
        import deepbet.bet  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing compiled dependency)
        return False
    return True


@dataclass(frozen=True)
class RegistrationSettings:
    """Every knob of :func:`~pipeline.registration.register.register_to_atlas`; :meth:`key` hashes them for the cache.

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
        bad = [s for s in self.stages if s not in STAGE_TYPES]
        if bad or not self.stages:
            raise InputError(None, f"registration stages must be among {sorted(STAGE_TYPES)}, got {self.stages}")
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
STAGE_TYPES = {"rigid": sitk.Euler3DTransform, "similarity": sitk.Similarity3DTransform, "affine": sitk.AffineTransform}
