"""pipeline: multi-task 3D tumour segmentation + genetic-marker classification on MONAI.

The sub-packages are the stages, in their order: :mod:`pipeline.io` and :mod:`pipeline.runtime`
(shared by all), :mod:`pipeline.data`, :mod:`pipeline.registration`, :mod:`pipeline.models`,
:mod:`pipeline.training`, :mod:`pipeline.inference`, :mod:`pipeline.evaluation`,
:mod:`pipeline.experiment`, :mod:`pipeline.retrieval`; ``python -m pipeline`` dispatches the
commands (:mod:`pipeline.__main__`). A module imports only from its own stage or earlier ones.
"""

from __future__ import annotations

from pipeline.io.errors import install_excepthook
from pipeline.lazy import submodule_loader

__version__ = "0.1.0"
__all__ = ["data", "evaluation", "experiment", "inference", "io", "models", "registration", "retrieval", "runtime",
           "training"]

# Uncaught user-input errors (bad file, datalist, option) print one line naming the file instead
# of a traceback, also inside `python -m monai.bundle run` (see pipeline.io.errors).
install_excepthook()

__getattr__ = submodule_loader(__name__)
