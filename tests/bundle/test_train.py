"""The real bundle configs through ``monai.bundle`` on a tiny synthetic cohort (CPU, 16-cubed
patches, no workers): training writes checkpoints and TensorBoard events, a killed run resumes
at its saved epoch, and evaluation writes metrics.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY

TRAIN = "bundles/plgg_mtl/configs/train.json"
EVALUATE = "bundles/plgg_mtl/configs/evaluate.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from pipeline.data.phantom.build import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    # a quarter of the cases without mask, a quarter without class: the chain and loss must cope
    return make_cohort(out, cases=8, seed=0, spacing=6.0, space="atlas", missing_mask=0.25, missing_class=0.25).datalist


def bundle(args: list[str], configs: list[str], overlay: Path, **kw) -> subprocess.Popen:
    files = [str(ROOT / c) for c in configs] + [str(overlay)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--config_file", repr(files)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture
def overlay(tmp_path) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY), encoding="utf-8")
    return p


def scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for f in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | {f"image:{t}" for t in acc.Tags()["images"]}
    return tags


def test_train_two_iterations_then_evaluate(cohort, overlay, tmp_path):
    run = tmp_path / "run"
    out = finish(bundle(["training"], [TRAIN, "configs/demo.json"], overlay, datalist=cohort, output_dir=run, epochs=1))
    assert "Epoch: 1/1, Iter: 2/2" in out  # 6 training cases, batch 3
    ckpts = sorted(p.name for p in (run / "models").iterdir())
    assert "model.pt" in ckpts and "checkpoint_epoch=1.pt" in ckpts
    import torch

    state = torch.load(run / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "trainer", "lr_scheduler", "best_model"} <= set(state)
    assert state["best_model"]["_saved"][0][1].startswith("model")  # best score so far, carried over a resume
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 2  # = epoch 1
    tags = scalar_tags(run / "tensorboard")
    assert {"loss", "loss_seg", "loss_cls", "lr", "val_mean_dice", "val_balanced_accuracy", "val_auc"} <= tags, tags
    assert any(t.startswith("image:") for t in tags)
    assert json.loads((run / "split.json").read_text(encoding="utf-8"))["splits"][0]["test"]
    # after training, model.pt's post-processing rule and temperature were decided on validation
    decision = json.loads((run / "models" / "postprocessing.json").read_text(encoding="utf-8"))
    assert decision["postprocess"] in ("none", "largest", "confident") and decision["temperature"] > 0
    assert "[decide] on" in out

    out = finish(bundle([], [TRAIN, EVALUATE, "configs/demo.json"], overlay, datalist=cohort, output_dir=run))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert {"dice", "accuracy", "balanced_accuracy", "auc"} <= set(metrics)
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_cases"] == 1
    assert metrics["accuracy"] in (0.0, 1.0) and metrics["balanced_accuracy"] == metrics["accuracy"]  # one case
    assert (run / "cases.csv").read_text(encoding="utf-8").startswith("id,dice")
    assert metrics["postprocessing"] == decision["postprocess"]  # "auto" read the decision back
    assert metrics["temperature"] == pytest.approx(decision["temperature"])
    assert metrics["surface_tolerance_mm"] == 1.0 and "hd95_mm" in metrics and "n_hd95_undefined" in metrics
    if metrics["n_with_mask"]:
        assert 0.0 <= metrics["surface_dice"] <= 1.0
        header = (run / "cases.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
        assert {"hd95_mm", "surface_dice", "boxes_true", "boxes_pred"} <= set(header)
        assert metrics["det_cases"] == metrics["n_with_mask"] and metrics["det_lesions"] >= 1  # a phantom has a tumour
        assert 0.0 <= metrics["det_ap_iou0.25"] <= 1.0 and 0.0 <= metrics["det_sensitivity_fp1"] <= 1.0
        assert set(metrics["dice_by_postprocessing"]) == {"none", "largest", "confident"}
        assert metrics["dice_by_postprocessing"][decision["postprocess"]] == pytest.approx(metrics["dice"], abs=1e-6)
    if metrics["n_with_class"]:
        assert 0.0 <= metrics["ece"] <= 1.0 and (run / "reliability.png").is_file()


def test_killed_training_resumes_at_saved_epoch(cohort, overlay, tmp_path):
    run = tmp_path / "run"
    # the key metric may be any validation metric; the best model follows it across the resume
    proc = bundle(["training"], [TRAIN, "configs/demo.json"], overlay, datalist=cohort, output_dir=run, epochs=50,
                  key_metric="val_balanced_accuracy")
    deadline = time.time() + 240
    ckpt_dir = run / "models"
    while time.time() < deadline and not list(ckpt_dir.glob("checkpoint_epoch=*.pt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = sorted(ckpt_dir.glob("checkpoint_epoch=*.pt"))
    assert saved, "no checkpoint written before the kill"
    epoch = int(saved[-1].stem.split("=")[1])
    assert epoch < 50

    out = finish(bundle(["training"], [TRAIN, "configs/demo.json"], overlay, datalist=cohort, output_dir=run,
                        epochs=epoch + 1, key_metric="val_balanced_accuracy"))
    assert f"Restored all variables from {ckpt_dir / f'checkpoint_epoch={epoch}.pt'}" in out, out[-3000:]
    assert f"Epoch: {epoch + 1}/{epoch + 1}, Iter: 1/2" in out
    assert f"Epoch: 1/{epoch + 1}," not in out  # nothing re-trained from the start
    assert (ckpt_dir / f"checkpoint_epoch={epoch + 1}.pt").exists()
    assert (ckpt_dir / "model.pt").exists() and "Key metric: val_balanced_accuracy" in out


def test_a_resumed_training_ends_bit_for_bit_where_the_uninterrupted_one_does(cohort, overlay, tmp_path):
    import torch

    from pipeline.data.phantom.build import make_cohort

    # mixed training (the weighted order) and the demo's class head (dropout): every stream an epoch draws from
    extra = make_cohort(tmp_path / "extra", cases=4, seed=1, spacing=6.0, space="atlas").datalist
    data = json.loads(extra.read_text(encoding="utf-8"))
    for case in data["training"]:
        case["id"] = f"extra_{case['id']}"
    extra.write_text(json.dumps(data), encoding="utf-8")
    kw = {"datalist": cohort, "epochs": 3, "extra_train": extra}
    finish(bundle(["training"], [TRAIN, "configs/demo.json"], overlay, output_dir=tmp_path / "whole", **kw))
    # the same run stopped after its first epoch (its schedule still that of 3 epochs), then resumed
    stopped = tmp_path / "stopped"
    finish(bundle(["training"], [TRAIN, "configs/demo.json"], overlay, output_dir=stopped, **kw,
                  **{"train#trainer#max_epochs": 1}))
    out = finish(bundle(["training"], [TRAIN, "configs/demo.json"], overlay, output_dir=stopped, **kw))
    assert "Restored all variables from" in out and "checkpoint_epoch=1.pt" in out, out[-3000:]
    whole = torch.load(tmp_path / "whole" / "models" / "checkpoint_epoch=3.pt", map_location="cpu", weights_only=False)
    resumed = torch.load(stopped / "models" / "checkpoint_epoch=3.pt", map_location="cpu", weights_only=False)
    assert whole["network"].keys() == resumed["network"].keys()
    assert all(torch.equal(whole["network"][k], resumed["network"][k]) for k in whole["network"])
    states = zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True)
    moments = [(a[k], b[k]) for a, b in states for k in a if torch.is_tensor(a[k])]
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_bad_input_stops_before_training_with_clear_message(cohort, overlay, tmp_path):
    data = json.loads(cohort.read_text(encoding="utf-8"))
    data["training"][0]["class"] = "BRAF V601X"
    data["training"][1]["image"] = "nowhere/flair.nii.gz"
    for e in data["training"]:
        e["image"] = str(cohort.parent / e["image"])
        if "label" in e:
            e["label"] = str(cohort.parent / e["label"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    run = tmp_path / "run"
    proc = bundle(["training"], [TRAIN, "configs/demo.json"], overlay, datalist=bad, output_dir=run, epochs=1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out
    assert "unknown class name 'BRAF V601X'" in out and "nowhere/flair.nii.gz" in out
    assert not (run / "models").exists()  # nothing trained


def test_second_training_on_one_output_folder_is_refused(cohort, overlay, tmp_path):
    from pipeline.runtime.locks import folder_lock

    run = tmp_path / "run"
    with folder_lock(run, "training"):  # a training already writing this folder
        proc = bundle(["training"], [TRAIN, "configs/demo.json"], overlay, datalist=cohort, output_dir=run, epochs=1)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in out
    assert f"{run}: is in use by another training (training, pid" in out
    assert not (run / "models").exists() and not (run / "tensorboard").exists()


def test_extra_training_cases_are_drawn_beside_the_split(cohort, tmp_path, monkeypatch):
    """``--extra_train``: a second datalist's cases in the training dataset, an epoch as long as the
    split's own, the extra cases at about their share of the draws."""
    import torch
    from monai.bundle import ConfigParser
    from torch.utils.data import WeightedRandomSampler

    from pipeline.data.phantom.build import make_cohort

    extra = make_cohort(tmp_path / "extra", cases=6, seed=1, spacing=6.0, space="atlas").datalist
    doc = json.loads(Path(extra).read_text(encoding="utf-8"))
    for e in doc["training"]:
        e["id"] = "synthetic_" + e["id"]
    Path(extra).write_text(json.dumps(doc), encoding="utf-8")
    monkeypatch.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config([str(ROOT / TRAIN)])
    parser.update({**TINY, "datalist": str(cohort), "output_dir": str(tmp_path / "run"), "extra_train": str(extra),
                   "extra_train_share": 0.5, "batch_size": 1})
    cohort_items = parser.get_parsed_content("cohort")
    own = len(cohort_items.train) - 6
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler.sampler, WeightedRandomSampler) and len(loader.sampler) == own
    assert len(loader.dataset) == own + 6
    torch.manual_seed(0)
    draws = [i for _ in range(200) for i in loader.sampler]
    assert 0.3 < sum(i >= own for i in draws) / len(draws) < 0.7
    batches = list(loader)  # the extra cases go through the same chain as the split's own
    assert len(batches) == own and all(b["image"].shape[-3:] == (16, 16, 16) for b in batches)
