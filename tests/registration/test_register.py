"""Registration: known transforms recovered, orientations, exact inverse mapping, cache, bad files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.registration import fit, masks, register
from pipeline.registration.atlas import Atlas, load_atlas
from pipeline.registration.register import RegistrationCache, register_to_atlas
from pipeline.registration.resample import map_to_native, resample_image_to_atlas, resample_mask_to_atlas
from pipeline.registration.settings import RegistrationSettings
from pipeline.registration.transforms import read_transform, to_affine, write_transform_atomic

# coarse and quick: a 3 mm atlas, two pyramid levels, no network brain extraction
FAST = RegistrationSettings(working_spacing=3.0, shrink_factors=(2, 1), smoothing_sigmas=(4.0, 2.0), iterations=80,
                            skull_strip="morphology", initial_rotations=(0.0,), refine_passes=0, threads=2)

ORIENTATIONS = {  # direction matrices (LPS) of NIfTI orientation codes, and an oblique one
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([1.0, -1.0, 1.0]),
    "LPS": np.eye(3),
}


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return load_atlas(spacing=3)


def true_transform(rot_deg=(8.0, -6.0, 10.0), shift=(6.0, -9.0, 4.0), center=(0.0, -18.0, 18.0)) -> sitk.Transform:
    """A rigid atlas -> native transform (rotation about the brain centre, then translation)."""
    t = sitk.Euler3DTransform()
    t.SetCenter(center)
    t.SetRotation(*(math.radians(a) for a in rot_deg))
    t.SetTranslation(shift)
    return t


def oblique(angle_deg: float = 20.0) -> np.ndarray:
    r = sitk.Euler3DTransform()
    r.SetRotation(math.radians(angle_deg), 0.0, math.radians(-angle_deg / 2))
    return np.array(r.GetMatrix()).reshape(3, 3)


def native_scan(atlas: Atlas, transform: sitk.Transform, direction: np.ndarray = ORIENTATIONS["LPS"],
                spacing=(2.0, 2.0, 2.0), fov_mm: float = 230.0) -> sitk.Image:
    """The atlas anatomy seen through ``transform`` (atlas -> native) on a native grid of given direction."""
    size = [int(round(fov_mm / s)) for s in spacing]
    centre = np.array(transform.TransformPoint((0.0, -18.0, 18.0)))
    origin = centre - direction @ ((np.array(size) - 1) / 2.0 * np.array(spacing))
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(tuple(direction.ravel()))
    grid.SetOrigin(tuple(origin))
    return sitk.Resample(atlas.image, grid, transform.GetInverse(), sitk.sitkLinear, 0.0)


def brain_points(atlas: Atlas) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(atlas.brain_mask) > 0)
    return np.array([atlas.image.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in zyx[::3]])


def tre(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(a.TransformPoint(tuple(p)), b.TransformPoint(tuple(p)))) for p in points])


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


def test_known_rigid_transform_is_recovered_within_1mm(atlas: Atlas) -> None:
    truth = true_transform()
    estimate = register_to_atlas(native_scan(atlas, truth), atlas, FAST)
    assert isinstance(estimate, sitk.AffineTransform)
    err = tre(truth, estimate, brain_points(atlas))
    assert np.median(err) < 1.0 and np.percentile(err, 95) < 1.5, (np.median(err), np.percentile(err, 95))


def test_known_scaled_transform_is_recovered_within_1mm(atlas: Atlas) -> None:
    """A brain 15 % smaller than the atlas (a child's): the similarity stages must keep the scale."""
    truth = sitk.Similarity3DTransform()
    rigid = true_transform()
    truth.SetCenter(rigid.GetCenter())
    truth.SetMatrix(rigid.GetMatrix())
    truth.SetScale(0.85)
    truth.SetTranslation(rigid.GetTranslation())
    estimate = register_to_atlas(native_scan(atlas, truth), atlas, FAST)
    err = tre(truth, estimate, brain_points(atlas))
    assert np.median(err) < 1.0 and np.percentile(err, 95) < 1.5, (np.median(err), np.percentile(err, 95))


@pytest.mark.parametrize("kind", ["similarity", "affine"])
def test_stage_conversion_keeps_the_mapping(kind: str) -> None:
    """Handing a similarity (scale 1.15) to the next stage must not change where points go."""
    start = sitk.Similarity3DTransform()
    start.SetCenter((5.0, -10.0, 20.0))
    start.SetMatrix(true_transform().GetMatrix())
    start.SetScale(1.15)
    start.SetTranslation((3.0, -4.0, 7.0))
    converted = fit.as_stage(start, kind, (1.0, 2.0, 3.0))
    pts = np.array([[0.0, 0.0, 0.0], [60.0, -40.0, 30.0], [-70.0, 80.0, -20.0]])
    assert tre(start, converted, pts).max() < 1e-6


@pytest.mark.parametrize("code", ["RAS", "LAS", "LPS", "oblique"])
def test_orientation_codes_register_to_the_same_place(atlas: Atlas, code: str, tmp_path: Path) -> None:
    truth = true_transform()
    direction = oblique() if code == "oblique" else ORIENTATIONS[code]
    scan = native_scan(atlas, truth, direction, spacing=(2.0, 2.0, 5.0))  # thick slices too
    path = tmp_path / f"{code}.nii.gz"
    sitk.WriteImage(scan, str(path))  # through the NIfTI header, as a user's file would be
    estimate = register_to_atlas(sitk.ReadImage(str(path), sitk.sitkFloat32), atlas, FAST)
    err = tre(truth, estimate, brain_points(atlas))
    assert np.median(err) < 1.5, np.median(err)


def test_map_to_native_returns_the_native_grid_exactly(atlas: Atlas) -> None:
    truth = true_transform()
    scan = native_scan(atlas, truth, oblique(), spacing=(1.5, 1.5, 4.0))
    # a blob "tumour" on the native grid
    centre = np.array(truth.TransformPoint((20.0, -10.0, 30.0)))
    idx = np.indices(sitk.GetArrayViewFromImage(scan).shape)[::-1].reshape(3, -1).T  # x, y, z
    direction = np.array(scan.GetDirection()).reshape(3, 3)
    pts = np.array(scan.GetOrigin()) + (idx * np.array(scan.GetSpacing())) @ direction.T
    blob = (np.linalg.norm(pts - centre, axis=1) < 18.0).reshape(sitk.GetArrayViewFromImage(scan).shape)
    mask = sitk.GetImageFromArray(blob.astype(np.uint8))
    mask.CopyInformation(scan)

    on_atlas = resample_mask_to_atlas(mask, truth, atlas, "linear")
    assert on_atlas.GetSize() == atlas.image.GetSize() and on_atlas.GetPixelID() == sitk.sitkUInt8
    back = map_to_native(on_atlas, truth, scan)
    assert back.GetSize() == scan.GetSize()
    assert back.GetSpacing() == scan.GetSpacing()
    assert back.GetOrigin() == scan.GetOrigin()
    assert back.GetDirection() == scan.GetDirection()
    assert back.GetPixelID() == sitk.sitkUInt8
    assert dice(back, mask) > 0.85
    prob = map_to_native(sitk.Cast(on_atlas, sitk.sitkFloat32) * 0.7, truth, scan, is_mask=False)
    assert prob.GetPixelID() == sitk.sitkFloat32 and float(sitk.GetArrayViewFromImage(prob).max()) <= 0.7 + 1e-5


def test_resample_image_interpolators(atlas: Atlas) -> None:
    scan = native_scan(atlas, true_transform())
    for name in ("linear", "bspline"):
        out = resample_image_to_atlas(scan, true_transform(), atlas, name)
        assert out.GetSize() == atlas.image.GetSize() and out.GetPixelID() == sitk.sitkFloat32
    with pytest.raises(InputError):
        resample_image_to_atlas(scan, true_transform(), atlas, "cubic")


def test_transform_file_round_trip(tmp_path: Path) -> None:
    t = to_affine(true_transform())
    back = read_transform(write_transform_atomic(t, tmp_path / "t.tfm"))
    assert np.allclose(back.TransformPoint((1.0, 2.0, 3.0)), t.TransformPoint((1.0, 2.0, 3.0)), atol=1e-6)
    (tmp_path / "bad.tfm").write_text("not a transform", encoding="utf-8")
    with pytest.raises(InputError, match="bad.tfm"):
        read_transform(tmp_path / "bad.tfm")


@pytest.fixture
def fake_registration(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the (slow) registration by a recorder returning the identity."""
    calls: list[str] = []

    def fake(moving: sitk.Image, atlas: Atlas, settings: RegistrationSettings | None = None) -> sitk.AffineTransform:
        calls.append("registered")
        return sitk.AffineTransform(3)

    monkeypatch.setattr(register, "register_to_atlas", fake)
    return calls


def test_cache_hit_and_invalidation(tmp_path: Path, atlas: Atlas, fake_registration: list[str]) -> None:
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32))
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(img, str(path))
    cache = RegistrationCache(tmp_path / "cache")
    cache.get_or_register(path, atlas, FAST)
    cache.get_or_register(path, atlas, FAST)
    assert cache.registrations_performed == 1
    assert len(list((tmp_path / "cache").glob("*.tfm"))) == 1
    # a fresh cache object (a second run) finds the file on disk
    again = RegistrationCache(tmp_path / "cache")
    again.get_or_register(path, atlas, FAST)
    assert again.registrations_performed == 0
    # settings change -> new key
    cache.get_or_register(path, atlas, RegistrationSettings(**{**FAST.__dict__, "iterations": 7}))
    assert cache.registrations_performed == 2
    # file content change -> new key
    sitk.WriteImage(img * 2.0, str(path))
    cache.get_or_register(path, atlas, FAST)
    assert cache.registrations_performed == 3
    # another atlas -> new key
    cache.get_or_register(path, load_atlas(spacing=6), FAST)
    assert cache.registrations_performed == 4 == len(fake_registration)


def test_settings_key_ignores_threads_only() -> None:
    a = RegistrationSettings(threads=1)
    assert a.key() == RegistrationSettings(threads=8).key()
    assert a.key() != RegistrationSettings(iterations=7).key()
    with pytest.raises(InputError):
        RegistrationSettings(stages=("rigid", "warp"))
    with pytest.raises(InputError):
        RegistrationSettings(skull_strip="bet")


def test_bad_files_give_a_clear_error_naming_them(tmp_path: Path, atlas: Atlas) -> None:
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a NIfTI file at all")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16), np.float32)), str(flat))
    cache = RegistrationCache(tmp_path / "cache")
    with pytest.raises(InputError, match="corrupt.nii.gz"):
        cache.get_or_register(corrupt, atlas, FAST)
    with pytest.raises(InputError, match=r"flat.nii.gz.*(2-D|3-D)"):
        cache.get_or_register(flat, atlas, FAST)
    with pytest.raises(InputError, match="missing.nii.gz"):
        cache.get_or_register(tmp_path / "missing.nii.gz", atlas, FAST)
    tiny = tmp_path / "tiny.nii.gz"  # a valid volume, but 16 mm across: no head in it
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)), str(tiny))
    with pytest.raises(InputError, match="tiny.nii.gz.*no head"):
        cache.get_or_register(tiny, atlas, FAST)
    assert cache.registrations_performed == 0


@pytest.mark.slow
def test_real_pair_agrees_with_the_direct_route(real_data: Path) -> None:
    """The native skull-on FLAIR and its BraTS-prepared twin land on the same atlas points."""
    from pipeline.io.imageio import read_volume

    case = real_data / "TCGA-FG-6692"
    atlas = load_atlas(spacing=2)
    native = read_volume(case / "native" / "flair.nii.gz")
    prepared = read_volume(case / "sri24" / "flair_brain.nii.gz")
    settings = RegistrationSettings(threads=2)
    t_native = register_to_atlas(native, atlas, settings)
    t_prepared = register_to_atlas(prepared, atlas, settings)
    # same-patient, same-contrast rigid registration native -> prepared (as the shared checker)
    fixed = prepared
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetMetricFixedMask(sitk.Cast(fixed > 0, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 300, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.CenteredTransformInitializer(fixed, native, sitk.Euler3DTransform(),
                                                              sitk.CenteredTransformInitializerFilter.GEOMETRY),
                            inPlace=False)
    direct = reg.Execute(fixed, native)
    points = brain_points(atlas)[::2]
    d = np.array([np.linalg.norm(np.subtract(t_native.TransformPoint(tuple(p)),
                                             direct.TransformPoint(t_prepared.TransformPoint(tuple(p)))))
                  for p in points])
    assert np.median(d) <= 3.0 and np.percentile(d, 95) <= 6.0, (np.median(d), np.percentile(d, 95))


def test_deepbet_brain_mask_on_the_template() -> None:
    pytest.importorskip("deepbet")
    atlas = load_atlas(spacing=2)
    mask = masks.deepbet_brain_mask(atlas.image, threads=2)
    assert mask.GetSize() == atlas.image.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert dice(mask, atlas.brain_mask) > 0.9
