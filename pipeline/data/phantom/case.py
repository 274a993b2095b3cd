"""Synthetic cohort (phantom): render one case from its cohort-level draws and write its files.

``<id>/image.nii.gz``, the mask (``mask.nii.gz`` or ``mask_truth.nii.gz``), ``to_atlas.tfm`` and
``truth.json`` (see :mod:`pipeline.data.phantom.build` for the layout).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.data.phantom.acquisition import (
    Acquisition,
    acquire_native,
    corrupt_image,
    sample_acquisition,
    to_image,
)
from pipeline.data.phantom.anatomy import RAS_FROM_LPS, Anatomy, voxel_lps
from pipeline.data.phantom.config import APPEARANCES, CLASSES, REGIONS, PhantomConfig
from pipeline.data.phantom.realism import (
    Realism,
    draw_core_appearance,
    draw_realism,
    grow_oedema,
    push_from_tumour,
    warp_anatomy,
    wmh_weight,
)
from pipeline.data.phantom.tumour import Tumour, add_satellites, make_tumour, render_flair, render_t2
from pipeline.io.imageio import write_image_atomic, write_text_atomic
from pipeline.registration.transforms import write_transform_atomic

__all__ = ["CONTRASTS", "CaseSpec", "render_case", "write_case_files", "write_json_atomic"]

#: The contrasts the generator renders; ``flair`` is always the first (``image.nii.gz``).
CONTRASTS = ("flair", "t2")


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _write_transform_atomic(tfm: sitk.Transform, path: Path) -> None:
    write_transform_atomic(tfm, path)


def _orientation_code(direction: np.ndarray) -> str:
    """Nearest NIfTI-style axis code (e.g. ``LAS``) of an ITK (LPS) direction matrix."""
    ras = direction * RAS_FROM_LPS[:, None]
    letters = []
    for col in ras.T:
        a = int(np.argmax(np.abs(col)))
        letters.append(("RAS" if col[a] > 0 else "LPI")[a])
    return "".join(letters)


@dataclass(frozen=True)
class CaseSpec:
    """Cohort-level draws of one case."""

    cid: str
    cls: int
    region: int
    appearance: int
    skull: bool
    has_label: bool
    has_class: bool
    seed: np.random.SeedSequence


def render_case(spec: CaseSpec, anat: Anatomy, space: str, config: PhantomConfig, contrasts: tuple[str, ...] = ("flair",)
                 ) -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform, dict[str, Any], dict[str, sitk.Image]]:
    """Build one case: the FLAIR image, mask, atlas -> native transform, truth record, and the other
    ``contrasts`` (``{"t2": image}``) on the FLAIR's grid, from random streams of their own (the
    FLAIR, mask and transform do not depend on them)."""
    anat_rng, acq_rng = (np.random.default_rng(s) for s in spec.seed.spawn(2))
    realism, wmh, real_rng = None, None, None
    if config.renders_realism:  # a stream of its own: the study's cohort never draws from it
        real_rng = _stream(spec, 2000)
        realism = draw_realism(config, real_rng)
        if config.iso_core_fraction > 0:  # a stream of its own: the other realistic draws stay
            realism = draw_core_appearance(config, realism, _stream(spec, 4000))
        anat = warp_anatomy(anat, config.deform_mm, real_rng)
    tumour = make_tumour(anat, REGIONS[spec.region], APPEARANCES[spec.appearance] == "cystic", anat_rng, config)
    if realism is not None and real_rng is not None:
        anat, tumour, wmh = _make_realistic(anat, tumour, realism, real_rng)
    satellites: list[float] = []
    if config.satellite_fraction > 0:  # a stream of its own, as the realistic pieces
        sat_rng = _stream(spec, 3000)
        if sat_rng.random() < config.satellite_fraction:
            tumour, satellites = add_satellites(anat, tumour, int(sat_rng.integers(1, 3)), sat_rng,
                                                config.satellite_ml, config.satellite_distance_mm)
    flair, head_mm = render_flair(anat, tumour, spec.skull, anat_rng, realism, wmh)
    mask = np.zeros(anat.brain.shape, dtype=bool)
    mask[tumour.box] = tumour.mask
    acq = sample_acquisition(acq_rng, config, anat.spacing)
    signal, seg, tfm = _acquire(anat, flair, mask, head_mm, acq, space, config)
    image = to_image(corrupt_image(sitk.GetArrayFromImage(signal), acq, acq_rng), signal, sitk.sitkFloat32)
    truth = _truth_record(spec, anat, tumour, acq, space, image, seg, tfm)
    truth["lesions"] = 1 + len(satellites)
    truth["satellite_volumes_ml_atlas"] = [round(v, 3) for v in satellites]
    if realism is not None:
        oedema = 0.0 if tumour.oedema is None else float(tumour.oedema.sum()) * anat.spacing**3 / 1000.0
        truth["realism"] = {**asdict(realism), "oedema_volume_ml_atlas": round(oedema, 3),
                            "wmh_volume_ml_atlas": round(float(wmh.sum()) * anat.spacing**3 / 1000.0, 3)
                            if wmh is not None else 0.0}
    others: dict[str, sitk.Image] = {}
    for k, name in enumerate(c for c in contrasts if c != "flair"):
        if name != "t2":
            raise ValueError(f"unknown contrast {name!r}; known: {CONTRASTS}")
        rng = _stream(spec, 1000 + k)
        t2 = render_t2(anat, tumour, head_mm, rng, wmh)
        t2_signal = _acquire(anat, t2, mask, head_mm, acq, space, config)[0]
        others[name] = to_image(corrupt_image(sitk.GetArrayFromImage(t2_signal), acq, rng), signal, sitk.sitkFloat32)
    return image, seg, tfm, truth, others


def _stream(spec: CaseSpec, key: int) -> np.random.Generator:
    """A random stream of the case's own, independent of its anatomy and acquisition streams."""
    return np.random.default_rng(np.random.SeedSequence(spec.seed.entropy, spawn_key=(*spec.seed.spawn_key, key)))


