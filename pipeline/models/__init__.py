"""Models: the multi-task network (shared encoder, segmentation decoder, class head), backbones,
classifier heads, losses, loading and checking weights, ONNX export and its runtime.

Modules load on first use (``pipeline.models.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["backbones", "classifiers", "losses", "networks", "onnx_backend", "onnx_export", "weights"]

__getattr__ = submodule_loader(__name__)
