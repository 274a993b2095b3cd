"""Import a package's modules on first attribute access.

Bundle configs write ``$pipeline.training.engines.X`` after a plain ``$import pipeline``; each
package's ``__getattr__`` imports the module named, so one expression never pulls in the others'
dependencies (torch, SimpleITK, ONNX Runtime...). Python's own mechanism (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

__all__ = ["submodule_loader"]


def submodule_loader(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for ``package`` that imports ``package.<name>`` when asked for ``name``."""

    def __getattr__(name: str) -> ModuleType:
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from exc

    return __getattr__
