"""Synthetic cohort: geometry of the true transform, masks, priors, determinism, options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.data.phantom.anatomy import load_anatomy
from pipeline.data.phantom.build import main, make_cohort
from pipeline.data.phantom.config import APPEARANCES, CLASSES, REGIONS, PhantomConfig
from pipeline.data.phantom.cues import bayes_accuracy, region_of, sample_cues
from pipeline.io.errors import InputError

SPACING = 4.0  # coarse grid: the whole file runs in well under a minute
CASES = 6
SEED = 3


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("native")
    make_cohort(out, CASES, SEED, SPACING, "native", missing_mask=0.5, missing_class=1 / 3)
    return out


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("atlas")
    make_cohort(out, CASES, SEED, SPACING, "atlas", missing_mask=0.5, missing_class=1 / 3)
    return out


def _truth(root: Path, cid: str) -> dict:
    return json.loads((root / cid / "truth.json").read_text(encoding="utf-8"))


def _mask(root: Path, cid: str) -> sitk.Image:
    return sitk.ReadImage(str(root / cid / _truth(root, cid)["mask_file"]))


def _ids() -> list[str]:
    return [f"c{i:03d}" for i in range(CASES)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


# ----------------------------------------------------------------------------- priors


@pytest.mark.parametrize("config", [
    PhantomConfig(),
    PhantomConfig(region_prior=((0.5, 0.3, 0.2), (0.3, 0.5, 0.2), (0.3, 0.2, 0.5)),
                  appearance_prior=((0.8, 0.2), (0.2, 0.8), (0.5, 0.5))),
], ids=["default", "weak-location"])
def test_bayes_accuracy_matches_monte_carlo(config: PhantomConfig) -> None:
    cues = sample_cues(200_000, np.random.default_rng(0), config)
    joint = np.zeros((len(CLASSES), len(REGIONS), len(APPEARANCES)))
    np.add.at(joint, (cues.classes, cues.regions, cues.appearances), 1)
    empirical = joint.max(axis=0).sum() / len(cues.classes)  # best possible guess per cue cell
    freq = np.bincount(cues.classes, minlength=len(CLASSES)) / len(cues.classes)
    assert bayes_accuracy(config.region_prior, config.appearance_prior, freq) == pytest.approx(empirical, abs=0.03)


def test_bayes_accuracy_extremes() -> None:
    uninformative = [[1 / 3] * 3] * 3
    assert bayes_accuracy(uninformative, [[0.5, 0.5]] * 3) == pytest.approx(1 / 3)
    assert bayes_accuracy(np.eye(3), [[0.5, 0.5]] * 3) == pytest.approx(1.0)
    # appearance alone separates class 1 from the others (0 and 2 stay tied)
    assert bayes_accuracy(uninformative, [[1, 0], [0, 1], [1, 0]]) == pytest.approx(2 / 3)


def test_location_prior_respected_by_sampler() -> None:
    config = PhantomConfig()
    cues = sample_cues(60_000, np.random.default_rng(1), config)
    assert np.bincount(cues.classes).tolist() == [20_000] * 3  # balanced
    for c in range(len(CLASSES)):
        regions = cues.regions[cues.classes == c]
        np.testing.assert_allclose(np.bincount(regions, minlength=3) / len(regions), config.region_prior[c], atol=0.015)
        # each class has its typical region most often
        assert np.argmax(np.bincount(regions)) == c


def test_region_candidates_agree_with_region_of() -> None:
    anat = load_anatomy(SPACING)
    for name, zyx in anat.centres.items():
        pick = zyx[:: max(1, len(zyx) // 50)]
        lps = np.array([anat.grid.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in pick])
        assert {region_of(p * [-1, -1, 1]) for p in lps} == {name}
        assert anat.brain[tuple(pick.T)].all()


def test_tumours_lie_in_their_drawn_region(atlas: Path) -> None:
    anat = load_anatomy(SPACING)
    for cid in _ids():
        truth = _truth(atlas, cid)
        assert region_of(truth["tumour_centre_mni_ras_mm"]) == truth["region"]
        mask = sitk.GetArrayFromImage(_mask(atlas, cid)) > 0
        centroid = np.argwhere(mask).mean(axis=0)[::-1]
        ras = np.array(anat.grid.TransformContinuousIndexToPhysicalPoint(centroid.tolist())) * [-1, -1, 1]
        assert np.linalg.norm(ras - truth["tumour_centre_mni_ras_mm"]) < 20.0
        assert truth["tumour_volume_ml_atlas"] >= 0.8 * 10.0


# ----------------------------------------------------------------------------- geometry


def test_atlas_space_cases_are_on_the_atlas_grid(atlas: Path) -> None:
    grid = load_anatomy(SPACING).grid
    for cid in _ids():
        image = sitk.ReadImage(str(atlas / cid / "image.nii.gz"))
        assert image.GetPixelID() == sitk.sitkFloat32
        assert image.GetSize() == grid.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), grid.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), grid.GetDirection(), atol=1e-6)
        tfm = sitk.ReadTransform(str(atlas / cid / "to_atlas.tfm"))
        np.testing.assert_allclose(tfm.TransformPoint((10.0, -20.0, 30.0)), (10.0, -20.0, 30.0), atol=1e-9)


def test_native_files_and_truth(native: Path) -> None:
    orientations = set()
    for cid in _ids():
        truth = _truth(native, cid)
        image = sitk.ReadImage(str(native / cid / "image.nii.gz"))
        mask = _mask(native, cid)
        assert image.GetPixelID() == sitk.sitkFloat32 and mask.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == mask.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), mask.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}
        assert image.GetSpacing()[truth["thick_axis"]] == pytest.approx(truth["slice_thickness_mm"], abs=1e-4)
        assert 1.0 <= truth["slice_thickness_mm"] <= 6.0
        assert max(abs(a) for a in truth["pose"]["rotation_deg_xyz"]) <= 15.0
        assert 0.9 <= truth["pose"]["scale"] <= 1.1
        assert truth["class_name"] == CLASSES[truth["class"]]
        orientations.add(truth["orientation"])
        assert sitk.GetArrayViewFromImage(image).min() >= 0.0  # Rician magnitude
    assert len(orientations) >= 2


def test_native_mask_inside_atlas_brain(native: Path) -> None:
    anat = load_anatomy(SPACING)
    for cid in _ids():
        tfm = sitk.ReadTransform(str(native / cid / "to_atlas.tfm"))
        back = sitk.GetArrayFromImage(sitk.Resample(_mask(native, cid), anat.grid, tfm, sitk.sitkNearestNeighbor, 0)) > 0
        assert back.sum() > 100
        assert (back & anat.brain).sum() / back.sum() >= 0.95


def test_native_mask_round_trip_matches_atlas_tumour(native: Path, atlas: Path) -> None:
    anat = load_anatomy(SPACING)
    for cid in _ids():
        tfm = sitk.ReadTransform(str(native / cid / "to_atlas.tfm"))
        back = sitk.GetArrayFromImage(sitk.Resample(_mask(native, cid), anat.grid, tfm, sitk.sitkNearestNeighbor, 0)) > 0
        truth = sitk.GetArrayFromImage(_mask(atlas, cid)) > 0
        assert _dice(back, truth) >= 0.8, cid


def _flatten(arr: np.ndarray, brain: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Divide by the local mean inside the brain: removes the (space-dependent) bias field and scale."""
    local = ndimage.gaussian_filter(arr * brain, sigma_vox) / np.maximum(ndimage.gaussian_filter(brain * 1.0, sigma_vox), 1e-3)
    return arr / np.maximum(local, 1e-6)


