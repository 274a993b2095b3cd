"""RegisterToAtlasd: registration once per case inside a real MONAI chain, pass-through, pickling."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from pipeline.data.transforms import NormaliseIntensityd, RegisterToAtlasd
from pipeline.io.errors import InputError
from pipeline.registration.atlas import load_atlas
from pipeline.registration.resample import map_to_native, resample_image_to_atlas
from pipeline.registration.settings import RegistrationSettings
from pipeline.registration.transforms import read_transform

FAST = RegistrationSettings(working_spacing=3.0, shrink_factors=(2, 1), smoothing_sigmas=(4.0, 2.0), iterations=60,
                            skull_strip="morphology", initial_rotations=(0.0,), refine_passes=0, threads=2)
SPACING = 3.0


def write_case(folder: Path, angle_deg: float, with_mask: bool = True) -> dict[str, str]:
    """A native scan of the atlas anatomy (rotated, shifted, 2 x 2 x 4 mm) and a blob mask on its grid."""
    atlas = load_atlas(spacing=SPACING)
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, -18.0, 18.0))
    t.SetRotation(math.radians(angle_deg), 0.0, math.radians(-angle_deg))
    t.SetTranslation((5.0, -4.0, 3.0))
    grid = sitk.Image([110, 120, 50], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 4.0))
    grid.SetOrigin((-110.0, -140.0, -80.0))
    image = sitk.Resample(atlas.image, grid, t.GetInverse(), sitk.sitkLinear, 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    case = {"image": str(folder / "image.nii.gz")}
    if with_mask:
        arr = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        arr[20:30, 50:70, 40:60] = 1
        mask = sitk.GetImageFromArray(arr)
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / "mask.nii.gz"))
        case["label"] = str(folder / "mask.nii.gz")
    return case


def test_two_epochs_register_each_case_once(tmp_path: Path) -> None:
    cases = [write_case(tmp_path / "a", 8.0), write_case(tmp_path / "b", -6.0, with_mask=False)]
    reg = RegisterToAtlasd(keys=("image", "label"), atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    chain = Compose([reg, LoadImaged(keys=("image", "label"), allow_missing_keys=True),
                     EnsureChannelFirstd(keys=("image", "label"), allow_missing_keys=True)])
    loader = DataLoader(Dataset(cases, transform=chain), batch_size=1, num_workers=0)
    atlas = load_atlas(spacing=SPACING)
    for _epoch in range(2):
        for batch in loader:
            assert tuple(batch["image"].shape[2:]) == atlas.image.GetSize()
    assert reg.cache.registrations_performed == 2
    out = reg(cases[0])
    assert Path(out["label"]).exists() and out["to_atlas"].endswith(".tfm")
    assert out["native_meta"]["size"] == [110, 120, 50]
    assert "label" not in reg(cases[1])
    # the kept transform takes the registered mask back onto the native grid exactly
    native = sitk.ReadImage(cases[0]["image"])
    back = map_to_native(sitk.ReadImage(out["label"]), read_transform(out["to_atlas"]), native)
    assert back.GetSize() == native.GetSize() and back.GetOrigin() == native.GetOrigin()
    orig = sitk.GetArrayViewFromImage(sitk.ReadImage(cases[0]["label"])) > 0
    got = sitk.GetArrayViewFromImage(back) > 0
    assert 2 * (orig & got).sum() / (orig.sum() + got.sum()) > 0.8
    # a second run (new transform object, same cache folder) registers nothing
    again = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    again(cases[0])
    assert again.cache.registrations_performed == 0


def test_already_registered_passes_through_and_checks_the_grid(tmp_path: Path) -> None:
    atlas = load_atlas(spacing=SPACING)
    on_grid = tmp_path / "registered.nii.gz"
    sitk.WriteImage(atlas.image, str(on_grid))
    reg = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", already_registered=True)
    out = reg({"image": str(on_grid)})
    assert out["image"] == str(on_grid) and out["to_atlas"] == ""
    native = write_case(tmp_path / "n", 0.0, with_mask=False)
    with pytest.raises(InputError, match="image.nii.gz.*atlas grid"):
        reg(native)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"garbage")
    reg = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    with pytest.raises(InputError, match="broken.nii.gz"):
        reg({"image": str(bad)})


def test_picklable_without_the_atlas_images(tmp_path: Path) -> None:
    reg = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache",
                           settings={"iterations": 5, "shrink_factors": [1], "smoothing_sigmas": [0.0]})
    assert reg.settings.shrink_factors == (1,)
    _ = reg.atlas  # loaded in this process ...
    blob = pickle.dumps(reg)
    assert len(blob) < 10_000  # ... but not shipped to workers
    clone = pickle.loads(blob)
    assert clone.atlas.fingerprint() == reg.atlas.fingerprint()


def test_coordinate_channels_of_the_bundle_chain_match_the_atlas_grid(tmp_path):
    """The bundle's chains (default head) append 3 coordinate channels: at the voxel of any atlas
    point they hold that voxel's index on the atlas grid scaled to -0.5 .. 0.5; the training
    chain's random crop and flip move them with the image and its intensity augmentation leaves
    them exact."""
    import torch
    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[2]
    atlas = load_atlas(spacing=6.0)
    image = sitk.Cast(atlas.image, sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    mask = sitk.Cast(atlas.brain_mask > 0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    parser = ConfigParser()
    parser.read_config([str(root / "bundles/plgg_mtl/configs/train.json")])
    parser.update({"atlas_spacing": 6.0, "already_registered": True, "output_dir": str(tmp_path / "run"),
                   "patch_size": [8, 8, 8]})
    case = {"image": str(tmp_path / "flair.nii.gz"), "label": str(tmp_path / "mask.nii.gz"),
            "brain": parser.get_parsed_content("brain_mask_file")}
    x = parser.get_parsed_content("validate#preprocessing")(dict(case))["image"]
    size = image.GetSize()
    assert tuple(x.shape) == (4, *size)
    rng = np.random.default_rng(0)
    for _ in range(5):  # physical atlas points -> atlas voxel -> expected coordinates
        point = image.TransformIndexToPhysicalPoint([int(rng.integers(0, n)) for n in size])
        i, j, k = image.TransformPhysicalPointToIndex(point)
        expected = [-0.5 + v / (n - 1) for v, n in zip((i, j, k), size, strict=True)]
        assert torch.allclose(x[1:, i, j, k].float(), torch.tensor(expected), atol=1e-5)

    train = parser.get_parsed_content("train#preprocessing")
    train.set_random_state(3)
    for patch in [p["image"] for p in train(dict(case))]:
        assert patch.shape == (4, 8, 8, 8)
        coords = patch[1:].float()
        # each coordinate channel still varies along its own axis only, in exact grid steps
        # (flipped along axis 0 when RandFlipd fired): no intensity scale or shift reached it
        for a in range(3):
            steps = torch.diff(coords[a], dim=a).abs()
            assert torch.allclose(steps, torch.full_like(steps, 1.0 / (size[a] - 1)), atol=1e-5)
        corner = [round(float((coords[a].amin() + 0.5) * (size[a] - 1))) for a in range(3)]
        assert all(0 <= c <= n - 8 for c, n in zip(corner, size, strict=True))


def _stripped_scan(rng: np.random.Generator) -> np.ndarray:
    """A skull-stripped-like channel: integer counts inside a ball, exactly 0 around it."""
    z, y, x = np.indices((24, 24, 24))
    inside = (z - 12) ** 2 + (y - 12) ** 2 + (x - 11) ** 2 < 81
    return np.where(inside, rng.integers(200, 900, inside.shape), 0).astype(np.int16)[None]


def test_brain_normalisation_ignores_the_intensity_scale_and_offset() -> None:
    scan = _stripped_scan(np.random.default_rng(0))
    brain = np.ones_like(scan, dtype=np.uint8)
    brain[0, :, :, :4] = 0  # the atlas brain mask cuts off a slab
    counts = NormaliseIntensityd(mode="brain")({"image": scan.astype(np.float32), "brain": brain})["image"]
    zscored = (scan - scan.mean()) / scan.std()  # background now negative
    copy = NormaliseIntensityd(mode="brain")({"image": zscored.astype(np.float32), "brain": brain})["image"]
    np.testing.assert_allclose(counts, copy, atol=1e-5)
    fg = (scan > 0) & (brain > 0)
    assert counts[fg].mean() == pytest.approx(0.0, abs=1e-5) and counts[fg].std() == pytest.approx(1.0, abs=0.01)
    assert not counts[~fg].any()
    # MONAI's non-zero rule (the default "nonzero" mode) takes the negative background for brain
    old = NormaliseIntensityd(mode="nonzero")({"image": zscored.astype(np.float32), "brain": brain})["image"]
    assert np.abs(np.asarray(old) - counts).max() > 0.5


def test_brain_normalisation_clips_hot_voxels() -> None:
    scan = _stripped_scan(np.random.default_rng(1)).astype(np.float32)
    hot = scan.copy()
    hot[0, 12, 12, 12] = 1e6  # one artefact voxel
    brain = np.ones_like(scan, dtype=np.uint8)
    a = NormaliseIntensityd(mode="brain")({"image": scan, "brain": brain})["image"]
    b = NormaliseIntensityd(mode="brain")({"image": hot, "brain": brain})["image"]
    others = np.ones(scan.shape, bool)
    others[0, 12, 12, 12] = False
    assert np.abs(a - b)[others].max() < 0.05  # without clipping the brain would collapse to ~0


def test_unknown_normalisation_is_refused() -> None:
    with pytest.raises(InputError, match="intensity_norm"):
        NormaliseIntensityd(mode="percentile")


def test_real_scan_counts_and_zscored_copy_give_one_network_input(real_data: Path) -> None:
    """A real BraTS FLAIR (int16 counts) and its z-scored float copy, resampled onto the atlas grid
    with one transform that leaves part of the grid outside the scan, then normalised: the same input."""
    scan = sitk.ReadImage(str(real_data / "brats2018" / "Brats18_TCIA10_639_1" / "flair.nii.gz"))
    counts = sitk.Shrink(scan, [2, 2, 2])
    arr = sitk.GetArrayFromImage(counts).astype(np.float32)
    zscored = sitk.GetImageFromArray((arr - arr.mean()) / arr.std())
    zscored.CopyInformation(counts)
    atlas = load_atlas(spacing=4.0)
    t = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        atlas.image, sitk.Cast(counts, sitk.sitkFloat32), sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.GEOMETRY))
    t.SetRotation(0.1, 0.0, -0.05)
    t.SetTranslation(np.add(t.GetTranslation(), (0.0, 0.0, 40.0)).tolist())  # the top of the brain: padding
    moved = [resample_image_to_atlas(img, t, atlas) for img in (counts, zscored)]
    brain = sitk.GetArrayFromImage(atlas.brain_mask)[None]
    outs = [NormaliseIntensityd(mode="brain")({"image": sitk.GetArrayFromImage(m)[None], "brain": brain})["image"]
            for m in moved]
    brain_fov = sitk.GetArrayFromImage(resample_image_to_atlas(sitk.Cast(counts * 0 + 1, sitk.sitkFloat32), t, atlas))[None] > 0
    assert (brain > 0).sum() > (brain_fov & (brain > 0)).sum() > 1000  # part of the brain outside the scan
    assert np.count_nonzero(outs[0]) > 1000
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_one_registration_moves_every_sequence(tmp_path: Path) -> None:
    case = write_case(tmp_path / "a", 8.0)
    flair = sitk.ReadImage(case["image"])
    t2 = flair * 2.0 + 10.0  # an intensity-shifted copy: registered alone it could land elsewhere
    sitk.WriteImage(t2, str(tmp_path / "a" / "t2.nii.gz"))
    item = {"image": [case["image"], str(tmp_path / "a" / "t2.nii.gz")], "label": case["label"]}
    reg = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST,
                           sequences=["flair", "t2"])
    out = reg(dict(item))
    assert reg.cache.registrations_performed == 1 and len(out["image"]) == 2
    loaded = LoadImaged(keys=("image", "label"), image_only=True, ensure_channel_first=True)(out)
    assert tuple(loaded["image"].shape) == (2, *sitk.GetArrayViewFromImage(load_atlas(spacing=SPACING).image).shape[::-1])
    a, b = np.asarray(loaded["image"][0]), np.asarray(loaded["image"][1])
    inside = a > 1e-3  # the resampling pads both with 0 outside the scan's field of view
    np.testing.assert_allclose(b[inside], 2.0 * a[inside] + 10.0, rtol=1e-5, atol=1e-3)
    assert out["native_meta"]["path"] == case["image"]
    # the reference can be another sequence: registered on it, once, and the others follow
    by_t2 = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST,
                             sequences=["flair", "t2"], reference_sequence="t2")
    out2 = by_t2(dict(item))
    assert by_t2.cache.registrations_performed == 1 and out2["native_meta"]["path"].endswith("t2.nii.gz")
    with pytest.raises(InputError, match="not among the sequences"):
        RegisterToAtlasd(cache_dir=tmp_path / "cache", sequences=["flair", "t2"], reference_sequence="t1ce")


def test_cached_crop_indices_key() -> None:
    from pipeline.data.transforms import cached_key

    assert cached_key("label_fg_indices", True) == "label_fg_indices"
    assert cached_key("label_fg_indices", False) is None


def test_corrupt_cache_entries_are_reported_and_recomputed(tmp_path: Path, caplog) -> None:
    import logging

    case = write_case(tmp_path / "a", 8.0)
    reg = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    first = reg(dict(case))
    image, tfm = Path(first["image"]), Path(first["to_atlas"])
    whole = image.read_bytes()
    assert Path(f"{image}.sha256").is_file() and Path(f"{tfm}.sha256").is_file()
    # a registered image cut short (another process, a disk error): rewritten from the cached transform
    image.write_bytes(whole[: len(whole) // 2])
    again = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    with caplog.at_level(logging.WARNING):
        again(dict(case))
    assert image.read_bytes() == whole and again.cache.registrations_performed == 0
    assert f"registration cache entry {image} is corrupt" in caplog.text
    # a transform whose bytes changed but still parse: not used, registered again
    text = tfm.read_text(encoding="utf-8")
    tfm.write_text(text.replace("Parameters: ", "Parameters: 9", 1), encoding="utf-8")
    caplog.clear()
    third = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    with caplog.at_level(logging.WARNING):
        third(dict(case))
    assert third.cache.registrations_performed == 1 and f"registration cache entry {tfm} is corrupt" in caplog.text
    # an entry written before checksums existed is vouched for, not recomputed
    Path(f"{image}.sha256").unlink()
    fourth = RegisterToAtlasd(atlas_spacing=SPACING, cache_dir=tmp_path / "cache", settings=FAST)
    fourth(dict(case))
    assert fourth.cache.registrations_performed == 0 and Path(f"{image}.sha256").is_file()


def test_two_processes_share_one_registration_cache(tmp_path: Path) -> None:
    """Two real processes register the same cases into one cache at the same moment: both finish,
    neither meets a half-written or unmatched entry, and both use the same transform and images."""
    import json
    import subprocess
    import sys

    from pipeline.io.imageio import checksum_matches
    from tests.helpers import ROOT

    cases = [write_case(tmp_path / "a", 8.0), write_case(tmp_path / "b", -6.0)]
    cache, go = tmp_path / "cache", tmp_path / "go"
    code = (f"import json, time, pathlib\nfrom tests.data.test_transforms import FAST, SPACING\n"
            f"from pipeline.data.transforms import RegisterToAtlasd\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
            f"reg = RegisterToAtlasd(keys=('image', 'label'), atlas_spacing=SPACING, cache_dir={str(cache)!r}, "
            f"settings=FAST)\n"
            f"out = [reg(dict(c)) for c in json.loads({json.dumps(cases)!r})]\n"
            f"print(json.dumps([[o['image'], o['label'], o['to_atlas']] for o in out]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    go.touch()
    done = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in done]
    assert not any("corrupt" in err for _, err in done), [err[-2000:] for _, err in done]
    first, second = (json.loads(out.splitlines()[-1]) for out, _ in done)
    assert first == second  # the same entries
    files = [Path(p) for case in first for p in case]
    assert all(checksum_matches(p) for p in files)
    assert not [p for p in cache.rglob(".*") if p.name != ".cache.lock"]  # no temporary left
    transforms = {str(read_transform(p).GetParameters()) for p in files if p.suffix == ".tfm"}
    assert len(transforms) == 2  # one per case, whoever computed it
