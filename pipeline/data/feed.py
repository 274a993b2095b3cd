"""The training dataset behind the DataLoader: where the deterministic part of the chain is cached.

``dataset_cache`` in ``train.json``:

- ``"disk"`` (default): MONAI ``PersistentDataset``, the deterministic part (registration, loading,
  normalisation, padding, crop indices) stored once per case under ``cache_dir`` and read back with
  ``torch.load`` for every patch: no RAM cost, shared by every run of an experiment on that folder;
- ``"memory"``: MONAI ``CacheDataset``, the same items held in RAM (about 80 MB per case on the
  1 mm grid of ``paper.json``), filled by ``cache_workers`` threads at start; the DataLoader's worker
  processes share the cached tensors (fork, copy-on-write), so nothing is read from disk per patch;
- ``"none"``: MONAI ``Dataset``, the whole chain per patch (debugging).

Which items an epoch draws is :func:`training_sampler`'s: all of them in a random order (what the
DataLoader's ``shuffle`` does), or, with extra training cases (``extra_train``), a share of them
beside the split's own cases.

The disk cache is :class:`CheckedPersistentDataset`: MONAI's ``PersistentDataset`` with each entry
written atomically in its own folder (a full disk or a read-only folder is one line naming the
entry) and ending in its SHA-256, checked on every read: an entry cut short or changed is logged as
corrupt and recomputed, never loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.utils import convert_to_tensor, look_up_option

from pipeline.io.errors import InputError
from pipeline.io.imageio import atomic_write
from pipeline.runtime.determinism import stream_generator

__all__ = ["DATASET_CACHES", "TRAILER", "CheckedPersistentDataset", "EpochOrder", "cohort_sampler", "training_dataset",
           "training_sampler"]

logger = logging.getLogger(__name__)
#: What ends every entry of the disk cache: this marker, then the SHA-256 of the bytes before it.
TRAILER = b"\nplgg-sha256:"

DATASET_CACHES = ("disk", "memory", "none")


def training_dataset(kind: str, data: Sequence[dict[str, Any]], transform: Callable, cache_dir: str | Path,
                     cache_workers: int = 1) -> Any:
    """The dataset for ``kind`` (see the module docstring).

    Args:
        kind: ``"disk"``, ``"memory"`` or ``"none"``.
        data: the split's items (``@cohort.train``).
        transform: the whole chain (deterministic part first, then the random one).
        cache_dir: the ``PersistentDataset`` folder (``"disk"``).
        cache_workers: threads filling a ``"memory"`` cache.

    Raises:
        ValueError: an unknown ``kind``.
    """
    from monai.data import CacheDataset, Dataset
    from monai.data.utils import json_hashing

    if kind == "disk":
        return CheckedPersistentDataset(data, transform, cache_dir=str(cache_dir), hash_transform=json_hashing)
    if kind == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, int(cache_workers)), progress=True)
    if kind == "none":
        return Dataset(data, transform)
    raise ValueError(f"dataset_cache must be one of {DATASET_CACHES}, got {kind!r}")


def training_sampler(n_items: int, n_extra: int = 0, extra_share: float = 0.5,
                     seed: int | None = None) -> torch.utils.data.Sampler:
    """What one training epoch draws from ``n_items`` items whose last ``n_extra`` are extra cases
    (``Cohort.info["extra_train"]``).

    Without extra cases: every item once, in a random order (``RandomSampler``, exactly what
    ``DataLoader(shuffle=True)`` builds). With them: as many draws as the split has own cases (the
    epoch, and so the budget at a given number of epochs, of training without them), without
    replacement within the epoch, each draw an extra case with probability about ``extra_share``
    (torch's ``WeightedRandomSampler``: weight ``extra_share / n_extra`` per extra case,
    ``(1 - extra_share) / n_own`` per own case). Mixed batches, as in synthetic-plus-real training,
    where a plain union would let 60 phantoms drown 2 real cases.

    ``seed``: the order is drawn from a generator of its own seeded with it (the run's seed), not from
    PyTorch's global one, which the network's dropout also draws from: a class head's dropout then
    leaves the segmentation's batches as they are. The sampler's ``set_epoch(e)`` (called by
    :class:`pipeline.runtime.determinism.EpochSeeds` as each epoch starts, as for a
    ``DistributedSampler``) seeds epoch ``e``'s order with (seed, e), so a resumed run draws what
    the uninterrupted one draws; without it, each iteration goes on from the last. ``None``: the
    global generator, and ``set_epoch`` changes nothing.

    Raises:
        InputError: ``extra_share`` outside [0, 1), or no own case.
    """
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    n_own = n_items - n_extra
    if n_extra <= 0:
        return EpochOrder(RandomSampler(range(n_items)), seed)
    if n_own <= 0:
        raise InputError(None, "extra training cases need at least one case in the split's own training part")
    if not 0.0 <= extra_share < 1.0:
        raise InputError(None, f"extra_train_share must lie in [0, 1), got {extra_share}")
    weights = [(1.0 - extra_share) / n_own] * n_own + [extra_share / n_extra] * n_extra
    return EpochOrder(WeightedRandomSampler(weights, num_samples=n_own, replacement=False), seed)


class EpochOrder(torch.utils.data.Sampler):
    """``sampler`` (a torch sampler that draws from its ``generator`` attribute) whose epoch ``e``
    draws from a generator seeded with (``seed``, e) once ``set_epoch(e)`` is called (torch's
    samplers have no such method: ``DistributedSampler`` alone does). ``seed`` None: the global
    generator, as torch's samplers without a generator."""

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int | None) -> None:
        self.sampler = sampler
        self.seed = None if seed is None else int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.seed is not None:
            self.sampler.generator = stream_generator(self.seed, "training order", int(epoch))

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def cohort_sampler(cohort: Any, extra_share: float = 0.5, seed: int | None = None) -> torch.utils.data.Sampler:
    """:func:`training_sampler` for a :class:`pipeline.data.cohort.Cohort`'s training items (the
    config's ``train#sampler``): its extra cases are the last ``cohort.info["extra_train"]``."""
    return training_sampler(len(cohort.train), int(cohort.info.get("extra_train", 0)), extra_share, seed)


class CheckedPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose entries are checked by content.

    Each entry is ``torch.save``'s bytes followed by :data:`TRAILER` and their SHA-256, written
    through :func:`~pipeline.io.imageio.atomic_write` in the cache folder itself (MONAI writes in
    the system's temporary folder and moves the file, which is a copy, not a rename, across file
    systems). A read takes the file's bytes once, checks the digest, then loads them; an entry that
    does not match (cut short, bytes changed, written by another version) is reported in one
    warning and recomputed. Same arguments as ``PersistentDataset``.
    """

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        path = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if path.is_file():
            cached = self._read(path)
            if cached is not None:
                return cached
        item = self._pre_transform(deepcopy(item_transformed))  # keep the original hashed
        buf = io.BytesIO()
        torch.save(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), buf,
                   pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                   pickle_protocol=self.pickle_protocol)
        body = buf.getvalue()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(body + TRAILER + hashlib.sha256(body).digest()), ".pt")
        return item

    def _read(self, path: Path) -> Any | None:
        """The entry's item, or ``None`` (reported) when its bytes do not match their digest."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed meanwhile
            return None
        body, marker, digest = data[:-32 - len(TRAILER)], data[-32 - len(TRAILER):-32], data[-32:]
        if marker != TRAILER or hashlib.sha256(body).digest() != digest:
            why = "content does not match its checksum" if marker == TRAILER else "no checksum at its end"
            logger.warning("dataset cache entry %s is corrupt (%s): recomputed", path, why)
            return None
        return torch.load(io.BytesIO(body), weights_only=self.weights_only)
