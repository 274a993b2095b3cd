"""Data: the datalist (JSON or CSV) and its validation, patient-level splits, the cohort a run
trains on, the MONAI transforms that bring a scan onto the atlas grid, 2-D slicing, `prepare`
(register a whole datalist ahead of training) and the synthetic cohort (:mod:`pipeline.data.phantom`).

Modules load on first use (``pipeline.data.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["cohort", "datalist", "feed", "missing_labels", "prepare", "slices", "splits", "transforms", "validation"]

__getattr__ = submodule_loader(__name__)
