"""Satellite lesions in the synthetic cohort: separate, bright, counted in truth.json, and the
main tumour left as the study's cohort draws it (coarse 4 mm atlas grid: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.data.boxes import lesion_boxes
from pipeline.data.phantom.anatomy import load_anatomy
from pipeline.data.phantom.build import main, make_cohort
from pipeline.data.phantom.config import PhantomConfig
from pipeline.io.errors import InputError

SPACING, CASES, SEED = 4.0, 4, 5


def _read(root: Path, cid: str) -> tuple[np.ndarray, np.ndarray, dict]:
    truth = json.loads((root / cid / "truth.json").read_text(encoding="utf-8"))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(root / cid / "image.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / cid / truth["mask_file"]))) > 0
    return image, mask, truth


def test_satellites_are_separate_bright_lesions_beside_the_studys_tumour(tmp_path: Path) -> None:
    study, sat = tmp_path / "study", tmp_path / "sat"
    make_cohort(study, CASES, SEED, SPACING, "atlas")
    make_cohort(sat, CASES, SEED, SPACING, "atlas", config=PhantomConfig(satellite_fraction=1.0))
    anat = load_anatomy(SPACING)
    counts = []
    for k in range(CASES):
        cid = f"c{k:03d}"
        image, mask, truth = _read(sat, cid)
        _, core, core_truth = _read(study, cid)
        assert core_truth["lesions"] == 1 and core_truth["satellite_volumes_ml_atlas"] == []
        assert (core <= mask).all(), "the main tumour is the study's"
        extra = mask & ~core
        labels, n = ndimage.label(extra, structure=np.ones((3, 3, 3)))
        assert n == truth["lesions"] - 1 == len(truth["satellite_volumes_ml_atlas"])
        assert sorted(np.bincount(labels.ravel())[1:] * SPACING**3 / 1000) == pytest.approx(
            sorted(truth["satellite_volumes_ml_atlas"]), abs=1e-3)
        # each satellite its own lesion (not touching the tumour), as a detector must count them
        assert len(lesion_boxes(mask, (SPACING,) * 3, min_volume_mm3=0.0)) == truth["lesions"]
        if n:
            normal = anat.brain & ~ndimage.binary_dilation(mask, iterations=2) & (anat.wm > 0.8)
            assert np.median(image[extra]) > 1.1 * np.median(image[normal]), "satellites are hyperintense"
        counts.append(truth["lesions"])
    assert max(counts) >= 2 and set(counts) <= {1, 2, 3}


def test_satellites_cli_and_knobs(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--cases", "2", "--seed", "1", "--spacing", "4", "--space", "atlas",
                 "--satellites", "1"]) == 0
    data = json.loads((tmp_path / "datalist.json").read_text(encoding="utf-8"))
    assert data["phantom"]["config"]["satellite_fraction"] == 1.0
    for knobs in ({"satellite_fraction": 1.5}, {"satellite_ml": (3.0, 1.0)}, {"satellite_distance_mm": (0.0, 10.0)}):
        with pytest.raises(InputError):
            PhantomConfig(**knobs)  # type: ignore[arg-type]
