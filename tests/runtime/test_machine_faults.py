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
from tests.helpers import TINY, TRAIN, bundle


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
    atomic_write(small_disk / "small.txt", lambda tmp: Path(tmp).write_text("kept"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(MachineError, match=r"other.txt: cannot be written: the file system is read-only"):
        atomic_write(small_disk / "other.txt", lambda tmp: Path(tmp).write_text("x"))
    assert (small_disk / "small.txt").read_text() == "kept"
    assert machine_fault(ValueError("unrelated")) is None


def test_training_on_a_full_disk_stops_in_one_line_and_resumes(small_disk, tmp_path):
    from pipeline.data.phantom.build import make_cohort

    cohort = make_cohort(tmp_path / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY))
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
