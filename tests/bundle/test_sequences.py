"""Two sequences per case from the datalist to the exported model: a two-channel synthetic training,
evaluation, folder inference on BraTS-named sub-folders (a case missing a sequence fails alone), and
the TorchScript and ONNX exports against the PyTorch checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.helpers import INFER, ROOT, TRAIN, bundle, train_and_evaluate


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    from pipeline.data.phantom.build import make_cohort

    tmp = tmp_path_factory.mktemp("two")
    cohort = make_cohort(tmp / "cohort", cases=8, seed=4, spacing=6.0, space="atlas", sequences=("flair", "t2"))
    datalist, run, overlay, log = train_and_evaluate(tmp, ["TINY"], seed=4, name="run", datalist=cohort.datalist)
    return {"tmp": tmp, "datalist": datalist, "run": run, "overlay": overlay, "log": log}


def _rows(folder):
    with (folder / "predictions.csv").open() as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_trains_on_two_channels_and_records_them(two_channel):
    models = two_channel["run"] / "models"
    assert json.loads((models / "inputs.json").read_text(encoding="utf-8"))["sequences"] == ["flair", "t2"]
    image = json.loads((models / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 5 and image["sequences"] == ["flair", "t2"]  # + 3 coordinate channels
    weights = torch.load(models / "model.pt", weights_only=True)
    first_conv = next(v for k, v in weights.items() if k.endswith("conv.weight") and v.ndim == 5)
    assert first_conv.shape[1] == 2
    assert json.loads((two_channel["run"] / "metrics.json").read_text(encoding="utf-8"))["n_cases"] >= 1


def test_folder_inference_and_exports(two_channel, tmp_path):
    cohort, run, overlay = two_channel["datalist"].parent, two_channel["run"], two_channel["overlay"]
    scans = tmp_path / "scans"
    for cid in ("c000", "c001", "c002"):
        (scans / cid).mkdir(parents=True)
        shutil.copy(cohort / cid / "image.nii.gz", scans / cid / f"{cid}_flair.nii.gz")
        shutil.copy(cohort / cid / "t2.nii.gz", scans / cid / f"{cid}_t2.nii.gz")
    (scans / "c002" / "c002_t2.nii.gz").unlink()
    ckpt = run / "models" / "model.pt"
    done = bundle(["run"], [INFER, overlay], input_dir=scans, output_dir=tmp_path / "pt", ckpt=ckpt, write_prob=True,
                  postprocess="none")
    assert done.returncode == 1, done.stderr[-2000:]  # one case failed, the others ran
    rows = _rows(tmp_path / "pt")
    assert rows["c000"]["status"] == rows["c001"]["status"] == "ok"
    assert rows["c002"]["status"].startswith("failed: no t2 sequence")
    assert not (tmp_path / "pt" / "c002" / "seg.nii.gz").exists()
    seg = sitk.ReadImage(str(tmp_path / "pt" / "c000" / "seg.nii.gz"))
    flair = sitk.ReadImage(str(scans / "c000" / "c000_flair.nii.gz"))
    assert seg.GetSize() == flair.GetSize() and np.allclose(seg.GetOrigin(), flair.GetOrigin())

    # exports take the two sequences (and say so) and give what the checkpoint gives (no post-processing:
    # on a barely trained network a 1e-6 difference can tip which component a rule keeps)
    ts = tmp_path / "model.ts"
    done = bundle(["ckpt_export", "network_def"], [INFER, overlay], filepath=ts, ckpt_file=ckpt, ckpt=ckpt,
                  meta_file=run / "models" / "metadata.json")
    assert done.returncode == 0, done.stderr[-2000:]
    onnx_file = tmp_path / "model.onnx"
    done = subprocess.run([sys.executable, "-m", "pipeline", "onnx", "--ckpt", str(ckpt), "--out", str(onnx_file),
                           "--config_file", str(ROOT / INFER), str(overlay)], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inputs (batch, 5, x, y, z): flair, t2 and 3 coordinate channel(s)" in done.stdout
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["sequences"] == ["flair", "t2"]
    for name, exported in (("ts", ts), ("onnx", onnx_file)):
        done = bundle(["run"], [INFER, overlay], input_dir=scans, output_dir=tmp_path / name, ckpt=exported,
                      write_prob=True, postprocess="none")
        assert done.returncode == 1, done.stderr[-2000:]
        got = _rows(tmp_path / name)
        for cid in ("c000", "c001"):
            for key in ("p_BRAF V600E", "p_BRAF fusion", "p_other"):
                assert abs(float(got[cid][key]) - float(rows[cid][key])) < 1e-4, (name, cid, key)
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / cid / "prob.nii.gz")))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pt" / cid / "prob.nii.gz")))
            assert np.abs(a - b).max() < 1e-4, (name, cid)


def test_config_asking_for_other_sequences_is_refused(two_channel, tmp_path):
    overlay = tmp_path / "other.json"
    overlay.write_text(json.dumps({**json.loads(two_channel["overlay"].read_text(encoding="utf-8")), "sequences": ["t2", "flair"]}))
    done = bundle(["run"], [INFER, overlay], input_dir=tmp_path, output_dir=tmp_path / "out",
                  ckpt=two_channel["run"] / "models" / "model.pt")
    assert done.returncode == 2
    assert "trained on the sequences ['flair', 't2'], in this order, but the config asks for ['t2', 'flair']" in done.stderr
    assert "Traceback" not in done.stderr


def test_intensity_augmentation_is_drawn_per_sequence():
    from monai.bundle import ConfigParser
    from monai.transforms import RandScaleIntensityd, RandShiftIntensityd

    parser = ConfigParser()
    parser.read_config([str(ROOT / TRAIN)])
    chain = parser.get_parsed_content("train#random_transforms")
    picked = [t for t in chain if isinstance(t, RandScaleIntensityd | RandShiftIntensityd)]
    assert len(picked) == 2
    for t in picked:
        t.set_random_state(0)
        out = t({"image": torch.ones(2, 4, 4, 4)})["image"]
        assert float(out[0].mean()) != float(out[1].mean())  # each sequence its own draw
