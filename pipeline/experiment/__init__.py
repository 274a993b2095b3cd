"""The study's experiment protocol: the plan of splits and arms, running each (resumable), the report
with paired tests. ``python -m pipeline experiment`` runs :mod:`pipeline.experiment.runner`.

Modules load on first use (``pipeline.experiment.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["execute", "plan", "report", "runner"]

__getattr__ = submodule_loader(__name__)
