"""Multi-process training (``multi_gpu_train.json``) on CPU with the ``gloo`` backend and
two processes launched by ``torchrun``: one DDP step equals one single-process step on the whole
batch (only with the synchronised head batch norm); the bundle trains, validates and writes one set
of outputs; its validation metrics equal a one-process evaluation of the same checkpoint on the same
(odd number of) cases; a killed two-process run resumes in one process; two-process evaluation
writes the same report as one process."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers import TINY as BASE

CONFIGS = ROOT / "bundles" / "plgg_mtl" / "configs"
TINY = {**BASE, "batch_size": 2}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = pytest.mark.slow


def run(cmd: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
                          encoding="utf-8", errors="replace")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.parametrize(("head", "mode"), [("tumour", "sync"), ("tumour", "nosync"), ("plain", "sync")])
def test_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path, head, mode):
    out = tmp_path / "step.pt"
    run([*TORCHRUN, "tests/ddp_step.py", str(out), head, mode])
    saved = torch.load(out, map_location="cpu")
    diff = max(float((saved["reference"][k].float() - saved["ddp"][k].float()).abs().max()) for k in saved["reference"])
    if mode == "sync":  # parameters and batch-norm running statistics as one process would have them
        assert diff < 1e-5, diff
        assert saved["ddp_loss"] == pytest.approx(saved["whole_loss"], abs=1e-5)  # each rank's loss is the whole batch's
    else:  # each process normalising its own half-batch: another step
        assert diff > 1e-4, diff


def test_ddp_step_with_the_detection_head_keeps_the_ranks_identical(tmp_path):
    """The detection term is each process's own (its half-batch's boxes and anchors, not the whole
    batch's): the ranks' losses differ, DDP averages their gradients, and every rank ends the step
    with the same parameters, detection head included."""
    out = tmp_path / "step.pt"
    run([*TORCHRUN, "tests/ddp_step.py", str(out), "detect", "sync"])
    ranks = [torch.load(f"{out}.rank{r}", map_location="cpu") for r in (0, 1)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks) and ranks[0]["loss"] != ranks[1]["loss"]
    params = [r["params"] for r in ranks]
    assert any(k.startswith("det_head") for k in params[0])
    for k in params[0]:
        assert torch.equal(params[0][k], params[1][k]), k


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, Path]:
    """10 tiny atlas-space cases split 4 / 3 / 3 (an odd number of validation cases for two ranks)."""
    from pipeline.data.phantom.build import make_cohort
    from pipeline.data.splits import save_splits

    out = tmp_path_factory.mktemp("ddp")
    datalist = make_cohort(out / "cohort", cases=10, seed=0, spacing=6.0, space="atlas").datalist
    ids = [e["id"] for e in json.loads(Path(datalist).read_text(encoding="utf-8"))["training"]]
    split = save_splits(out / "split.json", [{"name": "t", "train": ids[:4], "val": ids[4:7], "test": ids[7:]}])
    overlay = out / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    return Path(datalist), split, overlay


def bundle(cohort: tuple[Path, Path, Path], configs: list[str], out_dir: Path, nproc: int, *args: str,
           **kw) -> list[str]:
    datalist, split, overlay = cohort
    files = [str(CONFIGS / "train.json"), *[str(CONFIGS / c) for c in configs], "configs/demo.json", str(overlay)]
    if nproc > 1:
        files.append(str(CONFIGS / "multi_gpu_train.json"))
    launcher = TORCHRUN if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "monai.bundle", "run", *args, "--config_file", repr(files), "--datalist", str(datalist),
           "--split_file", str(split), "--output_dir", str(out_dir)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def test_two_processes_train_validate_and_match_one_process(cohort, tmp_path):
    out_dir = tmp_path / "run"
    log = run(bundle(cohort, [], out_dir, 2, "training", epochs=2))
    # one console (rank 0): 4 training cases, 2 per process, batch 2 -> one iteration per epoch
    assert log.count("Epoch: 2/2, Iter: 1/1") == 1, log[-3000:]
    assert sorted(p.name for p in (out_dir / "models").iterdir()) == [
        "checkpoint_epoch=2.pt", "inputs.json", "metadata.json", "model.pt", "postprocessing.json"]
    assert len(list((out_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    history = json.loads((out_dir / "validation.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    state = torch.load(out_dir / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in state["network"])  # the network, not the DDP wrapper
    assert "[decide] on 3 validation case(s)" in log  # all three cases, gathered from both ranks

    # the same checkpoint evaluated by one process on the same 3 validation cases: the same numbers
    one = tmp_path / "one"
    run(bundle(cohort, ["evaluate.json"], out_dir, 1, eval_part="val", eval_dir=one, postprocess="none",
               temperature=1.0, ckpt=out_dir / "models" / "checkpoint_epoch=2.pt"))
    metrics = json.loads((one / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics == {k: v for k, v in history[-1].items() if k != "epoch"}
    assert metrics["val_mean_dice"] > 0  # a real computation, not an empty one

    # two-process evaluation: every case once, the same report as one process
    two = tmp_path / "two"
    run(bundle(cohort, ["evaluate.json"], out_dir, 2, eval_part="val", eval_dir=two, postprocess="none",
               temperature=1.0, ckpt=out_dir / "models" / "checkpoint_epoch=2.pt"))
    assert (two / "metrics.json").read_text(encoding="utf-8") == (one / "metrics.json").read_text(encoding="utf-8")
    rows = list(csv.DictReader((two / "cases.csv").open(encoding="utf-8")))
    assert len(rows) == 3 and (two / "cases.csv").read_text(encoding="utf-8") == (one / "cases.csv").read_text(encoding="utf-8")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun's workers run in sessions of their own)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_killed_two_process_run_resumes_in_one_process(cohort, tmp_path):
    out_dir = tmp_path / "run"
    cmd = bundle(cohort, [], out_dir, 2, "training", epochs=40)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace")
    deadline = time.time() + 180
    while time.time() < deadline and not list((out_dir / "models").glob("checkpoint_epoch=*.pt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    kill_tree(proc.pid)  # torchrun and both ranks, at once
    proc.communicate()
    saved = sorted((out_dir / "models").glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    assert saved, "no checkpoint before the kill"
    epoch = int(saved[-1].stem.split("=")[1])
    assert epoch < 40

    log = run(bundle(cohort, [], out_dir, 1, "training", epochs=epoch + 1))
    assert f"Restored all variables from {saved[-1]}" in log
    # one process: 4 cases, batch 2 -> 2 iterations per epoch (the checkpoint's run had 1)
    assert f"Epoch: {epoch + 1}/{epoch + 1}, Iter: 2/2" in log, log[-3000:]
    assert f"Epoch: 1/{epoch + 1}," not in log
    assert (out_dir / "models" / f"checkpoint_epoch={epoch + 1}.pt").exists()


def test_summary_writer_in_one_process_writes(tmp_path):
    from pipeline.runtime.distributed import NullSummaryWriter, summary_writer

    writer = summary_writer(str(tmp_path / "tb"))
    assert not isinstance(writer, NullSummaryWriter)
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    assert any((tmp_path / "tb").iterdir())


def test_loader_workers_share_the_allotted_cpus_among_local_processes(monkeypatch):
    from pipeline.runtime.distributed import loader_workers

    allotted = len(os.sched_getaffinity(0))  # what the scheduler gave this process, not the machine's count
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(reserve=0, low=0, high=10_000) == allotted
    assert loader_workers(reserve=1, low=0, high=10_000) == allotted - 1
    assert 2 <= loader_workers() <= 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(allotted))
    assert loader_workers(reserve=0, low=0, high=10_000) == 1  # one CPU per process
    assert loader_workers(reserve=2, low=2, high=16) == 2  # never below the floor
