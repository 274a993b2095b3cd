"""The training dataset behind the DataLoader: where the deterministic part of the chain is cached.

``dataset_cache`` in ``train.json``:

- ``"disk"`` (default): MONAI ``PersistentDataset``, the deterministic part (registration, loading,
  normalisation, padding, crop indices) stored once per case under ``cache_dir`` and read back with
  ``torch.load`` for every patch: no RAM cost, shared by every run of an experiment on that folder;
- ``"memory"``: MONAI ``CacheDataset``, the same items held in RAM (about 80 MB per case on the
  1 mm grid of ``paper.json``), filled by ``cache_workers`` threads at start; the DataLoader's worker
  processes share the cached tensors (fork, copy-on-write), so nothing is read from disk per patch;
- ``"none"``: MONAI ``Dataset``, the whole chain per patch (debugging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATASET_CACHES", "training_dataset"]

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
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.data.utils import json_hashing

    if kind == "disk":
        return PersistentDataset(data, transform, cache_dir=str(cache_dir), hash_transform=json_hashing)
    if kind == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, int(cache_workers)), progress=True)
    if kind == "none":
        return Dataset(data, transform)
    raise ValueError(f"dataset_cache must be one of {DATASET_CACHES}, got {kind!r}")
