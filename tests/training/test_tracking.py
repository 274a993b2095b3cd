"""MLflow tracking: ``--tracking mlflow`` on a tiny training and evaluation writes
a store under ``OUTPUT_DIR/mlruns`` holding every loss component per iteration and the validation and
evaluation metrics; the experiment runner logs its runs under one experiment, named by arm and split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import TINY as BASE

mlflow = pytest.importorskip("mlflow")
CONFIGS = ROOT / "bundles" / "plgg_mtl" / "configs"
TINY = {**BASE, "batch_size": 2}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    from pipeline.data.phantom.build import make_cohort

    base = tmp_path_factory.mktemp("track")
    datalist = Path(make_cohort(base / "cohort", cases=10, seed=1, spacing=6.0, space="atlas").datalist)
    overlay = base / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    return datalist, overlay


def runs_of(store: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    return [(e, r, client) for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_training_and_evaluation_tracked_in_mlflow(cohort, tmp_path):
    datalist, overlay = cohort
    out = tmp_path / "run"
    common = ["--datalist", str(datalist), "--output_dir", str(out), "--tracking", "mlflow"]
    run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
         repr([str(CONFIGS / "train.json"), str(overlay)]), "--epochs", "2", *common])
    store = out / "mlruns" / "mlflow.db"
    assert store.is_file()
    (experiment, train_run, client), = runs_of(store)
    assert experiment.name == "plgg_mtl" and train_run.info.status == "FINISHED"
    assert {"loss", "loss_seg", "loss_cls", "lr", "val_mean_dice", "val_balanced_accuracy", "val_auc"} <= set(
        train_run.data.metrics)
    assert len(client.get_metric_history(train_run.info.run_id, "loss_seg")) == 2 * 4  # 2 epochs x 4 iterations
    validation = json.loads((out / "validation.json").read_text(encoding="utf-8"))["history"]
    assert [m.value for m in client.get_metric_history(train_run.info.run_id, "val_mean_dice")] == pytest.approx(
        [h["val_mean_dice"] for h in validation])
    assert train_run.data.params["max_epochs"] == "2"
    assert float(train_run.data.params["lr"]) == 0.001 and train_run.data.params["patch_size"] == "[16, 16, 16]"

    run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
         repr([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), str(overlay)]), *common])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    evaluation = [r for _, r, _ in runs_of(store) if r.info.run_id != train_run.info.run_id]
    assert len(evaluation) == 1 and evaluation[0].info.status == "FINISHED"
    assert evaluation[0].data.metrics["val_mean_dice"] == pytest.approx(
        metrics["val_mean_dice"])
    summary = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("surface_dice", "ece"):  # the evaluation report's figures too
        if summary[key] is not None:
            assert evaluation[0].data.metrics[key] == pytest.approx(summary[key])


def test_experiment_runs_in_one_mlflow_experiment(cohort, tmp_path):
    datalist, overlay = cohort
    out = tmp_path / "exp"
    run([sys.executable, "-m", "pipeline", "experiment", "--datalist", str(datalist), "--out", str(out), "--repeats",
         "1", "--epochs", "1", "--tracking", "mlflow", "--overlays", str(overlay)])
    found = runs_of(out / "mlruns" / "mlflow.db")
    assert {e.name for e, _, _ in found} == {"exp"}
    names = sorted(r.info.run_name for _, r, _ in found)
    assert names == ["mtl/split0", "mtl/split0", "seg/split0", "seg/split0"]  # training and evaluation of each
    for _, r, _ in found:
        assert r.data.tags["arm"] == r.info.run_name.split("/")[0] and r.data.tags["split"] == "0"