def test_transform_brings_native_image_onto_atlas_case(native: Path, atlas: Path) -> None:
    """Same seed, two spaces: the true transform aligns them; its inverse (a wrong transform) does not."""
    anat = load_anatomy(SPACING)
    sigma = 12.0 / SPACING
    for cid in _ids():
        image = sitk.ReadImage(str(native / cid / "image.nii.gz"))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(atlas / cid / "image.nii.gz")))
        reference = _flatten(reference, anat.brain, sigma)[anat.brain]
        tfm = sitk.ReadTransform(str(native / cid / "to_atlas.tfm"))
        scores = []
        for t in (tfm, tfm.GetInverse()):
            moved = sitk.GetArrayFromImage(sitk.Resample(image, anat.grid, t, sitk.sitkLinear, 0.0))
            scores.append(np.corrcoef(_flatten(moved, anat.brain, sigma)[anat.brain], reference)[0, 1])
        assert scores[0] >= 0.7, cid
        assert scores[1] <= scores[0] - 0.4, cid


# ----------------------------------------------------------------------------- datalist, options


def test_datalist_and_missing_fractions(native: Path) -> None:
    datalist = json.loads((native / "datalist.json").read_text(encoding="utf-8"))
    assert datalist["classes"] == list(CLASSES)
    entries = datalist["training"]
    assert [e["id"] for e in entries] == _ids()
    assert sum("label" in e for e in entries) == CASES - round(0.5 * CASES)
    assert sum("class" in e for e in entries) == CASES - round(CASES / 3)
    for e in entries:
        truth = _truth(native, e["id"])
        assert (native / e["image"]).is_file()
        if "label" in e:
            assert (native / e["label"]).is_file() and not (native / e["id"] / "mask_truth.nii.gz").exists()
        else:
            assert (native / e["id"] / "mask_truth.nii.gz").is_file() and not (native / e["id"] / "mask.nii.gz").exists()
        if "class" in e:
            assert e["class"] == truth["class"]
    meta = datalist["phantom"]
    freq = np.array(list(meta["class_counts"].values())) / CASES
    assert meta["bayes_accuracy"] == pytest.approx(
        bayes_accuracy(PhantomConfig().region_prior, PhantomConfig().appearance_prior, freq), abs=1e-4)
    assert meta["seed"] == SEED and meta["space"] == "native"


