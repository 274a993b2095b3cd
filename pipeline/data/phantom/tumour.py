"""Synthetic cohort (phantom): one irregular tumour (optionally cystic, optionally with satellite
lesions) and the FLAIR-like atlas-space volume, and on request a T2-like second contrast of the same head.

The first two draw from the case's anatomy stream, in the order :func:`make_tumour` then
:func:`render_flair`; :func:`render_t2` draws from a stream of its own, so asking for it leaves the
FLAIR, the mask and the acquisition bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from pipeline.data.phantom.anatomy import Anatomy
from pipeline.data.phantom.config import PhantomConfig
from pipeline.data.phantom.realism import Realism

__all__ = ["Tumour", "add_satellites", "make_tumour", "render_flair", "render_t2"]

CUBE = np.ones((3, 3, 3), bool)  # the 26-neighbourhood


@dataclass(frozen=True)
class Tumour:
    """A tumour in a box of the atlas grid: ``box`` slices (z, y, x) and boolean masks inside it.

    ``mask`` is the whole tumour (core, cyst and oedema); ``oedema`` (``None``: none) is the part
    of it around the core, and ``oedema_depth`` each oedema voxel's depth towards its margin (0 at
    the core, 1 at the edge).
    """

    box: tuple[slice, slice, slice]
    mask: np.ndarray
    cyst: np.ndarray
    centre_zyx: tuple[int, int, int]
    target_ml: float
    oedema: np.ndarray | None = None
    oedema_depth: np.ndarray | None = None


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
    centre = anat.centres[region][rng.integers(len(anat.centres[region]))]
    lo, hi = np.log(config.volume_ml)
    volume_ml = float(np.exp(rng.uniform(lo, hi)))
    return _grow(anat, centre, volume_ml, cystic, rng)


def _grow(anat: Anatomy, centre: np.ndarray, volume_ml: float, cystic: bool, rng: np.random.Generator) -> Tumour:
    """The tumour of :func:`make_tumour` around a given centre and volume."""
    s = anat.spacing
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


def add_satellites(anat: Anatomy, tumour: Tumour, count: int, rng: np.random.Generator,
                   volume_ml: tuple[float, float], distance_mm: tuple[float, float]) -> tuple[Tumour, list[float]]:
    """``count`` small solid lesions apart from the tumour (a satellite or multifocal disease).

    Each is grown as :func:`make_tumour` grows a tumour, around a tumour-centre candidate of any
    region whose distance to the main centre lies in ``distance_mm``, cut to at least two voxels
    (26-neighbourhood) from every lesion already placed, so that it stays a lesion of its own, with a volume drawn
    log-uniformly in ``volume_ml``. The returned tumour's box covers every lesion; its mask, cyst
    and oedema are the union (a satellite has neither cyst nor oedema); its centre and target
    volume stay the main tumour's (the class cue is the main tumour's region).

    Returns:
        The tumour with its satellites, and each satellite's volume in mL (fewer than ``count``
        when no candidate is left).
    """
    shape = anat.brain.shape
    full = np.zeros(shape, bool)
    full[tumour.box] = tumour.mask
    candidates = np.concatenate(list(anat.centres.values()))  # tumour-centre candidates: deep in the brain
    dist_mm = np.linalg.norm((candidates - np.asarray(tumour.centre_zyx)) * anat.spacing, axis=1)
    candidates = candidates[(dist_mm >= distance_mm[0]) & (dist_mm <= distance_mm[1])]
    parts, volumes = [], []
    lo, hi = np.log(volume_ml)
    for _ in range(count):
        taken = ndimage.binary_dilation(full, structure=CUBE, iterations=2)  # 26-neighbourhood, as lesions are counted
        free = candidates[~taken[tuple(candidates.T)]] if len(candidates) else candidates
        if not len(free):
            break
        sat = _grow(anat, free[rng.integers(len(free))], float(np.exp(rng.uniform(lo, hi))), False, rng)
        piece = np.zeros(shape, bool)
        piece[sat.box] = sat.mask
        piece &= ~taken
        labels, n = ndimage.label(piece, structure=CUBE)
        if n > 1:
            piece = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        if not piece.any():
            continue
        full |= piece
        parts.append(piece)
        volumes.append(float(piece.sum()) * anat.spacing**3 / 1000.0)
    if not parts:
        return tumour, volumes
    zyx = np.nonzero(full)
    box = tuple(slice(int(min(a.min(), b.start)), int(max(a.max() + 1, b.stop)))
                for a, b in zip(zyx, tumour.box, strict=True))

    def embed(local: np.ndarray | None) -> np.ndarray | None:
        if local is None:
            return None
        out = np.zeros(tuple(b.stop - b.start for b in box), local.dtype)
        out[tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tumour.box, box, strict=True))] = local
        return out

    mask = full[box]
    return replace(tumour, box=box, mask=mask, cyst=embed(tumour.cyst), oedema=embed(tumour.oedema),  # type: ignore[arg-type]
                   oedema_depth=embed(tumour.oedema_depth)), volumes


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


def _blend(img: np.ndarray, mask: np.ndarray, level: np.ndarray | float, inside: np.ndarray | float = 1.0) -> np.ndarray:
    """``img`` blended towards ``level`` over ``mask`` (weight ``inside`` there, at least 0.7 of
    it), with a half-voxel soft edge."""
    w = np.where(mask, inside, 0.0).astype(np.float32)
    weight = np.clip(ndimage.gaussian_filter(w, 0.5), 0.0, 1.0)
    weight = np.where(mask, np.maximum(weight, 0.7 * w), weight)
    return img * (1.0 - weight) + level * weight


def render_flair(anat: Anatomy, tumour: Tumour, skull: bool, rng: np.random.Generator,
                 realism: Realism | None = None, wmh: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """FLAIR-like atlas-space volume (GM = 1) with the tumour painted in.

    Args:
        realism: the case's realistic draws (tissue levels, oedema and hyperintensity levels);
            ``None``: the study's phantom.
        wmh: white-matter hyperintensities as a blending weight on the atlas grid, or ``None``.

    Returns:
        The float32 array (z, y, x) and the head's outer radius beyond the brain hull in mm
        (0 without skull).
    """
    img = anat.gm + rng.uniform(0.7, 0.85) * anat.wm + rng.uniform(0.08, 0.2) * anat.csf
    ref = 1.0  # the brightest parenchyma: lesions are painted relative to it
    if realism is not None and realism.levels is not None:
        gm, wm, csf = realism.levels
        img = gm * anat.gm + wm * anat.wm + csf * anat.csf
        ref = max(gm, wm)
    img *= 1.0 + 0.04 * _unit_noise(img.shape, max(0.5, 1.5 / anat.spacing), rng)
    if wmh is not None and realism is not None:
        img = img * (1.0 - wmh) + realism.wmh_level * ref * wmh
    head_mm = 0.0
    if skull:
        shell, head_mm = _skull_shell(anat.outside_mm, rng)
        img += shell
    b = tumour.box
    level = rng.uniform(1.35, 1.7) * (1.0 + 0.06 * _unit_noise(tumour.mask.shape, max(0.5, 1.5 / anat.spacing), rng))
    level = np.where(tumour.cyst, rng.uniform(0.15, 0.35), level)
    if tumour.oedema is None or realism is None:
        img[b] = _blend(img[b], tumour.mask, level if ref == 1.0 else ref * level)
        return img.astype(np.float32), head_mm
    # oedema fades towards its infiltrative margin (half the contrast at the edge), then the core
    img[b] = _blend(img[b], tumour.oedema, realism.oedema_level * ref, 1.0 - 0.5 * tumour.oedema_depth**2)
    core = tumour.mask & ~tumour.oedema
    if realism.core_level is not None:
        level = _high_grade_core(core, tumour.cyst, realism, anat.spacing, rng)
    img[b] = _blend(img[b], core, ref * level)
    return img.astype(np.float32), head_mm


def _high_grade_core(core: np.ndarray, cyst: np.ndarray, realism: Realism, spacing: float,
                     rng: np.random.Generator) -> np.ndarray:
    """A high-grade core's FLAIR levels (relative to the brightest parenchyma) in its box: near
    ``realism.core_level`` with a coarse texture (15 % std), the deepest ``realism.necrosis`` of it
    at the necrotic level, a cyst as the study's."""
    level = realism.core_level * (1.0 + 0.15 * _unit_noise(core.shape, max(0.5, 3.0 / spacing), rng))
    if realism.necrosis > 0 and core.any():
        depth = ndimage.distance_transform_edt(core)
        level = np.where(depth > (1.0 - realism.necrosis) * depth.max(), realism.necrosis_level, level)
    return np.where(cyst, rng.uniform(0.15, 0.35), level).astype(np.float32)


