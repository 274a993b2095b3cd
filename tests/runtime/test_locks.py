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
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create its lock file"), folder_lock(blocker / "run", "training"):
        pass
