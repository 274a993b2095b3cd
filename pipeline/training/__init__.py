"""Training with MONAI's Ignite engines: batch preparation, metrics and loss logging, atomic
checkpoints and resume, staged training, validation history, tracking, and the decisions taken
on the validation cases after training (post-processing rule, classifier temperature).

Modules load on first use (``pipeline.training.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["checkpoints", "decisions", "engines", "gradients", "history", "staging", "tracking"]

__getattr__ = submodule_loader(__name__)
