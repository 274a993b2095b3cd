"""The MONAI model-zoo checks that run offline: workflow properties of train,
train + evaluate and inference; ``verify_net_in_out`` and ``ckpt_export`` from the command line with
the metadata round-tripping into the exported file; the bundle's file set; and a copy of the bundle
folder running training, evaluation and inference from its own root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers import TINY as BASE

BUNDLE = ROOT / "bundles" / "plgg_mtl"
TINY = {**BASE, "batch_size": 2}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def cli(args: list[str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> dict[str, Path]:
    """The bundle folder copied elsewhere, a tiny cohort, a tiny overlay and weights trained from there."""
    from pipeline.data.phantom.build import make_cohort

    base = tmp_path_factory.mktemp("zoo")
    bundle = base / "plgg_mtl"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("*.pt", "*.ts"))
    datalist = Path(make_cohort(base / "cohort", cases=8, seed=2, spacing=6.0, space="atlas").datalist)
    overlay = base / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    run = base / "run"
    out = cli(["run", "training", "--config_file", repr(["configs/train.json", str(overlay)]), "--datalist",
               str(datalist), "--output_dir", str(run), "--epochs", "1"], cwd=bundle)
    assert "[decide] on" in out
    return {"bundle": bundle, "datalist": datalist, "overlay": overlay, "run": run, "base": base}


def test_bundle_file_set():
    assert (BUNDLE / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    assert "MNI" in (BUNDLE / "docs" / "data_license.txt").read_text(encoding="utf-8")
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert "optional_packages_version" not in meta and "plgg-mtl" in meta["required_packages_version"]
    assert all(isinstance(v, int | float) for v in meta["eval_metrics"].values())
    assert meta["network_data_format"]["outputs"]["class_logits"]["type"] == "logits"
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"):
        text = (BUNDLE / "configs" / name).read_text(encoding="utf-8")
        assert re.search(r'"%[^"#]*\.(json|yaml)#', text) is None, name  # no file reached relative to the working folder
    card = (BUNDLE / "docs" / "README.md").read_text(encoding="utf-8")
    for section in ("Authors", "Tags", "Model Overview", "Performance", "System Configuration", "References",
                    "License", "TensorRT support"):
        assert f"## {section}" in card


def test_training_and_inference_configs_share_their_settings():
    """train.json and inference.json are each whole (as model-zoo bundles): every setting both hold
    (network, atlas, normalisation, the loading chain ...) is the same in both, but for those that
    differ by role."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text(encoding="utf-8"))
    infer = json.loads((BUNDLE / "configs" / "inference.json").read_text(encoding="utf-8"))
    by_role = {"dataset_dir", "output_dir", "ckpt", "cache_dir", "input_sequences", "registration_settings", "network",
               "initialize", "run"}
    shared = [k for k in train if k in infer and k not in by_role]
    assert {"network_def", "network_seg", "atlas_path", "intensity_norm", "coord_channels", "patch_size"} <= set(shared)
    assert [k for k in shared if train[k] != infer[k]] == []
    assert train["train"]["deterministic_transforms"] == infer["preprocessing_transforms"]


def test_bundle_parses_from_the_zoo_root(copy):
    """The model zoo's CI reads a bundle from the zoo's root (``models/<name>/configs/...``)."""
    from monai.bundle import ConfigParser

    zoo = copy["base"] / "zoo"
    (zoo / "models").mkdir(parents=True, exist_ok=True)
    target = zoo / "models" / "plgg_mtl"
    if not target.exists():
        shutil.copytree(copy["bundle"], target)
    cwd = os.getcwd()
    os.chdir(zoo)
    try:
        for name in ("train.json", "inference.json"):
            parser = ConfigParser()
            parser.read_config(f"models/plgg_mtl/configs/{name}")
            parser.read_meta("models/plgg_mtl/configs/metadata.json")
            net = parser.get_parsed_content("network_def")
            assert net.__class__.__name__ == "MultiTaskSegResNet", name
    finally:
        os.chdir(cwd)


def test_copied_bundle_evaluates_and_infers_from_its_own_folder(copy):
    bundle, run = copy["bundle"], copy["run"]
    assert (run / "models" / "model.pt").is_file()
    common = ["--datalist", str(copy["datalist"]), "--output_dir", str(run)]
    out = cli(["run", "--config_file", repr(["configs/train.json", "configs/evaluate.json", str(copy["overlay"])]),
               *common], cwd=bundle)
    assert "evaluation on" in out and json.loads((run / "metrics.json").read_text(encoding="utf-8"))["n_cases"] >= 1
    scans = copy["base"] / "scans"
    scans.mkdir()
    first = json.loads(copy["datalist"].read_text(encoding="utf-8"))["training"][0]
    shutil.copy(copy["datalist"].parent / first["image"], scans / "case1.nii.gz")
    out = cli(["run", "--config_file", repr(["configs/inference.json", str(copy["overlay"])]), "--input_dir",
               str(scans), "--output_dir", str(copy["base"] / "pred"), "--ckpt", str(run / "models" / "model.pt"),
               "--pattern", "['*']"], cwd=bundle)
    assert (copy["base"] / "pred" / "case1" / "seg.nii.gz").is_file(), out[-2000:]


def test_workflow_properties(copy, tmp_path):
    from monai.bundle import ConfigWorkflow

    cfg = BUNDLE / "configs"
    common = {"datalist": str(copy["datalist"]), "output_dir": str(tmp_path / "props")}
    cases = [([cfg / "train.json"], "train", common),
             ([cfg / "train.json", cfg / "evaluate.json"], "infer", common),
             ([cfg / "inference.json"], "infer", {"input_dir": str(copy["datalist"].parent), "pattern": ["image*"],
                                                  "output_dir": str(tmp_path / "inf"),
                                                  "ckpt": str(copy["run"] / "models" / "model.pt")})]
    for files, kind, kw in cases:
        workflow = ConfigWorkflow(config_file=[str(f) for f in files] + [str(copy["overlay"])], workflow_type=kind,
                                  meta_file=str(cfg / "metadata.json"), logging_file=None, **kw)
        workflow.initialize()
        assert workflow.check_properties() == [], files
    # as the model zoo checks a bundle: its weights in place, no input named yet
    bare = ConfigWorkflow(config_file=[str(cfg / "inference.json"), str(copy["overlay"])], workflow_type="infer",
                          meta_file=str(cfg / "metadata.json"), logging_file=None,
                          ckpt=str(copy["run"] / "models" / "model.pt"))
    bare.initialize()
    assert bare.check_properties() == []


def test_verify_net_in_out_and_ckpt_export(copy, tmp_path):
    bundle = copy["bundle"]
    out = cli(["verify_net_in_out", "network_seg", "--meta_file", "configs/metadata.json", "--config_file",
               repr(["configs/inference.json", str(copy["overlay"])]), "--n", "2"], cwd=bundle)
    assert "verified with no error" in out
    ts = tmp_path / "model.ts"
    cli(["ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(copy["run"] / "models" / "model.pt"),
         "--meta_file", "configs/metadata.json", "--config_file", repr(["configs/inference.json", str(copy["overlay"])])],
        cwd=bundle)
    extra = {"metadata.json": ""}
    model = torch.jit.load(str(ts), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    source = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] == source["version"]
    assert meta["required_packages_version"] == source["required_packages_version"]  # not emptied on the way
    seg, logits, _ = model(torch.rand(1, 4, 16, 16, 16))
    assert seg.shape == (1, 1, 16, 16, 16) and logits.shape == (1, 3)
