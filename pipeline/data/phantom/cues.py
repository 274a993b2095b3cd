"""Synthetic cohort (phantom): the discrete class cues (region, appearance) and their sampler.

Classes are balanced; region and appearance are drawn given the class from the priors of
:class:`~pipeline.data.phantom.config.PhantomConfig`. :func:`bayes_accuracy` is the exact
ceiling of any classifier that sees these cues; :func:`region_of` defines the regions on MNI RAS mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.phantom.config import CLASSES, PhantomConfig

__all__ = ["Cues", "bayes_accuracy", "balanced_classes", "sample_cues", "region_of"]


@dataclass(frozen=True)
class Cues:
    """The discrete class cues of a set of cases (index arrays of equal length)."""

    classes: np.ndarray
    regions: np.ndarray
    appearances: np.ndarray


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
        rng: random generator (the cohort stream in :func:`~pipeline.data.phantom.build.make_cohort`).
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


def region_masks(ras: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Vectorised :func:`region_of` over coordinate arrays (keep the two in step)."""
    x, y, z = ras
    return {
        "infratentorial": (z < -25) & (y < -40),
        "midline": (np.abs(x) < 12) & (y > -35) & (y < 10) & (z > -15) & (z < 20),
        "hemispheric": (np.abs(x) > 20) & (z > 5),
    }
