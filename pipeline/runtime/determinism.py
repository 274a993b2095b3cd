"""Seeding a run without slowing its convolutions.

MONAI's ``set_determinism(seed)`` seeds Python, NumPy and PyTorch, and also sets
``cudnn.deterministic = True, cudnn.benchmark = False``, which picks slower deterministic
algorithms for 3-D convolution backward passes on a GPU. A training run here wants the seeds
(the same splits, crops and augmentation draws on a CPU) and fast convolutions on a GPU, unless
bitwise repeatable GPU runs are asked for (``deterministic: true``). Nothing changes on a CPU.
"""

from __future__ import annotations

import torch
from monai.utils import set_determinism

__all__ = ["seed_run"]


def seed_run(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch with ``seed`` (MONAI's ``set_determinism``); cuDNN then picks
    its fastest algorithms (``benchmark``) unless ``deterministic``."""
    set_determinism(seed=int(seed))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
