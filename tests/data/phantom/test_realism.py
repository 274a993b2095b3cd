"""Synthetic cohort, realistic profile: oedema in the mask, hyperintensities outside it, random
contrast as drawn, anatomy deformed and pushed by the tumour; the study's cohort untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.data.phantom.anatomy import load_anatomy
from pipeline.data.phantom.build import main, make_cohort
from pipeline.data.phantom.config import PhantomConfig
from pipeline.data.phantom.realism import push_from_tumour, warp_anatomy
from pipeline.io.errors import InputError

SPACING = 4.0  # coarse grid: fast
CASES = 4
SEED = 7


def _arrays(root: Path, cid: str) -> tuple[np.ndarray, np.ndarray, dict]:
    truth = json.loads((root / cid / "truth.json").read_text(encoding="utf-8"))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(root / cid / "image.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / cid / truth["mask_file"]))) > 0
    return image, mask, truth


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    make_cohort(out, CASES, SEED, SPACING, "atlas")
    return out


def _cohort(tmp_path: Path, **knobs: object) -> Path:
    make_cohort(tmp_path, CASES, SEED, SPACING, "atlas", config=PhantomConfig(**knobs))  # type: ignore[arg-type]
    return tmp_path


def test_oedema_grows_the_mask_around_the_same_core(study: Path, tmp_path: Path) -> None:
    out = _cohort(tmp_path, oedema_fraction=1.0, oedema_mm=(8.0, 12.0))
    anat = load_anatomy(SPACING)
    for k in range(CASES):
        cid = f"c{k:03d}"
        image, mask, truth = _arrays(out, cid)
        core_image, core, _ = _arrays(study, cid)
        oedema = mask & ~core
        assert (core <= mask).all(), "the core is the study's tumour, inside the whole-tumour mask"
        assert truth["realism"]["oedema_volume_ml_atlas"] == pytest.approx(oedema.sum() * SPACING**3 / 1000, abs=1e-3)
        assert oedema.sum() > 0.2 * core.sum()
        assert ndimage.label(mask)[1] == 1, "oedema is connected to its core"
        assert anat.csf[oedema].mean() < 0.5 and anat.brain[oedema].all()
        reach = ndimage.distance_transform_edt(~core, sampling=SPACING)[oedema]
        assert reach.max() <= 12.0 * 1.3 * np.exp(0.25 * 5) + SPACING
        normal = anat.brain & ~ndimage.binary_dilation(mask, iterations=2) & (anat.wm > 0.8)
        assert np.median(image[oedema]) > 1.1 * np.median(image[normal]), "oedema is hyperintense"


def test_high_grade_cores_are_not_the_bright_part_and_change_nothing_else(study: Path, tmp_path: Path) -> None:
    knobs = {"oedema_fraction": 1.0, "oedema_mm": (8.0, 12.0)}
    bright = _cohort(tmp_path / "bright", **knobs)
    iso = _cohort(tmp_path / "iso", iso_core_fraction=1.0, **knobs)
    anat = load_anatomy(SPACING)
    checked = 0
    for k in range(CASES):
        cid = f"c{k:03d}"
        image, mask, truth = _arrays(iso, cid)
        bright_image, bright_mask, bright_truth = _arrays(bright, cid)
        core = _arrays(study, cid)[1]
        assert np.array_equal(mask, bright_mask), "the same tumour, only painted differently"
        assert truth["realism"]["core_level"] is not None and bright_truth["realism"]["core_level"] is None
        same = {key for key in truth["realism"] if key not in ("core_level", "necrosis", "necrosis_level")}
        assert {key: truth["realism"][key] for key in same} == {key: bright_truth["realism"][key] for key in same}
        far = ~ndimage.binary_dilation(mask, np.ones((3, 3, 3)), iterations=2)  # past the blend's soft edge
        assert np.array_equal(image[far], bright_image[far]), "outside the tumour, the same scan"
        parenchyma = np.median(bright_image[anat.brain & far & (anat.gm > 0.8)])
        solid = ndimage.binary_erosion(core) & (bright_image > 0.8 * parenchyma)  # the cyst left out
        if solid.sum() < 5:
            continue
        checked += 1
        assert np.median(bright_image[solid]) > 1.25 * parenchyma, "the study's core is the bright part"
        # 0.8-1.15 drawn; at 4 mm the core is mostly edge, where the blend keeps up to 30 % of the oedema
        assert 0.6 * parenchyma < np.median(image[solid]) < 1.3 * parenchyma, "near the parenchyma's level"
        assert np.median(image[solid]) < np.median(bright_image[solid]) - 0.15 * parenchyma
    assert checked >= 2


def test_white_matter_hyperintensities_are_bright_and_not_in_the_mask(study: Path, tmp_path: Path) -> None:
    out = _cohort(tmp_path, wmh_fraction=1.0)
    anat = load_anatomy(SPACING)
    for k in range(CASES):
        cid = f"c{k:03d}"
        image, mask, truth = _arrays(out, cid)
        study_image, study_mask, _ = _arrays(study, cid)
        assert np.array_equal(mask, study_mask), "hyperintensities never enter the tumour mask"
        assert truth["realism"]["wmh"] and truth["realism"]["wmh_volume_ml_atlas"] > 0
        outside = ~ndimage.binary_dilation(mask, iterations=2)
        gain = np.clip(image - study_image, 0.0, None) * outside  # same acquisition: same scale and noise
        assert gain.sum() > 0
        assert (anat.wm * gain).sum() / gain.sum() > 1.2 * anat.wm[anat.brain].mean(), "they lie in white matter"


def test_random_contrast_renders_the_drawn_tissue_levels(tmp_path: Path) -> None:
    out = _cohort(tmp_path, random_contrast_fraction=1.0)
    anat = load_anatomy(SPACING)
    ratios = []
    for k in range(CASES):
        image, mask, truth = _arrays(out, f"c{k:03d}")
        gm, wm, csf = truth["realism"]["levels"]
        far = anat.brain & ~ndimage.binary_dilation(mask, iterations=3)
        # the image as a mix of the tissue fractions (partial volume): its coefficients are the levels
        fractions = np.stack([anat.gm[far], anat.wm[far], anat.csf[far]], axis=1)
        coef = np.linalg.lstsq(fractions, image[far], rcond=None)[0]
        measured = coef / coef[0]
        assert measured[1] == pytest.approx(wm / gm, rel=0.1) and measured[2] == pytest.approx(csf / gm, abs=0.1)
        ratios.append(measured[1])
        parenchyma = far & ((anat.gm > 0.8) | (anat.wm > 0.8))
        assert np.median(image[mask]) > np.median(image[parenchyma]), "the tumour stays hyperintense"
    assert max(ratios) - min(ratios) > 0.1, "contrast differs between cases"


def test_mass_effect_pushes_ventricles_away_and_keeps_the_brain() -> None:
    anat = load_anatomy(SPACING)
    ventricles = np.argwhere(anat.csf > 0.5)
    centre = tuple(int(v) for v in ventricles.mean(axis=0) + np.array([0, 0, 6]))  # beside the ventricles
    pushed = push_from_tumour(anat, centre, radius_mm=20.0, mass=0.4)
    assert np.array_equal(pushed.brain, anat.brain)

    def csf_near(a: np.ndarray) -> float:
        dist = np.linalg.norm(np.indices(a.shape) - np.reshape(centre, (3, 1, 1, 1)), axis=0) * SPACING
        return float(a[dist < 20.0].sum())

    assert csf_near(pushed.csf) < 0.8 * csf_near(anat.csf), "tissue moved out of the tumour's way"
    assert push_from_tumour(anat, centre, 20.0, 0.0) is anat


def test_deformed_anatomy_differs_but_keeps_its_size() -> None:
    anat = load_anatomy(SPACING)
    warped = warp_anatomy(anat, 3.0, np.random.default_rng(0))
    assert not np.array_equal(warped.brain, anat.brain)
    assert warped.brain.sum() == pytest.approx(anat.brain.sum(), rel=0.05)
    assert np.allclose(warped.gm + warped.wm + warped.csf, warped.brain, atol=1e-4)
    assert warp_anatomy(anat, 0.0, np.random.default_rng(0)) is anat


def test_realistic_profile_cli_records_its_draws(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path), "--cases", "3", "--seed", "1", "--spacing", "4", "--space", "atlas",
                 "--profile", "realistic", "--iso-cores", "1"]) == 0
    data = json.loads((tmp_path / "datalist.json").read_text(encoding="utf-8"))
    assert data["phantom"]["config"]["oedema_fraction"] == PhantomConfig.realistic().oedema_fraction
    assert data["phantom"]["config"]["iso_core_fraction"] == 1.0 and PhantomConfig.realistic().iso_core_fraction == 0
    for entry in data["training"]:
        truth = json.loads((tmp_path / entry["id"] / "truth.json").read_text(encoding="utf-8"))
        assert set(truth["realism"]) >= {"levels", "oedema_mm", "mass", "wmh", "oedema_volume_ml_atlas", "core_level"}
        assert (truth["realism"]["core_level"] is not None) == (truth["realism"]["oedema_mm"] > 0)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--profile", "photoreal"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "y"), "--iso-cores", "0.5"])
    assert "--iso-cores needs --profile realistic" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("knobs", [{"oedema_fraction": 1.5}, {"oedema_mm": (5.0, 2.0)}, {"mass_effect": (0.0, 2.0)},
                                   {"deform_mm": -1.0}])
def test_bad_realism_knobs_raise(knobs: dict) -> None:
    with pytest.raises(InputError):
        PhantomConfig(**knobs)
