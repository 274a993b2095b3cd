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


def test_a_stream_generator_repeats_its_draws_whatever_the_global_generator_did():
    from pipeline.runtime.determinism import stream_generator

    torch.manual_seed(0)
    first = torch.randperm(20, generator=stream_generator(3, "training order")).tolist()
    torch.rand(1000)  # the global generator moves on (a head's dropout, its initial weights)
    assert torch.randperm(20, generator=stream_generator(3, "training order")).tolist() == first
    assert torch.randperm(20, generator=stream_generator(4, "training order")).tolist() != first
    assert torch.randperm(20, generator=stream_generator(3, "random transforms")).tolist() != first
