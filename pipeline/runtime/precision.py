"""Mixed precision from config: which autocast dtype a run uses, for training, evaluation and inference.

``amp_dtype`` in the configs is a name: ``"auto"`` (bfloat16 where the GPU supports it, else
float16), ``"bfloat16"`` or ``"float16"``. bfloat16 has float32's exponent range, so it needs no
gradient scaling; float16 does (MONAI's trainers keep a ``GradScaler`` whenever ``amp`` is on, which
is harmless for bfloat16). Autocast only runs on CUDA here: the configs turn ``amp`` on for CUDA
devices only (see ``benchmarks/train_step.py`` for bfloat16 on CPU).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AMP_DTYPES", "resolve_amp_dtype", "amp_kwargs"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp_dtype(name: str, device: str | torch.device | None = None) -> str:
    """The autocast dtype name for ``name`` on ``device``.

    Args:
        name: ``"auto"``, ``"bfloat16"`` or ``"float16"``.
        device: the run's device; ``"auto"`` picks bfloat16 on a CUDA device that supports it.

    Returns:
        ``"bfloat16"`` or ``"float16"``.

    Raises:
        ValueError: an unknown name.
    """
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cuda":
            return "bfloat16"
        # native bfloat16 from Ampere (compute capability 8) on; is_bf16_supported() also counts the
        # slow emulation of older GPUs and looks at the current device, not this one
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8 else "float16"
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be 'auto', 'bfloat16' or 'float16', got {name!r}")
    return name


def amp_kwargs(name: str, device: str | torch.device | None = None) -> dict[str, Any]:
    """``amp_kwargs`` for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``: ``{"dtype": ...}``."""
    return {"dtype": AMP_DTYPES[resolve_amp_dtype(name, device)]}
