"""Inference: whole-volume prediction (sliding window, tumour-centred classification, flip TTA),
post-processing, calibration, and folder inference back in each scan's own space (NIfTI, DICOM, DICOM SEG).

Modules load on first use (``pipeline.inference.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["calibration", "cases", "dicom_seg", "folder", "postprocess", "predict"]

__getattr__ = submodule_loader(__name__)
