"""pipeline: multi-task 3D tumour segmentation + genetic-marker classification on MONAI."""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.errors import install_excepthook

__version__ = "0.1.0"

# Uncaught user-input errors (bad file, datalist, option) print one line naming the file instead
# of a traceback, also inside `python -m monai.bundle run` (see pipeline.errors).
install_excepthook()


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first attribute access, so bundle configs can write
    ``$pipeline.engines.X`` after a plain ``$import pipeline`` without importing everything."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc
