"""Where and how the work runs: processes and ranks (torch.distributed), mixed precision, start-up time.

Modules load on first use (``pipeline.runtime.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["determinism", "distributed", "locks", "precision", "startup"]

__getattr__ = submodule_loader(__name__)
