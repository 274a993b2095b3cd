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

:class:`EpochSeeds` reseeds every stream a training epoch draws from with (seed, epoch) when the
epoch starts, as ``DistributedSampler.set_epoch`` does for the order: a run resumed from a
checkpoint then draws, from its first resumed epoch on, what the uninterrupted run draws, and a
``DistributedSampler`` gets a new order every epoch. Workers kept between epochs
(``persistent_workers``, the default with ``num_workers`` > 0) keep their own transform streams,
which no handler in the main process can reseed: their runs are ordinary but not exact on resume.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

__all__ = ["EpochSeeds", "seed_run", "stream_generator", "stream_seed"]


def seed_run(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch with ``seed`` (MONAI's ``set_determinism``); cuDNN then picks
    its fastest algorithms (``benchmark``) unless ``deterministic``."""
    set_determinism(seed=int(seed))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def stream_seed(seed: int, stream: str, epoch: int | None = None) -> int:
    """A 64-bit seed for the named ``stream`` of the run seeded with ``seed`` (and of one ``epoch``):
    the same triple, the same seed; another stream, seed or epoch, an independent one (NumPy's
    ``SeedSequence``)."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode("utf-8"))]
    if epoch is not None:
        entropy.append(int(epoch))
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def stream_generator(seed: int, stream: str, epoch: int | None = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed` ``(seed, stream, epoch)``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, epoch))


class EpochSeeds:
    """Ignite handler: when epoch ``e`` (0-based) starts, before its data iterator exists, reseed
    what the epoch draws from with (``seed``, ``e``):

    - the training order: ``loader.sampler.set_epoch(e)`` where the sampler has it
      (:func:`pipeline.data.feed.training_sampler`'s, ``DistributedSampler``);
    - the random transforms: the loader's generator (the workers' seeds) and, without workers, the
      dataset's transforms themselves (``monai.data.utils.set_rnd``, which MONAI's ``DataLoader``
      calls once when it is built);
    - the network's draws (dropout, a gradient method's shuffles): PyTorch's, NumPy's and Python's
      global generators.

    A checkpoint then needs no generator state: resuming at epoch ``e`` reseeds exactly as the
    uninterrupted run did. Attach it on every process (not only rank 0): under torchrun each rank
    draws its transforms and network streams from ``seed + rank`` (the order's sampler shares
    ``seed`` across ranks, as a ``DistributedSampler`` must).
    """

    def __init__(self, seed: int, loader: Any) -> None:
        from pipeline.runtime.distributed import rank

        self.seed = int(seed) + rank()
        self.loader = loader

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        from monai.data.utils import set_rnd

        epoch = int(engine.state.epoch) - 1
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        transforms = stream_seed(self.seed, "random transforms", epoch)
        generator = getattr(self.loader, "generator", None)
        if generator is not None:
            generator.manual_seed(transforms)
        if not getattr(self.loader, "num_workers", 0):
            set_rnd(self.loader.dataset, transforms % 2**32)
        network = stream_seed(self.seed, "network", epoch)
        torch.manual_seed(network)
        np.random.seed(network % 2**32)
        random.seed(network)
