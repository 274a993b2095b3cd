"""Input and output shared by every stage: the user-error types and their one-line report, checks of
input files (names, sizes, formats, content hashes), reading and writing images atomically, QC pictures.

Modules load on first use (``pipeline.io.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["errors", "filecheck", "imageio", "qc"]

__getattr__ = submodule_loader(__name__)
