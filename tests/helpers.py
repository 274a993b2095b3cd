"""What the tests share: the repository's paths, a tiny overlay, running a bundle command in a
subprocess as a user would, a tiny training and evaluation, and a DICOM series writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]  # the repository
CONFIGS = "bundles/plgg_mtl/configs"
TRAIN, INFER, DEMO = f"{CONFIGS}/train.json", f"{CONFIGS}/inference.json", "configs/demo.json"
CHEAP_REGISTRATION = {"_target_": "pipeline.registration.settings.RegistrationSettings", "skull_strip": "morphology"}
TINY = {
    "already_registered": True, "atlas_spacing": 6.0, "patch_size": [16, 16, 16], "init_filters": 8,
    "cls_hidden": [8], "batch_size": 3, "num_samples": 1, "num_workers": 0, "val_interval": 1,
    "sw_batch_size": 4, "lr": 0.001, "registration_settings": CHEAP_REGISTRATION,
}


def bundle(command: list[str], configs: list[str | Path], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    files = [str(ROOT / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", *command, "--config_file", repr(files)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=env, timeout=timeout)


def train_and_evaluate(tmp_path: Path, configs: list, seed: int, extra: dict | None = None, name: str = "run",
                       datalist: Path | None = None, epochs: int = 1) -> tuple[Path, Path, Path, str]:
    """Train ``train.json`` + ``configs`` (the tiny overlay replaces the string ``"TINY"`` in them)
    for ``epochs`` epochs (one by default) on a fresh 8-case phantom cohort (or ``datalist``), then evaluate it.

    Returns ``(datalist, run folder, tiny overlay, training output)``; asserts both commands succeed.
    """
    from pipeline.data.phantom.build import make_cohort

    if datalist is None:
        datalist = make_cohort(tmp_path / "cohort", cases=8, seed=seed, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / f"tiny_{name}.json"
    overlay.write_text(json.dumps({**TINY, **(extra or {})}), encoding="utf-8")
    files = [overlay if c == "TINY" else c for c in configs]
    run = tmp_path / name
    done = bundle(["run", "training"], [TRAIN, *files], datalist=datalist, output_dir=run, epochs=epochs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trained = done.stdout + done.stderr
    done = bundle(["run"], [TRAIN, f"{CONFIGS}/evaluate.json", *files], datalist=datalist, output_dir=run)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return datalist, run, overlay, trained


def write_dicom_series(image: sitk.Image, folder: Path, number: int = 1, description: str = "FLAIR") -> Path:
    """Write ``image`` as a real DICOM series (one int16 file per slice, geometry in the tags);
    ``number`` numbers the series UID, so two calls into one folder make two series."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(sitk.RescaleIntensity(image, 0, 2000), sitk.sitkInt16)
    d = img.GetDirection()
    series = [("0008|0060", "MR"), ("0008|103e", description), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.1"),
              ("0020|000e", f"1.2.826.0.1.3680043.2.1125.1.2.{number}"), ("0008|0008", "DERIVED\\SECONDARY"),
              ("0020|0052", "1.2.826.0.1.3680043.2.1125.1.4"), ("0010|0020", "PHANTOM1"), ("0010|0010", "Phantom^One"),
              ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in series:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.3.{number}.{k + 1}")
        sl.SetMetaData("0018|0050", f"{img.GetSpacing()[2]:.6f}")
        writer.SetFileName(str(folder / f"s{number}_slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder
