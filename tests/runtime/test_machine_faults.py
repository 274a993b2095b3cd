"""The machine failing under the product: a full disk and a read-only folder, produced for real (a
small tmpfs; skipped where this user cannot mount one), each ending in one line naming the file,
exit status 2, no partial file, and what was written before still whole."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.io.errors import MachineError, machine_fault
from pipeline.io.imageio import atomic_write
from tests.helpers import INFER, TINY, TRAIN, bundle


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs at ``tmp_path/disk`` (the tiny network's model.pt and first checkpoint fit, a
    second checkpoint beside the first does not), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_and_read_only_in_one_write(small_disk):
    target = small_disk / "big.bin"
    with pytest.raises(MachineError, match=r"big.bin: no space left on the device while writing it \(\d+ MiB free"):
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"\0" * (32 << 20)))
    assert list(small_disk.iterdir()) == []  # no partial file, no temporary left
    atomic_write(small_disk / "small.txt", lambda tmp: Path(tmp).write_text("kept", encoding="utf-8"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(MachineError, match=r"other.txt: cannot be written: the file system is read-only"):
        atomic_write(small_disk / "other.txt", lambda tmp: Path(tmp).write_text("x", encoding="utf-8"))
    assert (small_disk / "small.txt").read_text(encoding="utf-8") == "kept"
    assert machine_fault(ValueError("unrelated")) is None


def test_training_on_a_full_disk_stops_in_one_line_and_resumes(small_disk, tmp_path):
    from pipeline.data.phantom.build import make_cohort

    cohort = make_cohort(tmp_path / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    run = small_disk / "run"
    done = bundle(["run", "training"], [TRAIN, "configs/demo.json", overlay], datalist=cohort, output_dir=run,
                  epochs=40, cache_dir=tmp_path / "cache", timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = [ln.split("error: ", 1)[1] for ln in done.stderr.splitlines() if "error: " in ln]
    assert len(line) == 1 and "no space left on the device while writing it" in line[0], done.stderr[-2000:]
    assert line[0].startswith(str(run / "models"))
    models = run / "models"
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporary file left
    ckpts = sorted(models.glob("checkpoint_epoch=*.pt"))
    assert ckpts, "the disk filled before the first checkpoint: make the disk larger"
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)  # the last whole one loads
    epoch = int(ckpts[-1].stem.split("=")[1])
    assert state["trainer"]["iteration"] == epoch * state["trainer"]["epoch_length"]
    # space freed: the same command resumes from that checkpoint and finishes
    subprocess.run(["mount", "-o", "remount,size=128m", str(small_disk)], check=True)
    done = bundle(["run", "training"], [TRAIN, "configs/demo.json", overlay], datalist=cohort, output_dir=run,
                  epochs=epoch + 1, cache_dir=tmp_path / "cache", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(models / f"checkpoint_epoch={epoch + 1}.pt", map_location="cpu", weights_only=False)
    assert last["trainer"]["iteration"] == (epoch + 1) * last["trainer"]["epoch_length"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A one-epoch tiny model on an 8-case phantom cohort (atlas grid)."""
    from pipeline.data.phantom.build import make_cohort

    base = tmp_path_factory.mktemp("trained")
    cohort = make_cohort(base / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlay = base / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    done = bundle(["run", "training"], [TRAIN, "configs/demo.json", overlay], datalist=cohort, output_dir=base / "run",
                  epochs=1)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"cohort": cohort, "overlay": overlay, "ckpt": base / "run" / "models" / "model.pt", "base": base}


def infer(trained: dict, out: Path) -> subprocess.CompletedProcess:
    return bundle(["run"], [INFER, "configs/demo.json", trained["overlay"]], datalist=trained["cohort"], output_dir=out,
                  ckpt=trained["ckpt"])


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [ln.split("error: ", 1)[1] for ln in done.stderr.splitlines() if ln.startswith("error: ")]


def leave_free(disk: Path, free: int) -> None:
    import os

    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))


def test_inference_stops_on_a_full_disk_and_keeps_the_finished_cases(trained, small_disk):
    """A full disk mid-folder fails every later case alike: the run stops (exit 2, one line); the
    cases finished before are whole and in the report; freed, the same command finishes the rest."""
    out = small_disk / "inference"
    leave_free(small_disk, 200 << 10)
    done = infer(trained, out)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = error_lines(done)
    assert len(lines) == 1 and lines[0].startswith(str(out)) and "no space left on the device while writing it" in lines[0]
    finished = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert 0 < len(finished) < 8
    for folder in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        names = {p.name for p in folder.iterdir()}
        assert names == ({"seg.nii.gz", "qc.png", "result.json"} if folder.name in finished else set()), folder
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".lock"]  # no temporary left
    rows = [r.split(",")[:3] for r in (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert [r[0] for r in rows] == finished and all(r[2] == "ok" for r in rows)
    (small_disk / "filler").unlink()
    done = infer(trained, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"8 of 8 case(s) ok ({len(finished)} from an earlier run)" in done.stdout + done.stderr


def test_read_only_output_folders_are_one_line(trained, small_disk):
    """Folder inference, evaluation and prepare on a read-only folder: one line naming it, exit 2."""
    import shutil
    import sys

    from tests.helpers import CONFIGS, ROOT

    shutil.copytree(trained["ckpt"].parent.parent, small_disk / "run", ignore=shutil.ignore_patterns("cache", "tensorboard"))
    before = {p: p.read_bytes() for p in (small_disk / "run").rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    runs = {
        "inference": infer(trained, small_disk / "inference"),
        "evaluation": bundle(["run"], [TRAIN, f"{CONFIGS}/evaluate.json", "configs/demo.json", trained["overlay"]],
                             datalist=trained["cohort"], output_dir=small_disk / "run"),
        "prepare": subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--datalist", str(trained["cohort"]),
                                   "--out", str(small_disk / "prepared"), "--spacing", "6"], cwd=ROOT,
                                  capture_output=True, text=True),
    }
    for name, done in runs.items():
        assert done.returncode == 2, (name, done.stderr[-3000:])
        lines = error_lines(done)
        assert len(lines) == 1 and "cannot be written: the file system is read-only" in lines[0], (name, lines)
        assert lines[0].startswith(str(small_disk)), (name, lines)
    assert {p: p.read_bytes() for p in (small_disk / "run").rglob("*") if p.is_file()} == before


def test_prepare_stops_on_a_full_disk(trained, small_disk):
    """prepare: a full disk is not a case's fault: one line, exit 2, no case left half-written."""
    import sys

    from tests.helpers import ROOT

    doc = json.loads(Path(trained["cohort"]).read_text(encoding="utf-8"))
    three = small_disk.parent / "three.json"
    root = Path(trained["cohort"]).parent
    three.write_text(json.dumps({**doc, "training": [{k: (str(root / v) if k in ("image", "label") else v)
                                                      for k, v in e.items()} for e in doc["training"][:3]]}), encoding="utf-8")
    out = small_disk / "prepared"
    leave_free(small_disk, 150 << 10)
    done = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--datalist", str(three), "--out", str(out),
                           "--spacing", "6", "--skull-strip", "morphology"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = error_lines(done)
    assert len(lines) == 1 and "no space left on the device while writing it" in lines[0], done.stderr[-3000:]
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".lock"]  # no temporary left
    for folder in (p for p in out.iterdir() if p.is_dir()):
        if (folder / "prepared.json").exists():  # finished: every output there
            assert {"image.nii.gz", "to_atlas.tfm", "qc.png"} <= {p.name for p in folder.iterdir()}


class _Writes(torch.utils.data.Dataset):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        atomic_write(self.folder / f"entry{i}.pt", lambda tmp: Path(tmp).write_bytes(b"x"))
        return i


def test_a_fault_in_a_dataloader_worker_keeps_its_line(small_disk):
    """A DataLoader worker's error comes back as a RuntimeError holding its traceback: the line still
    names the file and the reason."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(RuntimeError) as caught:
        list(torch.utils.data.DataLoader(_Writes(small_disk), num_workers=1))
    fault = machine_fault(caught.value)
    assert str(fault) == f"{small_disk / 'entry0.pt'}: cannot be written: the file system is read-only (choose " \
                         "another folder)"