def _make_realistic(anat: Anatomy, tumour: Tumour, realism: Realism, rng: np.random.Generator
                    ) -> tuple[Anatomy, Tumour, np.ndarray | None]:
    """Mass effect around the drawn core, then its oedema, then the white-matter hyperintensities
    (on the displaced anatomy; the tumour is painted over them)."""
    radius_mm = (3.0 * tumour.target_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    anat = push_from_tumour(anat, tumour.centre_zyx, radius_mm, realism.mass)
    if realism.oedema_mm > 0:
        box, core, oedema, depth = grow_oedema(anat, tumour.box, tumour.mask, realism.oedema_mm, rng)
        cyst = np.zeros_like(core)
        cyst[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(tumour.box, box, strict=True))] = tumour.cyst
        tumour = replace(tumour, box=box, mask=core | oedema, cyst=cyst, oedema=oedema, oedema_depth=depth)
    return anat, tumour, wmh_weight(anat, rng) if realism.wmh else None


def _acquire(anat: Anatomy, volume: np.ndarray, mask: np.ndarray, head_mm: float, acq: Acquisition, space: str,
             config: PhantomConfig) -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform]:
    if space == "atlas":
        return to_image(volume, anat.grid, sitk.sitkFloat32), to_image(
            mask.astype(np.uint8), anat.grid, sitk.sitkUInt8), sitk.AffineTransform(3)
    return acquire_native(anat, volume, mask, head_mm, acq, config.margin_mm)


def _truth_record(spec: CaseSpec, anat: Anatomy, tumour: Tumour, acq: Acquisition, space: str,
                  image: sitk.Image, seg: sitk.Image, tfm: sitk.AffineTransform) -> dict[str, Any]:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre_ras = voxel_lps(anat.grid, np.array([tumour.centre_zyx]))[0] * RAS_FROM_LPS
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


def write_case_files(folder: Path, image: sitk.Image, seg: sitk.Image, tfm: sitk.Transform,
                truth: dict[str, Any], others: dict[str, sitk.Image] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_image_atomic(image, folder / "image.nii.gz")
    for name, other in (others or {}).items():
        write_image_atomic(other, folder / f"{name}.nii.gz")
    write_image_atomic(seg, folder / truth["mask_file"])
    stale = folder / ("mask_truth.nii.gz" if truth["mask_file"] == "mask.nii.gz" else "mask.nii.gz")
    stale.unlink(missing_ok=True)
    _write_transform_atomic(tfm, folder / "to_atlas.tfm")
    write_json_atomic(truth, folder / "truth.json")
