"""Atlases: MNI152 from nilearn with ITK-consistent geometry, resampled grids, user atlases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.registration.atlas import derive_brain_mask, load_atlas, nifti_to_sitk


def test_mni152_2mm_matches_sitk_reading_the_nifti(tmp_path: Path) -> None:
    from nilearn.datasets import load_mni152_template

    atlas = load_atlas(spacing=2)
    assert atlas.image.GetSize() == (99, 117, 95) and atlas.name == "mni152_2009_2mm"
    assert atlas.image.GetPixelID() == sitk.sitkFloat32 and atlas.brain_mask.GetPixelID() == sitk.sitkUInt8
    nib.save(load_mni152_template(resolution=2), str(tmp_path / "t.nii.gz"))
    ref = sitk.ReadImage(str(tmp_path / "t.nii.gz"), sitk.sitkFloat32)
    assert np.allclose(atlas.image.GetOrigin(), ref.GetOrigin())
    assert np.allclose(atlas.image.GetDirection(), ref.GetDirection())
    assert np.allclose(atlas.image.GetSpacing(), ref.GetSpacing())
    assert np.allclose(sitk.GetArrayViewFromImage(atlas.image), sitk.GetArrayViewFromImage(ref), atol=1e-2)
    assert atlas.image.GetOrigin() == (98.0, 134.0, -72.0)  # RAS (-98, -134, -72) in LPS
    assert set(np.unique(sitk.GetArrayViewFromImage(atlas.brain_mask))) == {0, 1}


def test_cached_and_fingerprinted() -> None:
    a, b = load_atlas(spacing=2), load_atlas(spacing=2.0)
    assert a is b
    assert a.fingerprint() == load_atlas(spacing=2).fingerprint()
    assert a.fingerprint() != load_atlas(spacing=4).fingerprint()


def test_other_spacing_is_resampled_over_the_same_field_of_view() -> None:
    a = load_atlas(spacing=4)
    assert a.image.GetSpacing() == (4.0, 4.0, 4.0) and a.name == "mni152_2009_4mm"
    two = load_atlas(spacing=2)
    centre = lambda img: img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])  # noqa: E731
    assert np.allclose(centre(a.image), centre(two.image), atol=1e-3)
    ratio = sitk.GetArrayViewFromImage(a.brain_mask).sum() * 64 / (sitk.GetArrayViewFromImage(two.brain_mask).sum() * 8)
    assert 0.95 < ratio < 1.05


def test_user_atlas_with_and_without_mask(tmp_path: Path) -> None:
    z, y, x = np.indices((40, 48, 44))
    brain = ((z - 20) ** 2 / 15**2 + (y - 24) ** 2 / 20**2 + (x - 22) ** 2 / 18**2) <= 1
    arr = np.where(brain, 100.0 + 20 * np.sin(x / 3.0), 0.0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "sri24_like.nii.gz"))
    derived = load_atlas(tmp_path / "sri24_like.nii.gz")
    assert derived.name == "sri24_like" and derived.image.GetSize() == (44, 48, 40)
    got = sitk.GetArrayViewFromImage(derived.brain_mask) > 0
    assert 2 * (got & brain).sum() / (got.sum() + brain.sum()) > 0.97

    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    given = load_atlas(tmp_path / "sri24_like.nii.gz", tmp_path / "mask.nii.gz", spacing=2)
    assert given.image.GetSpacing() == (2.0, 2.0, 2.0) and given.name == "sri24_like_2mm"

    other = sitk.GetImageFromArray(brain[:-2].astype(np.uint8))
    sitk.WriteImage(other, str(tmp_path / "wrong_grid.nii.gz"))
    with pytest.raises(InputError, match="wrong_grid.nii.gz"):
        load_atlas(tmp_path / "sri24_like.nii.gz", tmp_path / "wrong_grid.nii.gz")
    with pytest.raises(InputError, match="missing.nii.gz"):
        load_atlas(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError):
        load_atlas(spacing=0)


def test_nifti_to_sitk_oblique_affine_matches_itk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.random((6, 7, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    affine = np.eye(4)
    affine[:3, :3] = q * np.array([1.5, 2.0, 3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "o.nii.gz"))
    ref = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    mine = nifti_to_sitk(data, affine)
    assert np.allclose(mine.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(mine.GetDirection(), ref.GetDirection(), atol=1e-4)
    assert np.allclose(mine.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(mine), sitk.GetArrayViewFromImage(ref))
    assert derive_brain_mask(mine).GetPixelID() == sitk.sitkUInt8
