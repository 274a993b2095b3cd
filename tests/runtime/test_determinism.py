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


def _epochs(max_epochs: int, resume_from: dict | None = None, seeded: bool = True, distributed: bool = False):
    """What a tiny Ignite training draws per epoch (order, a random transform, the global
    generator), started afresh or from another engine's ``state_dict``, as a process would."""
    from ignite.engine import Engine, Events
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandGaussianNoised
    from torch.utils.data import DistributedSampler

    from pipeline.data.feed import training_sampler
    from pipeline.runtime.determinism import EpochSeeds, seed_run

    seed_run(3)
    data = [{"image": torch.zeros(1, 2), "i": i} for i in range(8)]
    dataset = Dataset(data, transform=RandGaussianNoised(keys="image", prob=1.0))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=3) if distributed else training_sampler(8, 3, 0.5, seed=3)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=0,
                        generator=torch.Generator().manual_seed(3))
    drawn: dict[int, list] = {}

    def step(engine, batch):
        drawn.setdefault(engine.state.epoch, []).append(
            (batch["i"].tolist(), round(float(batch["image"].sum()), 6), round(torch.rand(1).item(), 6)))

    engine = Engine(step)
    if seeded:
        EpochSeeds(3, loader).attach(engine)
    if resume_from is not None:
        engine.add_event_handler(Events.STARTED, lambda e: e.load_state_dict(resume_from))
    engine.run(loader, max_epochs=max_epochs)
    return drawn, engine.state_dict()


def test_a_resumed_training_draws_what_the_uninterrupted_one_draws():
    whole, _ = _epochs(3)
    first, state = _epochs(1)
    assert first[1] == whole[1]
    resumed, _ = _epochs(3, resume_from={**state, "max_epochs": 3})
    assert set(resumed) == {2, 3} and resumed[2] == whole[2] and resumed[3] == whole[3]
    assert whole[2] != whole[3]  # a new order, new transform draws, new dropout every epoch
    # without the handler, the resumed epochs replay the first epochs' draws instead
    unseeded_whole, _ = _epochs(3, seeded=False)
    _, state = _epochs(1, seeded=False)
    unseeded, _ = _epochs(3, resume_from={**state, "max_epochs": 3}, seeded=False)
    assert unseeded[2] != unseeded_whole[2]


def test_a_distributed_sampler_gets_a_new_order_every_epoch():
    seeded, _ = _epochs(3, distributed=True)
    orders = [[i for batch in seeded[e] for i in batch[0]] for e in (1, 2, 3)]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[0]) == list(range(8))
    plain, _ = _epochs(3, seeded=False, distributed=True)
    assert len({tuple(i for batch in plain[e] for i in batch[0]) for e in (1, 2, 3)}) == 1  # torch's: set_epoch or the same