def render_t2(anat: Anatomy, tumour: Tumour, head_mm: float, rng: np.random.Generator,
              wmh: np.ndarray | None = None) -> np.ndarray:
    """T2-like atlas-space volume of the same head (GM = 1): CSF brightest, white matter darker than
    grey, the tumour (oedema included) bright and a cyst brighter still (fluid), where FLAIR darkens
    CSF and cysts. The second contrast therefore tells a cyst from the surrounding brain where FLAIR
    alone makes it look like CSF.

    Args:
        head_mm: the head's outer radius beyond the brain hull (:func:`render_flair`'s), 0 without skull.
        wmh: white-matter hyperintensities (weight on the atlas grid), painted at 1.4, or ``None``.

    Returns:
        The float32 array (z, y, x).
    """
    img = anat.gm + rng.uniform(0.55, 0.7) * anat.wm + rng.uniform(1.8, 2.4) * anat.csf
    img *= 1.0 + 0.04 * _unit_noise(img.shape, max(0.5, 1.5 / anat.spacing), rng)
    if wmh is not None:
        img = img * (1.0 - wmh) + 1.4 * wmh
    if head_mm > 0:  # the FLAIR's shell radii (scalp = 14 f mm): CSF bright, bone dark, scalp fat mid-grey
        f, out = head_mm / 14.0, anat.outside_mm
        img[(out > 0) & (out <= 2.0 * f)] = rng.uniform(1.6, 2.2)
        img[(out > 2.0 * f) & (out <= 8.0 * f)] = rng.uniform(0.02, 0.08)
        img[(out > 8.0 * f) & (out <= 14.0 * f)] = rng.uniform(0.6, 0.9)
    b = tumour.box
    level = rng.uniform(1.5, 1.9) * (1.0 + 0.06 * _unit_noise(tumour.mask.shape, max(0.5, 1.5 / anat.spacing), rng))
    level = np.where(tumour.cyst, rng.uniform(2.2, 2.6), level)
    img[b] = _blend(img[b], tumour.mask, level)
    return img.astype(np.float32)