def test_same_seed_same_cohort(atlas: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    make_cohort(again, CASES, SEED, SPACING, "atlas", missing_mask=0.5, missing_class=1 / 3)
    make_cohort(other, CASES, SEED + 1, SPACING, "atlas", missing_mask=0.5, missing_class=1 / 3)
    assert (again / "datalist.json").read_text(encoding="utf-8") == (atlas / "datalist.json").read_text(encoding="utf-8")
    for cid in _ids():
        assert _truth(again, cid) == _truth(atlas, cid)
        for name in ("image.nii.gz", _truth(atlas, cid)["mask_file"]):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(atlas / cid / name)))
            np.testing.assert_array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(again / cid / name))))
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(atlas / "c000" / "image.nii.gz")))
    assert not np.array_equal(img, sitk.GetArrayFromImage(sitk.ReadImage(str(other / "c000" / "image.nii.gz"))))


def test_cli_prints_bayes_accuracy_and_overwrites_own_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cohort"
    args = ["--out", str(out), "--cases", "2", "--seed", "0", "--spacing", "4", "--space", "atlas"]
    assert main(args) == 0
    assert (out / "c000" / "mask.nii.gz").is_file()
    assert main([*args, "--missing-mask", "1", "--skull-fraction", "0"]) == 0  # same folder again
    printed = capsys.readouterr().out
    assert re.search(r"^Bayes-optimal class accuracy of these priors: 0\.\d\d", printed, re.MULTILINE)
    assert not (out / "c000" / "mask.nii.gz").exists() and (out / "c000" / "mask_truth.nii.gz").is_file()
    datalist = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert all("label" not in e for e in datalist["training"])
    assert not any(_truth(out, e["id"])["skull"] for e in datalist["training"])


@pytest.mark.parametrize("options", [
    {"cases": 0},
    {"spacing": 0.0},
    {"spacing": -2.0},
    {"space": "mni"},
    {"missing_mask": 1.5},
    {"missing_class": -0.1},
], ids=lambda o: next(iter(o)))
def test_bad_options_raise(tmp_path: Path, options: dict) -> None:
    kwargs = {"cases": 2, "seed": 0, "spacing": 4.0, "space": "atlas", **options}
    with pytest.raises(InputError):
        make_cohort(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--cases", "0"], ["--missing-mask", "2"], ["--skull-fraction", "-1"], ["--space", "mni"], ["--spacing", "0"],
])
def test_cli_bad_options_raise(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(InputError):
        main(["--out", str(tmp_path / "out"), *argv])


def test_refuses_foreign_datalist_and_file_as_out(tmp_path: Path) -> None:
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "datalist.json").write_text(json.dumps({"training": []}), encoding="utf-8")
    with pytest.raises(InputError, match="not a phantom datalist"):
        make_cohort(foreign, 1, 0, 4.0, "atlas")
    assert json.loads((foreign / "datalist.json").read_text(encoding="utf-8")) == {"training": []}
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="not a folder"):
        make_cohort(a_file, 1, 0, 4.0, "atlas")


def test_bad_config_raises() -> None:
    with pytest.raises(InputError):
        PhantomConfig(region_prior=((0.5, 0.5, 0.5),) * 3)
    with pytest.raises(InputError):
        PhantomConfig(volume_ml=(60.0, 10.0))


def test_t2_contrast_leaves_the_flair_unchanged(native: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    make_cohort(out, CASES, SEED, SPACING, "native", missing_mask=0.5, missing_class=1 / 3, sequences=("flair", "t2"))
    data = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert data["sequences"] == ["flair", "t2"]
    first = data["training"][0]
    assert first["image"] == [f"{first['id']}/image.nii.gz", f"{first['id']}/t2.nii.gz"]
    for entry in data["training"]:
        cid = entry["id"]
        flair = sitk.ReadImage(str(out / cid / "image.nii.gz"))
        same = sitk.ReadImage(str(native / cid / "image.nii.gz"))
        assert np.array_equal(sitk.GetArrayViewFromImage(flair), sitk.GetArrayViewFromImage(same))
        t2 = sitk.ReadImage(str(out / cid / "t2.nii.gz"))
        assert t2.GetSize() == flair.GetSize() and t2.GetOrigin() == flair.GetOrigin()
        assert t2.GetDirection() == flair.GetDirection()
        truth = json.loads((out / cid / "truth.json").read_text(encoding="utf-8"))
        mask = sitk.GetArrayViewFromImage(sitk.ReadImage(str(out / cid / truth["mask_file"]))) > 0
        f, t = sitk.GetArrayViewFromImage(flair), sitk.GetArrayViewFromImage(t2)
        body = ndimage.binary_dilation(mask, iterations=3) & ~mask & (f > 0.2 * f.max())
        # a second look at one tumour: bright in both contrasts against the brain around it
        assert np.median(t[mask]) > np.median(t[body]) and np.median(f[mask]) > np.median(f[body])
        assert not np.allclose(t, f)
    with pytest.raises(InputError, match="sequences must start with flair"):
        make_cohort(tmp_path / "bad", 2, SEED, SPACING, "atlas", sequences=("t2",))
