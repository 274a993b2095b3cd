"""One process per output folder: an advisory lock (``fcntl.flock``) on ``<folder>/.lock``.

Two trainings, two inference runs or two experiment runners writing one folder would interleave
checkpoints, reports and masks; the second is refused in one line naming the folder and the process
that holds it. The operating system releases the lock when its process ends, however it ends (a
kill leaves no stale lock behind), and the lock file itself is never removed (removing it would let
a third process lock a new file while the first still holds the old one). Evaluation of a finished
run takes no lock.

A cache shared by several processes (the registration cache) is guarded by :func:`cache_lock` on
``<cache>/.cache.lock``: a writer holds it exclusively while it writes an entry and its checksum, a reader
shares it while it checks and reads one, so nobody sees an entry without its checksum.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.io.errors import InputError, machine_fault

__all__ = ["cache_lock", "folder_lock", "hold_folder_lock"]

LOCK_NAME = ".lock"
CACHE_LOCK_NAME = ".cache.lock"
_HELD: dict[str, IO[str]] = {}  # folder -> open lock file, for the life of the process


def _acquire(folder: Path, what: str) -> IO[str]:
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = (folder / LOCK_NAME).open("a+", encoding="utf-8")
    except OSError as exc:  # a full disk or a read-only folder: said as such, naming the folder
        fault = machine_fault(exc, folder)
        raise fault or InputError(folder, f"cannot create its lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "a process"
        fh.close()
        raise InputError(folder, f"is in use by another {what} ({holder}); wait for it to finish or choose "
                                 "another output folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{what}, pid {os.getpid()}")
    fh.flush()
    return fh


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for a ``with`` block (``what`` names the holder in the refusal); a no-op
    when this process holds it for its whole life (:func:`hold_folder_lock`).

    Raises:
        InputError: another process holds it, or the lock file cannot be created.
    """
    if str(Path(folder).resolve()) in _HELD:  # this process holds it already (hold_folder_lock)
        yield
        return
    fh = _acquire(Path(folder), what)
    try:
        yield
    finally:
        fh.close()


def hold_folder_lock(folder: str | Path, what: str) -> Path:
    """Take ``folder``'s lock for the rest of this process (a bundle run's first step); a second call
    for the same folder in this process is a no-op. Under several processes only rank 0 locks.

    Raises:
        InputError: another process holds it.
    """
    from pipeline.runtime.distributed import is_main

    path = Path(folder).resolve()
    if is_main() and str(path) not in _HELD:
        _HELD[str(path)] = _acquire(path, what)
    return path


@contextlib.contextmanager
def cache_lock(root: str | Path, exclusive: bool) -> Iterator[None]:
    """Hold ``root/.cache.lock`` shared (a reader) or exclusively (a writer) for a ``with`` block, waiting
    for it; a cache folder that cannot hold a lock file (read-only, not there yet) is used unlocked,
    since nothing can write it either."""
    import fcntl

    path = Path(root) / CACHE_LOCK_NAME
    fh = None
    try:
        if exclusive:
            path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("a" if exclusive or os.access(path.parent, os.W_OK) else "r", encoding="utf-8")
    except OSError:
        pass  # a writer then fails on its own write, in one line (pipeline.io.errors.machine_fault)
    if fh is None:
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        fh.close()
