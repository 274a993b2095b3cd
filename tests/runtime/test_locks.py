"""One process per output folder: a second holder is refused in one line, and a dead holder's lock is free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.io.errors import InputError
from pipeline.runtime.locks import folder_lock, hold_folder_lock


def test_second_holder_is_refused_and_the_lock_frees_on_exit(tmp_path):
    out = tmp_path / "run"
    refused = pytest.raises(InputError, match=r"run: is in use by another inference run \(training, pid \d+\)")
    with folder_lock(out, "training"), refused, folder_lock(out, "inference run"):
        pass
    with folder_lock(out, "inference run"):  # released at the end of the block
        pass
    # a process that took the lock and died (here: exited without releasing it) leaves it free
    code = f"from pipeline.runtime.locks import hold_folder_lock; hold_folder_lock({str(out)!r}, 'training')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert hold_folder_lock(out, "training") == out.resolve()
    assert hold_folder_lock(out, "training") == out.resolve()  # held by this process: a no-op


def test_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="cannot create its lock file"), folder_lock(blocker / "run", "training"):
        pass


def test_a_second_training_or_inference_on_a_busy_folder_is_refused_before_writing(tmp_path):
    """The bundles take the lock before they write: with the folder held, each stops in one line."""
    from pipeline.data.phantom.build import make_cohort
    from tests.helpers import DEMO, INFER, TINY, TRAIN, bundle

    cohort = make_cohort(tmp_path / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(__import__("json").dumps(TINY), encoding="utf-8")
    run = tmp_path / "run"
    done = bundle(["run", "training"], [TRAIN, DEMO, overlay], datalist=cohort, output_dir=run, epochs=1)
    assert done.returncode == 0, done.stderr[-3000:]
    for what, folder, cmd, kw in (
            ("training", run, ["run", "training"], {"datalist": cohort, "output_dir": run, "epochs": 2}),
            ("inference run", tmp_path / "inference", ["run"],
             {"datalist": cohort, "output_dir": tmp_path / "inference", "ckpt": run / "models" / "model.pt"})):
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}
        with folder_lock(folder, "experiment"):
            done = bundle(cmd, [TRAIN if what == "training" else INFER, DEMO, overlay], **kw)
            after = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
        assert lines == [f"error: {folder.resolve()}: is in use by another {what} (experiment, pid "
                         f"{__import__('os').getpid()}); wait for it to finish or choose another output folder"], lines
        assert {p: t for p, t in after.items() if p.name != ".lock"} == {p: t for p, t in before.items()
                                                                          if p.name != ".lock"}
