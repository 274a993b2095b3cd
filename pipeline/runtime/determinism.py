"""Seeding a run without slowing its convolutions.

MONAI's ``set_determinism(seed)`` seeds Python, NumPy and PyTorch, and also sets
``cudnn.deterministic = True, cudnn.benchmark = False``, which picks slower deterministic
algorithms for 3-D convolution backward passes on a GPU. A training run here wants the seeds
(the same splits, crops and augmentation draws on a CPU) and fast convolutions on a GPU, unless
bitwise repeatable GPU runs are asked for (``deterministic: true``). Nothing changes on a CPU.

:func:`stream_generator` gives one random stream (the training order, the DataLoader's seeds of
the random transforms) a generator of its own, derived from the run's seed and the stream's name:
what the network draws from PyTorch's global generator (a class head's initial weights and
dropout) then leaves the data the segmentation sees unchanged.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from monai.utils import set_determinism

__all__ = ["seed_run", "stream_generator"]


def seed_run(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch with ``seed`` (MONAI's ``set_determinism``); cuDNN then picks
    its fastest algorithms (``benchmark``) unless ``deterministic``."""
    set_determinism(seed=int(seed))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for the named ``stream`` of the run seeded with ``seed``: the same
    pair, the same draws; another stream or seed, independent draws (NumPy's ``SeedSequence``)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode("utf-8"))]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
