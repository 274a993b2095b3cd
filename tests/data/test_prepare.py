"""`python -m pipeline prepare`: parallel registration of a datalist, failures reported, resumable."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.__main__ import main as cli
from pipeline.registration.atlas import load_atlas
from pipeline.registration.transforms import read_transform

SPACING = 4.0


def write_scan(path: Path, angle_deg: float) -> sitk.Image:
    atlas = load_atlas(spacing=SPACING)
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, -18.0, 18.0))
    t.SetRotation(0.0, 0.0, math.radians(angle_deg))
    grid = sitk.Image([64, 70, 30], sitk.sitkFloat32)
    grid.SetSpacing((3.0, 3.0, 5.0))
    grid.SetOrigin((-96.0, -120.0, -60.0))
    image = sitk.Resample(atlas.image, grid, t.GetInverse(), sitk.sitkLinear, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def make_datalist(root: Path) -> Path:
    image = write_scan(root / "c1" / "flair.nii.gz", 10.0)
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 0.5).astype(np.uint8))
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(root / "c1" / "seg.nii.gz"))
    write_scan(root / "c2" / "flair.nii.gz", -5.0)
    (root / "c3").mkdir()
    (root / "c3" / "flair.nii.gz").write_bytes(b"\x1f\x8bcorrupt")
    entries = [{"id": "c1", "image": "c1/flair.nii.gz", "label": "c1/seg.nii.gz", "class": 2},
               {"id": "c2", "image": "c2/flair.nii.gz"},
               {"id": "c3", "image": "c3/flair.nii.gz", "class": 0}]
    path = root / "datalist.json"
    path.write_text(json.dumps({"classes": ["BRAF V600E", "BRAF fusion", "other"], "training": entries}), encoding="utf-8")
    return path


def test_prepare_end_to_end_with_a_bad_case_and_resume(tmp_path: Path, capsys) -> None:
    datalist = make_datalist(tmp_path / "in")
    out = tmp_path / "prep"
    args = ["prepare", "--datalist", str(datalist), "--out", str(out), "--spacing", str(SPACING),
            "--skull-strip", "morphology", "--workers", "2"]
    assert cli(args) == 1  # c3 failed, the others are done
    captured = capsys.readouterr()
    assert "failed c3" in captured.err and "flair.nii.gz" in captured.err
    assert "2 registered, 0 already done, 1 failed of 3" in captured.out

    atlas = load_atlas(spacing=SPACING)
    for cid in ("c1", "c2"):
        img = sitk.ReadImage(str(out / cid / "image.nii.gz"))
        assert img.GetSize() == atlas.image.GetSize()
        assert (out / cid / "qc.png").stat().st_size > 1000
        read_transform(out / cid / "to_atlas.tfm")
    mask = sitk.ReadImage(str(out / "c1" / "mask.nii.gz"))
    assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    assert not (out / "c2" / "mask.nii.gz").exists()

    dl = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert dl["classes"] == ["BRAF V600E", "BRAF fusion", "other"]
    by_id = {e["id"]: e for e in dl["training"]}
    assert set(by_id) == {"c1", "c2"}
    assert by_id["c1"]["label"] == "c1/mask.nii.gz" and by_id["c1"]["class"] == 2
    assert "label" not in by_id["c2"] and "class" not in by_id["c2"]
    assert by_id["c2"]["to_atlas"] == "c2/to_atlas.tfm"
    assert Path(by_id["c2"]["native_image"]) == (tmp_path / "in" / "c2" / "flair.nii.gz").resolve()

    stamp = (out / "c1" / "to_atlas.tfm").stat().st_mtime_ns
    assert cli(args[:-2]) == 1  # resume: finished cases are skipped, c3 still fails
    assert "0 registered, 2 already done, 1 failed of 3" in capsys.readouterr().out
    assert (out / "c1" / "to_atlas.tfm").stat().st_mtime_ns == stamp

    # another grid: nothing may be kept from the first run
    other = ["prepare", "--datalist", str(datalist), "--out", str(out), "--spacing", str(SPACING + 1),
             "--skull-strip", "morphology"]
    assert cli(other) == 1
    assert "2 registered, 0 already done, 1 failed of 3" in capsys.readouterr().out
    assert sitk.ReadImage(str(out / "c1" / "image.nii.gz")).GetSize() == load_atlas(spacing=SPACING + 1).image.GetSize()
    # a changed input is registered again, the unchanged one is not
    write_scan(tmp_path / "in" / "c2" / "flair.nii.gz", 3.0)
    assert cli(other) == 1
    assert "1 registered, 1 already done, 1 failed of 3" in capsys.readouterr().out
    assert oct((out / "datalist.json").stat().st_mode & 0o777) == "0o644"


def test_prepare_csv_datalist(tmp_path: Path, capsys) -> None:
    write_scan(tmp_path / "x" / "flair.nii.gz", 0.0)
    (tmp_path / "list.csv").write_text("id,image,label,class\nx,x/flair.nii.gz,,\n", encoding="utf-8")
    out = tmp_path / "prep"
    assert cli(["prepare", "--datalist", str(tmp_path / "list.csv"), "--out", str(out), "--spacing", str(SPACING),
                "--skull-strip", "morphology"]) == 0
    assert json.loads((out / "datalist.json").read_text(encoding="utf-8"))["training"][0]["image"] == "x/image.nii.gz"


@pytest.mark.slow
def test_real_pair_passes_the_shared_agreement_check(real_data: Path, tmp_path: Path) -> None:
    """Both TCGA-FG-6692 FLAIRs prepared on the default atlas; the shared checker must accept them."""
    case = real_data / "TCGA-FG-6692"
    entries = [{"id": "native", "image": str(case / "native" / "flair.nii.gz")},
               {"id": "sri", "image": str(case / "sri24" / "flair_brain.nii.gz"),
                "label": str(case / "sri24" / "seg_consensus.nii.gz")}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    out = tmp_path / "prep"
    assert cli(["prepare", "--datalist", str(tmp_path / "datalist.json"), "--out", str(out), "--workers", "2"]) == 0
    checker = real_data.parents[1] / "tools" / "registration_agreement.py"  # ../shared/tools
    if not checker.exists():
        pytest.skip(f"{checker} is absent")
    run = subprocess.run([sys.executable, str(checker), str(out), str(case)], capture_output=True, text=True,
                         encoding="utf-8", errors="replace")
    assert run.returncode == 0, run.stdout + run.stderr


def test_prepare_several_sequences_registers_the_flair_once_for_all(tmp_path: Path) -> None:
    flair = write_scan(tmp_path / "in" / "c1" / "flair.nii.gz", 10.0)
    sitk.WriteImage(flair * 3.0 + 5.0, str(tmp_path / "in" / "c1" / "t2.nii.gz"))
    datalist = tmp_path / "in" / "datalist.json"
    datalist.write_text(json.dumps({"sequences": ["t2", "flair"], "training": [
        {"id": "c1", "image": ["c1/t2.nii.gz", "c1/flair.nii.gz"]}]}), encoding="utf-8")
    out = tmp_path / "prep"
    assert cli(["prepare", "--datalist", str(datalist), "--out", str(out), "--spacing", str(SPACING),
                "--skull-strip", "morphology"]) == 0
    prepared = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert prepared["sequences"] == ["t2", "flair"]
    assert prepared["training"][0]["image"] == ["c1/t2.nii.gz", "c1/flair.nii.gz"]
    f = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c1" / "flair.nii.gz")))
    t = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c1" / "t2.nii.gz")))
    inside = f > 1e-3
    np.testing.assert_allclose(t[inside], 3.0 * f[inside] + 5.0, rtol=1e-5, atol=1e-3)
    assert cli(["prepare", "--datalist", str(datalist), "--out", str(out), "--spacing", str(SPACING),
                "--skull-strip", "morphology"]) == 0  # finished: nothing redone
