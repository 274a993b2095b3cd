"""Seeding a run: the same draws for the same seed, cuDNN left free unless determinism is asked for."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.runtime.determinism import seed_run


def test_seed_run_repeats_draws_and_sets_cudnn_as_asked():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        seed_run(7)
        first = (random.random(), np.random.rand(), torch.rand(1).item())
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        seed_run(7, deterministic=True)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        seed_run(8)
        assert torch.rand(1).item() != first[2]
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
