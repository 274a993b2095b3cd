"""User-facing errors: one exception type that always names the file and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["InputError", "InputErrors", "MachineError", "machine_fault", "machine_fault_line", "find_input_error",
           "install_excepthook", "debug_requested", "DEBUG_ENV"]

#: Set to 1 to see the Python traceback behind a user-input error (``python -m pipeline --debug`` sets it).
DEBUG_ENV = "PIPELINE_DEBUG"


def debug_requested() -> bool:
    """Whether the user asked for tracebacks (``PIPELINE_DEBUG`` set to anything but ``""``/``0``)."""
    import os

    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class InputError(ValueError):
    """A problem with user input (a file, a datalist entry, an option).

    Args:
        path: the file (or datalist entry) at fault; ``None`` when no file is involved.
        problem: what is wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self) -> tuple:  # rebuilt from (path, problem) in another process (a worker pool)
        return type(self), (self.path, self.problem)


class MachineError(InputError):
    """The machine failed under a write (full disk, read-only or forbidden folder), not the input:
    reported like an input error (one line naming the path, exit status 2)."""


#: errno -> what to tell the user (``ENOSPC`` and ``EDQUOT`` also name the space left).
_FAULTS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
           "EROFS": "the file system is read-only", "EACCES": "permission denied", "EPERM": "operation not permitted"}


def machine_fault(exc: BaseException | None, path: str | Path | None = None) -> MachineError | None:
    """A :class:`MachineError` for a full disk, a read-only or forbidden folder anywhere in ``exc``'s
    cause/context chain (an ``OSError``, or a writer's ``RuntimeError`` such as ``torch.save``'s
    "file write failed" when the disk is full), naming ``path`` (else the error's file); ``None``
    for anything else.
    """
    import errno
    import os
    import shutil

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        target = path if path is not None else getattr(exc, "filename", None)
        name = errno.errorcode.get(getattr(exc, "errno", None) or -1, "") if isinstance(exc, OSError) else ""
        text = str(exc)
        if "MachineError: " in text:  # raised in a DataLoader worker: re-raised as a RuntimeError of its traceback
            found = machine_fault_line(text)
            if found is not None:
                return found
        if not name and ("write failed" in text or "No space left on device" in text):
            name = "ENOSPC"
        if name in _FAULTS:
            what = _FAULTS[name]
            if name in ("ENOSPC", "EDQUOT"):
                folder = Path(target).parent if target is not None else Path.cwd()
                while not folder.exists() and folder != folder.parent:
                    folder = folder.parent
                free = shutil.disk_usage(folder).free / 2**20
                return MachineError(target, f"{what} while writing it ({free:.0f} MiB free on {folder}): free space "
                                            "and run again; the files written before are whole")
            hint = "choose a folder this user can write" if name in ("EACCES", "EPERM") else "choose another folder"
            where = target if target is not None else os.getcwd()
            return MachineError(where, f"cannot be written: {what} ({hint})")
        exc = exc.__cause__ or exc.__context__
    return None


def machine_fault_line(text: str) -> MachineError | None:
    """The :class:`MachineError` another process of this product ended with, from its one line
    (``error: <path>: no space left on the device while writing it ...``) or from a traceback's
    last line (``pipeline.io.errors.MachineError: ...``, as a DataLoader worker's error comes back)
    anywhere in ``text``; ``None`` when there is none."""
    import re

    problems = "|".join(re.escape(w) for w in _FAULTS.values())
    found = re.findall(rf"^(?:error|(?:[\w.]+\.)?MachineError): (.+?): ((?:{problems}) while writing it.*|"
                       rf"cannot be written: (?:{problems}).*)$", text, re.MULTILINE)
    return MachineError(*found[-1]) if found else None


class InputErrors(ValueError):
    """Several input problems reported at once (e.g. every bad entry of a datalist)."""

    def __init__(self, errors: Iterable[InputError], header: str = "invalid input") -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{header} ({len(self.errors)} problem(s)):\n{lines}")


def find_input_error(exc: BaseException | None) -> InputError | InputErrors | None:
    """The first :class:`InputError` / :class:`InputErrors` in an exception's cause/context chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError | InputErrors):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Make an uncaught user-input error (or a full disk, a read-only folder: :func:`machine_fault`)
    end in one clear message instead of a traceback.

    ``python -m monai.bundle run`` wraps errors raised while a config is evaluated in several
    layers of ``RuntimeError("Failed to evaluate ...")``; when the root cause is one of ours (a
    bad file, datalist or option), print only its message and exit with status 2 (with
    ``PIPELINE_DEBUG=1`` the traceback is printed first). Any other exception goes to the previous
    hook unchanged. Idempotent.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_pipeline_hook", False):
        return

    def hook(exc_type, exc, tb):  # noqa: ANN001 - sys.excepthook signature
        err = find_input_error(exc) or machine_fault(exc)
        if err is None:
            previous(exc_type, exc, tb)
            return
        if debug_requested():
            previous(exc_type, exc, tb)
        print(f"error: {err}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(2)

    hook._pipeline_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    _quiet_tracebacks()


def _quiet_tracebacks() -> None:
    """Log records of our one-line errors without their traceback (the engines' handlers log every
    exception with ``logger.exception`` before it reaches :func:`install_excepthook`'s hook)."""
    import logging

    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - logging.LogRecord's signature
        record = make(*args, **kwargs)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not debug_requested() and (find_input_error(exc) or machine_fault(exc)):
            record.exc_info = None
        return record

    logging.setLogRecordFactory(factory)
