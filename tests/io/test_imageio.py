"""pipeline.io: atomic writes, cache checksums and the machine-fault message, on real files."""

import errno
import hashlib

import pytest

from pipeline.io.errors import MachineError, machine_fault
from pipeline.io.imageio import atomic_write, checksum_matches, write_checksum, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.txt"
    write_text_atomic(target, "whole\n")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic_write(target, half_then_fail)
    assert target.read_text(encoding="utf-8") == "whole\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


def test_checksum_detects_changed_bytes(tmp_path):
    entry = tmp_path / "entry.bin"
    entry.write_bytes(b"\x00\x01" * 1000)
    assert checksum_matches(entry) is None  # no sidecar yet
    write_checksum(entry)
    assert (tmp_path / "entry.bin.sha256").read_text(encoding="utf-8").strip() == hashlib.sha256(entry.read_bytes()).hexdigest()
    assert checksum_matches(entry) is True
    entry.write_bytes(entry.read_bytes()[:-7])  # cut short
    assert checksum_matches(entry) is False


def test_full_disk_in_the_cause_chain_names_the_file(tmp_path):
    target = tmp_path / "models" / "checkpoint.pt"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        fault = machine_fault(outer, target)
    assert isinstance(fault, MachineError)
    assert str(target) in str(fault) and "no space left" in str(fault)
    assert machine_fault(ValueError("bad label"), target) is None
