"""User-facing errors: one exception type that always names the file and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["InputError", "InputErrors"]


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
