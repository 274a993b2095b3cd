"""pipeline: multi-task 3D tumour segmentation + genetic-marker classification on MONAI."""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first attribute access, so bundle configs can write
    ``$pipeline.engines.X`` after a plain ``$import pipeline`` without importing everything."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc
