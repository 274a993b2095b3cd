"""Registration to the atlas: the atlas grid, brain masks, the affine fit, its settings and
cache (:mod:`pipeline.registration.register`), resampling onto the atlas and back to each scan's own space.

Modules load on first use (``pipeline.registration.<module>``), so importing the package costs nothing.
"""

from __future__ import annotations

from pipeline.lazy import submodule_loader

__all__ = ["atlas", "fit", "masks", "preprocess", "register", "resample", "settings", "transforms"]

__getattr__ = submodule_loader(__name__)
