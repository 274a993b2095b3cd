"""Synthetic cohort (phantom): class / region / appearance names and the generator's knobs.

:class:`PhantomConfig` holds the class-cue priors, tumour size, pose and acquisition ranges that
:mod:`pipeline.data.phantom.build` draws from; the names here fix the order of every prior's rows and
columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.io.errors import InputError

__all__ = ["CLASSES", "REGIONS", "APPEARANCES", "ORIENTATIONS", "SPACES", "SPACING_RANGE_MM", "PhantomConfig"]

CLASSES: tuple[str, ...] = ("BRAF V600E", "BRAF fusion", "other")
REGIONS: tuple[str, ...] = ("hemispheric", "infratentorial", "midline")
APPEARANCES: tuple[str, ...] = ("solid", "cystic")
#: Orientation codes of native grids (NIfTI/nibabel convention: axis i, j, k point to these).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LAS", "LPS", "RSA", "ASR")
SPACES: tuple[str, ...] = ("native", "atlas")
SPACING_RANGE_MM: tuple[float, float] = (0.5, 8.0)


@dataclass(frozen=True)
class PhantomConfig:
    """The generator's knobs (priors, tumour size, pose and acquisition ranges).

    Attributes:
        region_prior: P(region | class), one row per class in :data:`CLASSES`, columns in
            :data:`REGIONS` order. Default: each class 0.8 on its typical region (V600E
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
        oedema_fraction: fraction of cases whose core has an oedema (part of the whole-tumour mask).
        oedema_mm: range of the oedema's reach beyond the core along white matter, mm.
        iso_core_fraction: fraction of the cases with oedema whose core is drawn as a high-grade
            glioma's looks on FLAIR: near the parenchyma's level and heterogeneous, often with a
            necrotic centre, so that the oedema around it is the brightest part of the tumour
            (:func:`pipeline.data.phantom.realism.draw_core_appearance`).
        random_contrast_fraction: fraction of cases whose grey, white matter and CSF levels are
            drawn at random instead of FLAIR's ordering.
        wmh_fraction: fraction of cases with white-matter hyperintensities (not tumour).
        deform_mm: std of the smooth random deformation of the anatomy per case, mm (0: the
            template's shape for every case).
        mass_effect: range of the mass-effect displacement at the tumour centre, as a fraction of
            the core's radius.
        satellite_fraction: fraction of cases with one or two more lesions apart from the tumour
            (equally often; satellites or multifocal disease, so that lesion counting and detection
            have something to learn; :func:`pipeline.data.phantom.tumour.add_satellites`).
        satellite_ml: volume range of a satellite lesion in mL, drawn log-uniformly.
        satellite_distance_mm: range of a satellite's centre distance to the tumour's centre.

    The realistic pieces from oedema to mass effect (:mod:`pipeline.data.phantom.realism`), the
    high-grade cores and the satellites are off by default, which is the study's phantom;
    :meth:`realistic` turns on the six from oedema to mass effect, ``--iso-cores`` the high-grade
    cores (measured no better on real scans yet: docs/explanation/synthetic-cohort.md),
    ``--satellites`` the satellites (each from a random stream of its own: with them off, a
    cohort is bit-identical to one built without the knob).
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
    oedema_fraction: float = 0.0
    oedema_mm: tuple[float, float] = (3.0, 20.0)
    iso_core_fraction: float = 0.0
    random_contrast_fraction: float = 0.0
    wmh_fraction: float = 0.0
    deform_mm: float = 0.0
    mass_effect: tuple[float, float] = (0.0, 0.0)
    satellite_fraction: float = 0.0
    satellite_ml: tuple[float, float] = (0.3, 3.0)
    satellite_distance_mm: tuple[float, float] = (15.0, 50.0)

    @classmethod
    def realistic(cls, **overrides: object) -> PhantomConfig:
        """The profile that renders what real gliomas and real brains show (``--profile realistic``).

        Tumour cores from 3 to 100 mL; oedema around 70 % of them, reaching 3-25 mm along white
        matter, so whole tumours run from a few mL to about 300 mL; random tissue contrast for half
        the cases; white-matter hyperintensities in 40 %; every brain deformed (3 mm std) and every
        core pushing its surroundings by up to 40 % of its radius. The proportions are design
        choices from the literature's descriptions of gliomas (oedema is the rule in high-grade
        and common in low-grade tumours; white-matter hyperintensities are common from middle
        age), not fitted to any scan. The class cues (region and appearance priors) are the
        study's, so the Bayes ceiling is unchanged.
        """
        base = cls(volume_ml=(3.0, 100.0), oedema_fraction=0.7, oedema_mm=(3.0, 25.0), random_contrast_fraction=0.5,
                   wmh_fraction=0.4, deform_mm=3.0, mass_effect=(0.0, 0.4))
        return replace(base, **overrides)  # type: ignore[arg-type]

    @property
    def renders_realism(self) -> bool:
        """Whether any of the realistic pieces is on (else the study's phantom, bit for bit)."""
        return (self.oedema_fraction > 0 or self.random_contrast_fraction > 0 or self.wmh_fraction > 0
                or self.deform_mm > 0 or self.mass_effect[1] > 0)

    def __post_init__(self) -> None:
        _check_prior(self.region_prior, len(REGIONS), "region_prior")
        _check_prior(self.appearance_prior, len(APPEARANCES), "appearance_prior")
        check_fraction(self.skull_fraction, "skull fraction")
        check_fraction(self.oblique_fraction, "oblique fraction")
        for name in ("oedema_fraction", "iso_core_fraction", "random_contrast_fraction", "wmh_fraction",
                     "satellite_fraction"):
            check_fraction(getattr(self, name), name.replace("_", " "))
        for name in ("volume_ml", "scale_range", "thickness_mm", "intensity_scale", "noise_sigma", "oedema_mm",
                     "satellite_ml", "satellite_distance_mm"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise InputError(None, f"{name} must be a range 0 < low <= high, got ({lo}, {hi})")
        if not 0 <= self.mass_effect[0] <= self.mass_effect[1] <= 1:
            raise InputError(None, f"mass_effect must be a range 0 <= low <= high <= 1, got {self.mass_effect}")
        if self.deform_mm < 0:
            raise InputError(None, f"deform_mm must be >= 0, got {self.deform_mm}")


def check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(None, f"{name} must be in [0, 1], got {value}")


def _check_prior(prior: Sequence[Sequence[float]], n_cols: int, name: str) -> None:
    arr = np.asarray(prior, dtype=float)
    if arr.shape != (len(CLASSES), n_cols) or np.any(arr < 0) or not np.allclose(arr.sum(1), 1.0):
        raise InputError(None, f"{name} must be {len(CLASSES)} rows of {n_cols} probabilities summing to 1")
