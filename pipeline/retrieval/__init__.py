"""Similar-case retrieval on the shared encoder's features: the index, its evaluation, the command.

Modules load on first use (``pipeline.retrieval.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["cli", "evaluate", "index"]

__getattr__ = submodule_loader(__name__)
