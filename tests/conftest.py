"""Shared fixtures: tiny seeded NIfTI volumes written to a temp dir, and the real-data path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``, what scripts/test.sh runs) each worker gets cores / N threads,
    and the subprocesses it starts inherit that through OMP_NUM_THREADS: N workers each using every
    core would oversubscribe the machine (on 2 cores, 2 x 2 threads ran several times slower)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def write_volume(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 direction=None) -> Path:
    """Write a numpy array (z, y, x order as SimpleITK) as a NIfTI file and return its path."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def blob_case(rng: np.random.Generator, shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A tiny image with a bright sphere (the 'tumour') on a noisy background, and its mask."""
    z, y, x = np.indices(shape)
    c = [rng.integers(8, s - 8) for s in shape]
    r = rng.uniform(3, 5)
    mask = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= r * r
    img = (rng.normal(100, 10, shape) + 80 * mask).astype(np.float32)
    return img, mask.astype(np.uint8)


@pytest.fixture
def tiny_cohort(tmp_path: Path) -> Path:
    """A decathlon-style datalist of 12 tiny cases (3 classes) in ``tmp_path``; returns the JSON path."""
    import json

    rng = np.random.default_rng(0)
    entries = []
    for i in range(12):
        img, mask = blob_case(rng)
        cid = f"c{i:03d}"
        write_volume(tmp_path / cid / "image.nii.gz", img)
        write_volume(tmp_path / cid / "mask.nii.gz", mask)
        entries.append({"id": cid, "image": f"{cid}/image.nii.gz", "label": f"{cid}/mask.nii.gz", "class": i % 3})
    dl = {"classes": ["BRAF V600E", "BRAF fusion", "other"], "training": entries}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(dl, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def real_data() -> Path:
    """Path to ../shared/data/real; skips the test when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/real is absent")
    return REAL_DATA


# The longest files first, so that under pytest-xdist (whole files per worker) the longest one does
# not start last and run alone at the end (test_runner.py alone is about 6 minutes on 2 cores).
LONGEST_FILES = ("test_runner.py", "test_tracking.py", "test_precision.py", "test_distributed.py", "test_real_recipe.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the collected tests: files of ``LONGEST_FILES`` first, the rest as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
