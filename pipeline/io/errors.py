"""User-facing errors: one exception type that always names the file and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["InputError", "InputErrors", "find_input_error", "install_excepthook", "debug_requested", "DEBUG_ENV"]

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
    """Make an uncaught user-input error end in one clear message instead of a traceback.

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
        err = find_input_error(exc)
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
