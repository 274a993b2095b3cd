"""configs/real.json end to end on real scans (skips without ../shared/data/real): a tiny training on
six BraTS 2018 FLAIRs through atlas registration, its evaluation with the lesion-wise metrics, then
folder inference on a fifth scan and its native-space score. Coarse 6 mm grid, one epoch: it proves
the recipe runs on real data, not that it learns (the model card's cross-validation does)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import CONFIGS, INFER, ROOT, TRAIN, bundle

REAL = "configs/real.json"
TRAINING_CASES = ["Brats18_2013_11_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA10_628_1", "Brats18_TCIA01_201_1",
                  "Brats18_CBICA_ALU_1", "Brats18_TCIA13_623_1"]
NEW_CASE = "Brats18_TCIA02_135_1"
TINY_REAL = {  # everything the cross-validation runs, at toy sizes
    "atlas_spacing": 6.0, "patch_size": [16, 16, 16], "batch_size": 2, "num_samples": 1, "epochs": 1,
    "val_interval": 1, "sw_batch_size": 4,
    "registration_settings": {"skull_strip": "none", "initial_rotations": [0.0], "refine_passes": 0,
                              "working_spacing": 6.0, "shrink_factors": [2, 1], "smoothing_sigmas": [4.0, 2.0],
                              "iterations": 40},
}


@pytest.mark.slow
@pytest.mark.real
def test_real_recipe_trains_evaluates_and_infers_on_real_scans(real_data: Path, tmp_path: Path) -> None:
    brats = real_data / "brats2018"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [
        {"id": c, "image": str(brats / c / "flair.nii.gz"), "label": str(brats / c / "seg.nii.gz")}
        for c in TRAINING_CASES]}), encoding="utf-8")
    overlay = tmp_path / "tiny_real.json"
    overlay.write_text(json.dumps(TINY_REAL), encoding="utf-8")
    run = tmp_path / "run"
    common = {"datalist": datalist, "output_dir": run, "registration_cache": tmp_path / "registration"}
    done = bundle(["run", "training"], [TRAIN, REAL, overlay], **common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = bundle(["run"], [TRAIN, f"{CONFIGS}/evaluate.json", REAL, overlay], **common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_with_mask"] >= 1
    for key in ("dice", "hd95_mm", "lesion_dice", "lesion_hd95_mm"):
        assert key in metrics
    assert 0.0 <= metrics["lesion_dice"] <= 1.0 and metrics["lesion_hd95_mm"] >= 0.0
    assert "lesion-wise Dice" in done.stdout + done.stderr

    scans, out = tmp_path / "scans", tmp_path / "predictions"
    scans.mkdir()
    (scans / f"{NEW_CASE}.nii.gz").symlink_to(brats / NEW_CASE / "flair.nii.gz")
    done = bundle(["run"], [INFER, REAL, overlay], input_dir=scans, output_dir=out, ckpt=run / "models" / "model.pt",
                  registration_cache=tmp_path / "registration")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok"]
    src, seg = nib.load(brats / NEW_CASE / "flair.nii.gz"), nib.load(out / NEW_CASE / "seg.nii.gz")
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"training": [{"id": NEW_CASE, "image": str(brats / NEW_CASE / "flair.nii.gz"),
                                               "label": str(brats / NEW_CASE / "seg.nii.gz")}]}), encoding="utf-8")
    scored = subprocess.run([sys.executable, "-m", "pipeline", "score", "--predictions", str(out), "--datalist",
                             str(truth)], cwd=ROOT, capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr[-2000:]
    case = json.loads((out / "score.json").read_text(encoding="utf-8"))["cases"][0]
    assert {"dice", "hd95_mm", "lesion_dice", "lesions_fp"} <= set(case)
