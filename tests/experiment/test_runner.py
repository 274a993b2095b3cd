"""``python -m pipeline experiment`` end to end on a tiny phantom cohort (CPU, 2 repeats x 2 arms x
1 epoch): the split file, the tables, skipping finished runs, a failed run, unscored cases."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY

pytestmark = pytest.mark.slow


def experiment(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", "experiment", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=env, timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from pipeline.data.datalist import load_datalist
    from pipeline.data.phantom.build import make_cohort
    from pipeline.data.splits import repeated_ratio_splits

    base = tmp_path_factory.mktemp("experiment")
    datalist = make_cohort(base / "cohort", cases=14, seed=3, spacing=6.0, space="atlas").datalist
    # the masks of a test case of split 0 and of a training case are taken away (splits are stratified
    # by class, so they stay those the experiment makes): that test case cannot be scored for Dice
    split0 = repeated_ratio_splits(load_datalist(datalist).cases, 2, seed=0)[0]
    doc = json.loads(Path(datalist).read_text(encoding="utf-8"))
    for e in doc["training"]:
        if e["id"] in (split0["test"][0], split0["train"][0]):
            del e["label"]
    Path(datalist).write_text(json.dumps(doc), encoding="utf-8")
    overlay = base / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    out = base / "exp"
    args = ["--datalist", str(datalist), "--out", str(out), "--repeats", "2", "--epochs", "1",
            "--overlays", "configs/demo.json", str(overlay)]
    first = experiment(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"datalist": datalist, "overlay": overlay, "out": out, "args": args, "first": first, "base": base}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_tables_have_a_row_per_arm_and_split(setup):
    out = setup["out"]
    rows = read_csv(out / "results.csv")
    assert [(r["arm"], r["split"]) for r in rows] == [("seg", "0"), ("mtl", "0"), ("seg", "1"), ("mtl", "1")]
    for col in ("val_dice", "test_dice", "test_balanced_accuracy", "best_epoch", "epochs", "seconds"):
        assert col in rows[0]
    assert all(r["status"] == "complete" and r["best_epoch"] == "1" for r in rows)
    dl = json.loads(Path(setup["datalist"]).read_text(encoding="utf-8"))
    with_mask = {e["id"] for e in dl["training"] if "label" in e}
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))["splits"]
    for r in rows:  # validation Dice exists exactly when a validation case has a mask
        assert (r["val_dice"] != "") == bool(set(splits[int(r["split"])]["val"]) & with_mask)
    assert all(r["test_balanced_accuracy"] == "" for r in rows if r["arm"] == "seg")  # no classifier
    assert all(r["test_balanced_accuracy"] != "" for r in rows if r["arm"] == "mtl")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for arm in ("seg", "mtl"):
        dice = [float(r["test_dice"]) for r in rows if r["arm"] == arm]
        assert summary["arms"][arm]["test_dice_mean"] == pytest.approx(sum(dice) / 2, abs=1e-5)
        assert summary["arms"][arm]["test_dice_sd"] is not None
    paired = summary["paired"]
    assert paired["single_task_arm"] == "seg" and paired["splits"]["n"] == 2
    assert "wilcoxon_p" in paired["splits"] and "wilcoxon_p" in paired["cases"] and "mean_difference" in paired
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Wilcoxon" in (out / "summary.md").read_text(encoding="utf-8")
    # the boundary and lesion-wise figures per split, and the pooled test cases (each once per split)
    for r in rows:
        for col in ("test_hd95_mm", "test_surface_dice", "test_lesion_dice", "test_lesion_hd95_mm", "test_box_ap25",
                    "test_box_sensitivity_fp1"):
            assert r[col] != "", col
        assert 0.0 <= float(r["test_lesion_dice"]) <= 1.0 and float(r["test_lesions_tp"]) >= 0
        assert 0.0 <= float(r["test_box_ap25"]) <= 1.0 and 0.0 <= float(r["test_box_sensitivity_fp1"]) <= 1.0
        assert r["test_head_box_ap25"] == "" == r["test_head_box_sensitivity_fp1"]  # no detection head in these arms
    cases = read_csv(out / "cases.csv")
    for arm in ("seg", "mtl"):
        scored = [float(c["lesion_dice"]) for c in cases if c["arm"] == arm and c["dice"] != ""]
        pooled = summary["arms"][arm]["pooled_cases"]
        assert pooled["n"] == len(scored) and pooled["lesion_dice"]["mean"] == pytest.approx(sum(scored) / len(scored), abs=1e-5)  # csv rounds
    assert "lesion Dice" in (out / "summary.md").read_text(encoding="utf-8") and "mask boxes AP" in (out / "summary.md").read_text(encoding="utf-8")
    for arm in ("seg", "mtl"):
        run = out / "runs" / arm / "split1"
        assert "--split_index 1" in (run / "command.txt").read_text(encoding="utf-8")
        assert list(run.glob("events.out.tfevents.*")), "TensorBoard events named <arm>/split<k> under runs/"


def test_cases_without_a_mask_are_not_scored(setup):
    out = setup["out"]
    dl = json.loads(Path(setup["datalist"]).read_text(encoding="utf-8"))
    no_mask = {e["id"] for e in dl["training"] if "label" not in e}
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))["splits"]
    cases = read_csv(out / "cases.csv")
    rows = read_csv(out / "results.csv")
    assert no_mask, "the cohort must have cases without a mask"
    for k, split in enumerate(splits):
        test = set(split["test"])
        for arm in ("seg", "mtl"):
            mine = [c for c in cases if c["split"] == str(k) and c["arm"] == arm]
            assert {c["id"] for c in mine} == test
            assert all((c["dice"] == "") == (c["id"] in no_mask) for c in mine)
            row = next(r for r in rows if r["arm"] == arm and r["split"] == str(k))
            assert int(row["n_test_with_mask"]) == len(test - no_mask)
    assert any(set(s["test"]) & no_mask for s in splits), "some test case is unscored"


def test_rerun_reuses_the_splits_and_skips_finished_runs(setup):
    out = setup["out"]
    splits_before = (out / "splits.json").read_bytes()
    logs_before = {p: p.stat().st_size for p in (out / "runs").glob("*/*/log.txt")}
    again = experiment(*setup["args"])
    assert again.returncode == 0, again.stdout[-3000:]
    assert "4 already complete, 0 to run" in again.stdout
    assert (out / "splits.json").read_bytes() == splits_before
    assert {p: p.stat().st_size for p in (out / "runs").glob("*/*/log.txt")} == logs_before  # nothing ran


def test_a_failed_run_is_reported_and_the_others_finish(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"init_filters": "$this_name_does_not_exist"}), encoding="utf-8")
    out = tmp_path / "exp"
    res = experiment("--datalist", str(setup["datalist"]), "--out", str(out), "--repeats", "1", "--epochs", "1",
                     "--overlays", "configs/demo.json", str(setup["overlay"]), "--arms", f"broken={bad},seg")
    assert res.returncode == 1, res.stdout[-3000:]
    assert "FAILED broken/split0" in res.stdout
    rows = {r["arm"]: r for r in read_csv(out / "results.csv")}
    assert rows["broken"]["status"] == "failed" and "training exited" in rows["broken"]["error"]
    assert rows["seg"]["status"] == "complete" and rows["seg"]["test_dice"] != ""


def test_changed_settings_are_refused_without_overwrite(setup, tmp_path):
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(setup["out"], out)  # a moved experiment keeps its finished runs
    args = [a if a != str(setup["out"]) else str(out) for a in setup["args"]]
    res = experiment(*args)
    assert res.returncode == 0 and "4 already complete" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = experiment(*[a if a != "1" else "2" for a in args])  # --epochs 2
    assert res.returncode == 2 and "--overwrite" in res.stderr
    res = experiment(*[a if a != "2" else "3" for a in args])  # --repeats 3: the splits never change
    assert res.returncode == 2 and "splits.json" in res.stderr


def test_fingerprints_follow_config_contents_not_paths(tmp_path):
    from pipeline.experiment.plan import ExperimentConfig, config_contents, plan_runs
    from pipeline.io.errors import InputError

    shared = tmp_path / "shared.json"
    shared.write_text('{"lr": 0.01}', encoding="utf-8")
    referring = tmp_path / "referring.json"
    referring.write_text(json.dumps({"lr": f"%{shared}#lr"}), encoding="utf-8")
    names = [n for n, _ in config_contents(["bundles/plgg_mtl/configs/train.json", str(referring)])]
    assert names == ["bundle:train.json", "referring.json", "shared.json"]  # reached through its %path#id macro
    dl = tmp_path / "a" / "datalist.json"
    dl.parent.mkdir()
    dl.write_text('{"classes": ["x"], "training": []}', encoding="utf-8")
    overlay = tmp_path / "a" / "o.json"
    overlay.write_text(json.dumps({"epochs": 3}), encoding="utf-8")
    split = [{"name": "r0", "train": ["a"], "val": ["b"], "test": ["c"]}]

    def fingerprints(datalist: Path, ov: Path, out: Path) -> list[str]:
        cfg = ExperimentConfig(datalist=datalist, out=out, overlays=[str(ov)], arms=["seg", "mtl"])
        return [s.fingerprint for s in plan_runs(cfg, split)]

    first = fingerprints(dl, overlay, tmp_path / "e1")
    assert len(set(first)) == 2  # the arms differ
    moved = tmp_path / "b"
    moved.mkdir()
    (moved / "datalist.json").write_text(dl.read_text(encoding="utf-8"))
    (moved / "o.json").write_text(overlay.read_text(encoding="utf-8"))
    assert fingerprints(moved / "datalist.json", moved / "o.json", tmp_path / "e2") == first
    (moved / "o.json").write_text(json.dumps({"epochs": 4}), encoding="utf-8")
    assert set(fingerprints(moved / "datalist.json", moved / "o.json", tmp_path / "e2")).isdisjoint(first)
    with pytest.raises(InputError, match="twice"):
        plan_runs(ExperimentConfig(datalist=dl, out=tmp_path / "e3", arms=["seg", "seg"]), split)


def test_a_learning_curve_point_keeps_the_folds_test_cases(tmp_path):
    from pipeline.experiment.plan import ExperimentConfig, make_or_load_splits
    from pipeline.io.errors import InputError

    dl = tmp_path / "datalist.json"
    import SimpleITK as sitk

    for i in range(12):  # the splits need the files to exist, not their contents
        sitk.WriteImage(sitk.Image(2, 2, 2, sitk.sitkUInt8), str(tmp_path / f"{i}.nii.gz"))
    dl.write_text(json.dumps({"training": [{"id": f"c{i:02d}", "image": f"{i}.nii.gz"} for i in range(12)]}), encoding="utf-8")
    full = make_or_load_splits(ExperimentConfig(datalist=dl, out=tmp_path / "full", kind="kfold", folds=3))
    cfg = ExperimentConfig(datalist=dl, out=tmp_path / "n2", kind="kfold", folds=3, train_cases=2)
    fewer = make_or_load_splits(cfg)
    assert [s["test"] for s in fewer] == [s["test"] for s in full]
    assert all(len(s["train"]) == 2 and set(s["train"]) < set(f["train"]) for s, f in zip(fewer, full, strict=True))
    assert make_or_load_splits(cfg) == fewer  # re-read, not redrawn
    with pytest.raises(InputError, match="train_cases"):  # the splits of an experiment never change
        make_or_load_splits(ExperimentConfig(datalist=dl, out=tmp_path / "n2", kind="kfold", folds=3, train_cases=3))


def test_kfold_classifier_alone_against_multitask(setup, tmp_path):
    out = tmp_path / "cv"
    res = experiment("--datalist", str(setup["datalist"]), "--out", str(out), "--kind", "kfold", "--folds", "2",
                     "--arms", "cls,mtl", "--epochs", "1", "--overlays", "configs/demo.json", str(setup["overlay"]))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folds = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert folds["kind"] == "kfold"
    tests = [set(s["test"]) for s in folds["splits"]]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1]) == 14  # every patient tested once
    rows = {(r["arm"], r["split"]): r for r in read_csv(out / "results.csv")}
    for k in ("0", "1"):
        assert rows[("cls", k)]["test_dice"] == "" and rows[("cls", k)]["val_dice"] == ""  # no decoder, no mask
        assert rows[("cls", k)]["test_balanced_accuracy"] != ""
    import torch

    weights = torch.load(out / "runs" / "cls" / "split0" / "models" / "model.pt", map_location="cpu", weights_only=True)
    weights = weights.get("model", weights)
    assert any(k.startswith("classifier.") for k in weights)
    assert not any(k.startswith(("up_layers.", "up_samples.", "conv_final.")) for k in weights)  # no decoder
    paired = json.loads((out / "summary.json").read_text(encoding="utf-8"))["paired"]
    assert paired["single_task_arm"] == "cls" and paired["metric"] == "test_balanced_accuracy"
    assert paired["cases"]["n"] == 14  # the probability of the true class, per case


def test_each_run_on_two_processes(setup, tmp_path):
    """``--gpus 0,1 --gpus-per-run 2``: the run trains under torchrun with multi_gpu_train.json (two
    gloo processes here, no GPU) and its result is reported like any other."""
    from pipeline.experiment.plan import gpu_slots

    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == ["0,1", "2,3"] and gpu_slots(["0", "1"], 1) == ["0", "1"]
    out = tmp_path / "ddp"
    res = experiment("--datalist", str(setup["datalist"]), "--out", str(out), "--repeats", "1", "--arms", "mtl",
                     "--epochs", "1", "--gpus", "0,1", "--gpus-per-run", "2", "--overlays", "configs/demo.json",
                     str(setup["overlay"]))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    command = (out / "runs" / "mtl" / "split0" / "command.txt").read_text(encoding="utf-8")
    assert "torch.distributed.run --standalone --nproc_per_node=2" in command and "multi_gpu_train.json" in command
    assert "on GPU 0,1" in res.stdout
    rows = read_csv(out / "results.csv")
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_dice"]) <= 1.0
    assert len(list((out / "runs" / "mtl" / "split0").glob("events.out.tfevents.*"))) == 1  # rank 0's only
    bad = experiment("--datalist", str(setup["datalist"]), "--out", str(out), "--gpus", "0", "--gpus-per-run", "2")
    assert bad.returncode != 0 and "--gpus-per-run 2 needs at least" in bad.stderr


def test_chained_arms_train_in_stages(setup, tmp_path):
    """``--chain s2=s1`` (two runs at a time): stage 2 waits for stage 1 of its split and starts from its
    model; with ``freeze: ["encoder"]`` its encoder and classifier stay stage 1's."""
    import torch

    from pipeline.models.weights import read_weights

    stage2 = json.loads((ROOT / "configs/stage2_seg_recon.json").read_text(encoding="utf-8"))
    frozen = tmp_path / "stage2_frozen.json"
    frozen.write_text(json.dumps({**stage2, "freeze": ["encoder"]}), encoding="utf-8")
    out = tmp_path / "staged"
    args = ["--datalist", str(setup["datalist"]), "--out", str(out), "--repeats", "1", "--epochs", "1",
            "--overlays", "configs/demo.json", str(setup["overlay"]), "--parallel", "2",
            "--arms", f"s1={ROOT / 'configs/stage1_cls_recon.json'},s2={frozen}", "--chain", "s2=s1"]
    res = experiment(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s1_model = out / "runs" / "s1" / "split0" / "models" / "model.pt"
    assert f"--init_from {s1_model.resolve()}" in (out / "runs" / "s2" / "split0" / "command.txt").read_text(encoding="utf-8")
    log = (out / "runs" / "s2" / "split0" / "log.txt").read_text(encoding="utf-8")
    assert "[init_from]" in log and "frozen (freeze): encoder" in log
    s1, s2 = read_weights(s1_model), read_weights(out / "runs" / "s2" / "split0" / "models" / "model.pt")
    kept = [k for k in s1 if k.startswith(("convInit", "down_layers", "classifier"))
            and "num_batches" not in k]
    assert kept and all(torch.equal(s2[k], s1[k]) for k in kept)
    assert any(k.startswith("up_layers") for k in s2) and not any(k.startswith("up_layers") for k in s1)
    rows = {r["arm"]: r for r in read_csv(out / "results.csv")}
    assert rows["s2"]["status"] == "complete" and rows["s2"]["test_dice"] != ""
    assert rows["s1"]["test_balanced_accuracy"] != ""
    again = experiment(*args)
    assert again.returncode == 0 and "2 already complete, 0 to run" in again.stdout, again.stdout[-2000:]
    wrong = experiment(*args[:-2], "--chain", "s1=s2")
    assert wrong.returncode == 2 and "'s2' must come before 's1'" in wrong.stderr, wrong.stderr[-2000:]
