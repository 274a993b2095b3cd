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

from pipeline.atlas import load_atlas
from pipeline.errors import InputError
from pipeline.registration import RegistrationSettings, map_to_native, read_transform
from pipeline.transforms import RegisterToAtlasd

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
