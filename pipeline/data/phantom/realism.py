"""Synthetic cohort (phantom): what real tumours and real brains add to the study's phantom.

Each piece is off in :class:`~pipeline.data.phantom.config.PhantomConfig`'s defaults (the study's
cohort, the demo's and the tests') and on in :meth:`PhantomConfig.realistic`
(``python -m pipeline phantom --profile realistic``); every draw comes from a random stream of the
case's own that the default cohort never touches, so the default cohort stays bit-identical.

- **Anatomy that varies**: a smooth random deformation of the MNI152 tissue maps (SynthSeg's
  idea, Billot et al. 2023: no two brains share the template's shape) and mass effect, tissue
  pushed away from the tumour centre (ventricles and midline displaced).
- **Tissue contrast at random**: grey, white matter and CSF levels drawn per case instead of
  FLAIR's fixed ordering (the tumour stays brighter than the parenchyma, as in FLAIR and T2).
- **Oedema**: a hyperintense rim around the core that spreads along white matter, spares CSF,
  and fades towards an infiltrative margin; it belongs to the whole-tumour mask (BraTS's label).
- **High-grade cores**: some cores with oedema near the parenchyma's FLAIR level, with a necrotic
  centre, the oedema then the brightest part of the tumour.
- **White-matter hyperintensities** that are *not* tumour: periventricular caps and punctate
  deep white-matter foci at oedema-like levels, outside the mask.

Written here rather than taken from a package: SynthSeg and TorchIO's ``RandomElasticDeformation``
deform images, not this generator's tissue maps before rendering, and no package renders a
glioma with oedema onto label maps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from pipeline.data.phantom.anatomy import Anatomy
from pipeline.data.phantom.config import PhantomConfig

__all__ = ["Realism", "draw_realism", "draw_core_appearance", "warp_anatomy", "push_from_tumour", "grow_oedema", "wmh_weight"]


@dataclass(frozen=True)
class Realism:
    """One case's draws for the realistic pieces (``None`` / 0: that piece is off).

    Attributes:
        levels: grey matter, white matter and CSF intensity (grey matter = 1), or ``None`` for the
            study's FLAIR-like draw.
        oedema_mm: how far the oedema reaches beyond the core along white matter (0: none).
        oedema_level: the oedema's intensity relative to the brightest parenchyma.
        mass: mass-effect displacement at the tumour centre, as a fraction of the core's radius.
        wmh: whether the case has white-matter hyperintensities.
        wmh_level: their intensity relative to the brightest parenchyma.
        core_level: a high-grade core's mean FLAIR level relative to the brightest parenchyma, or
            ``None`` for the study's bright core (:func:`draw_core_appearance`).
        necrosis: the share of the core's depth that is necrotic (0: none), at ``necrosis_level``.
    """

    levels: tuple[float, float, float] | None
    oedema_mm: float
    oedema_level: float
    mass: float
    wmh: bool
    wmh_level: float
    core_level: float | None = None
    necrosis: float = 0.0
    necrosis_level: float = 0.0


def draw_realism(config: PhantomConfig, rng: np.random.Generator) -> Realism:
    """Draw the realistic pieces of one case from its own stream (a fixed number of draws)."""
    u = rng.random(4)
    levels = (1.0, float(rng.uniform(0.45, 1.3)), float(rng.uniform(0.05, 1.1)))
    oedema_mm = float(rng.uniform(*config.oedema_mm))
    oedema_level = float(rng.uniform(1.12, 1.5))
    mass = float(rng.uniform(*config.mass_effect))
    wmh_level = float(rng.uniform(1.12, 1.45))
    return Realism(levels=levels if u[0] < config.random_contrast_fraction else None,
                   oedema_mm=oedema_mm if u[1] < config.oedema_fraction else 0.0, oedema_level=oedema_level,
                   mass=mass, wmh=bool(u[2] < config.wmh_fraction), wmh_level=wmh_level)


def draw_core_appearance(config: PhantomConfig, realism: Realism, rng: np.random.Generator) -> Realism:
    """Whether a core with oedema is drawn as a high-grade glioma's core on FLAIR, from a stream of
    its own (a fixed number of draws; the other realistic draws are unchanged).

    On FLAIR the hyperintensity of a glioblastoma is mostly its oedema and infiltrated margin; the
    enhancing rim is near the parenchyma's level and the necrotic centre anywhere from fluid-dark to
    mildly bright. The study's phantom paints every solid core brighter than anything else, so a
    network trained on it learns "the bright blob" and leaves such cores, and the oedema whose
    contrast is no higher than theirs, unsegmented. Ranges are design choices from radiological
    descriptions of high-grade gliomas, not fitted to any scan.
    """
    u = rng.random(2)
    level, necrosis, necrosis_level = rng.uniform(0.8, 1.15), rng.uniform(0.3, 0.8), rng.uniform(0.35, 1.1)
    if realism.oedema_mm <= 0 or u[0] >= config.iso_core_fraction:
        return realism
    return replace(realism, core_level=float(level), necrosis=float(necrosis) if u[1] < 0.7 else 0.0,
                   necrosis_level=float(necrosis_level))


def _warp(arr: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    return ndimage.map_coordinates(arr.astype(np.float32), coords, order=order, mode="nearest").astype(np.float32)


def _with_maps(anat: Anatomy, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, **other: np.ndarray) -> Anatomy:
    arrays = {"gm": gm, "wm": wm, "csf": csf, **other}
    for arr in arrays.values():
        arr.flags.writeable = False
    return replace(anat, **arrays)


def warp_anatomy(anat: Anatomy, deform_mm: float, rng: np.random.Generator) -> Anatomy:
    """The anatomy under a smooth random deformation: displacements drawn on a coarse grid (one
    node every 32 mm, std ``deform_mm``) and interpolated cubically, as SynthSeg draws its fields.
    Tissue maps, brain mask and skull distance move together; tumour-centre candidates keep their
    indices (they stay at least ``min_depth_mm`` minus the displacement inside the brain)."""
    if deform_mm <= 0:
        return anat
    shape = anat.brain.shape
    nodes = tuple(max(2, int(np.ceil(n * anat.spacing / 32.0)) + 1) for n in shape)
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coarse = rng.normal(0.0, deform_mm / anat.spacing, nodes).astype(np.float32)
        coords[axis] += ndimage.zoom(coarse, [n / c for n, c in zip(shape, nodes, strict=True)], order=3,
                                     mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    brain = _warp(anat.brain, coords) > 0.5
    gm, wm = _warp(anat.gm, coords) * brain, _warp(anat.wm, coords) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    return _with_maps(anat, gm.astype(np.float32), wm.astype(np.float32), csf, brain=brain,
                      outside_mm=_warp(anat.outside_mm, coords))


def push_from_tumour(anat: Anatomy, centre_zyx: tuple[int, int, int], radius_mm: float, mass: float) -> Anatomy:
    """Mass effect: grey, white matter and CSF pushed radially away from the tumour centre by
    ``mass * radius_mm`` there, fading as a Gaussian of width ``2.5 * radius_mm``; the brain's
    outline stays (tissue is compressed against it), so ventricles and the midline shift."""
    if mass <= 0:
        return anat
    shape = anat.brain.shape
    idx = np.indices(shape, dtype=np.float32)
    offset = idx - np.asarray(centre_zyx, dtype=np.float32).reshape(3, 1, 1, 1)
    r_vox = np.sqrt((offset**2).sum(axis=0)) + 1e-3
    r_mm = r_vox * anat.spacing
    shift_vox = mass * radius_mm / anat.spacing * np.exp(-((r_mm / (2.5 * radius_mm)) ** 2))
    shift_vox = np.minimum(shift_vox, r_vox)  # never sample from beyond the centre
    coords = idx - offset / r_vox * shift_vox
    brain = anat.brain
    gm, wm = _warp(anat.gm, coords) * brain, _warp(anat.wm, coords) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    return _with_maps(anat, gm.astype(np.float32), wm.astype(np.float32), csf)


def grow_oedema(anat: Anatomy, box: tuple[slice, ...], core: np.ndarray, reach_mm: float, rng: np.random.Generator
                ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """Oedema around a core mask: brain voxels within a reach of the core that is long in white
    matter (``reach_mm``) and short in grey matter (30 % of it), with an irregular edge (smooth
    noise on the reach), never in CSF, connected to the core.

    Args:
        box: the core's box on the atlas grid; core: its mask inside that box.

    Returns:
        The enlarged box, the core and the oedema masks in it, and each oedema voxel's depth
        towards its margin (0 at the core, 1 at the edge; 0 outside the oedema).
    """
    s = anat.spacing
    pad = int(np.ceil(1.3 * reach_mm / s)) + 1
    shape_full = anat.brain.shape
    big = tuple(slice(max(0, b.start - pad), min(n, b.stop + pad)) for b, n in zip(box, shape_full, strict=True))
    core_big = np.zeros(tuple(b.stop - b.start for b in big), dtype=bool)
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, big, strict=True))
    core_big[inner] = core
    dist = ndimage.distance_transform_edt(~core_big, sampling=s)
    wm = ndimage.gaussian_filter(anat.wm[big].astype(np.float32), 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(core_big.shape).astype(np.float32), 4.0 / s)
    noise = (noise - noise.mean()) / (noise.std() + 1e-8)
    reach = reach_mm * (0.3 + 0.7 * np.clip(wm / 0.6, 0.0, 1.0)) * np.exp(0.25 * noise)
    oedema = anat.brain[big] & (anat.csf[big] < 0.5) & ~core_big & (dist <= reach)
    labels, _ = ndimage.label(oedema | core_big)
    touching = np.unique(labels[core_big])
    oedema &= np.isin(labels, touching[touching > 0])
    depth = np.where(oedema, np.clip(dist / np.maximum(reach, 1e-3), 0.0, 1.0), 0.0).astype(np.float32)
    return big, core_big, oedema, depth  # type: ignore[return-value]


def wmh_weight(anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Where white-matter hyperintensities are, as a blending weight in [0, 1] on the atlas grid:
    periventricular caps (white matter within 1-5 mm of the deep CSF, irregular) and 0-10 punctate
    foci of 1.5-4 mm radius in deep white matter."""
    s = anat.spacing
    depth = ndimage.distance_transform_edt(anat.brain, sampling=s)
    ventricles = (anat.csf > 0.5) & (depth > 15.0)
    near = ndimage.distance_transform_edt(~ventricles, sampling=s)
    noise = ndimage.gaussian_filter(rng.standard_normal(anat.brain.shape).astype(np.float32), 3.0 / s)
    noise = (noise - noise.mean()) / (noise.std() + 1e-8)
    caps = (anat.wm > 0.4) & ~ventricles & (near <= rng.uniform(1.0, 5.0) * np.exp(0.35 * noise))
    deep = np.argwhere((anat.wm > 0.7) & (depth > 12.0))
    foci = np.zeros_like(caps)
    if len(deep):
        idx = np.indices(anat.brain.shape, sparse=True)
        for centre in deep[rng.integers(len(deep), size=int(rng.integers(0, 11)))]:
            r = rng.uniform(1.5, 4.0) / s
            foci |= sum((i - c) ** 2 for i, c in zip(idx, centre, strict=True)) <= r * r
    return np.clip(ndimage.gaussian_filter((caps | (foci & anat.brain)).astype(np.float32), 0.6), 0.0, 1.0)
