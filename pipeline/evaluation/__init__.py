"""Evaluation: the evaluation run's outputs, surface and BraTS lesion-wise metrics, lesion detection, `score`
(an inference run against ground truth) and paired statistics.

Modules load on first use (``pipeline.evaluation.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["detection", "lesions", "paired_stats", "report", "score", "surface"]

__getattr__ = submodule_loader(__name__)
