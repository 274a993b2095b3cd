"""The built-in synthetic cohort: MNI152 anatomy, class-dependent tumours, a scanner's acquisition.
``python -m pipeline phantom`` runs :mod:`pipeline.data.phantom.build`.

Modules load on first use (``pipeline.data.phantom.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["acquisition", "anatomy", "build", "case", "config", "cues", "tumour"]

__getattr__ = submodule_loader(__name__)
