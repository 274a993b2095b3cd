"""The disk cache of the training chain: entries checked by content, a damaged one recomputed."""

from __future__ import annotations

import logging

import torch
from monai.data import PersistentDataset
from monai.transforms import Lambdad

from pipeline.data.feed import CheckedPersistentDataset, training_dataset

ITEMS = [{"id": "a", "x": 1.0}, {"id": "b", "x": 2.0}, {"id": "c", "x": 3.0}]


def _transform(calls: list[str]) -> Lambdad:
    def fill(x: float) -> torch.Tensor:
        calls.append(str(x))
        return torch.arange(1000, dtype=torch.float32) * x

    return Lambdad("x", fill)


def test_damaged_entries_are_reported_and_recomputed(tmp_path, caplog) -> None:
    calls: list[str] = []
    first = training_dataset("disk", ITEMS, _transform(calls), tmp_path)
    assert isinstance(first, CheckedPersistentDataset)
    expected = [first[i]["x"].clone() for i in range(3)]
    entries = sorted(tmp_path.glob("*.pt"))
    assert len(entries) == 3 and len(calls) == 3 and not list(tmp_path.glob(".*"))  # no temporary left
    whole = {p: p.read_bytes() for p in entries}
    flipped = bytearray(whole[entries[0]])
    flipped[len(flipped) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load would return a changed tensor
    entries[0].write_bytes(bytes(flipped))
    entries[1].write_bytes(whole[entries[1]][: len(whole[entries[1]]) // 2])
    calls.clear()
    again = training_dataset("disk", ITEMS, _transform(calls), tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.feed"):
        got = [again[i]["x"] for i in range(3)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert len(calls) == 2  # the two damaged entries recomputed, the whole one read
    warned = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warned) == 2 and all("recomputed" in w for w in warned)
    assert {p: p.read_bytes() for p in entries} == whole  # rewritten whole


def test_an_entry_without_its_checksum_is_not_loaded(tmp_path, caplog) -> None:
    """An entry MONAI's own PersistentDataset wrote (no digest at its end) is recomputed, not trusted."""
    calls: list[str] = []
    PersistentDataset(ITEMS[:1], _transform(calls), cache_dir=tmp_path)[0]
    ours = CheckedPersistentDataset(ITEMS[:1], _transform(calls), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.feed"):
        ours[0]
    assert len(calls) == 2 and "no checksum at its end" in caplog.text


def test_without_extra_cases_an_epoch_is_every_item_once_as_shuffle_makes_it() -> None:
    from torch.utils.data import DataLoader

    from pipeline.data.feed import training_sampler

    torch.manual_seed(5)
    ours = [int(i) for i in DataLoader(list(range(9)), batch_size=1, sampler=training_sampler(9))]
    torch.manual_seed(5)
    shuffled = [int(i) for i in DataLoader(list(range(9)), batch_size=1, shuffle=True)]
    assert ours == shuffled and sorted(ours) == list(range(9))


def test_a_seeded_sampler_draws_the_same_epochs_whatever_else_draws_from_torch() -> None:
    from pipeline.data.feed import training_sampler

    for n_extra in (0, 5):  # RandomSampler and WeightedRandomSampler
        torch.manual_seed(0)
        sampler = training_sampler(12, n_extra, 0.5, seed=7)
        first = [list(sampler) for _ in range(3)]
        torch.manual_seed(1)
        sampler = training_sampler(12, n_extra, 0.5, seed=7)
        again = []
        for _ in range(3):
            torch.rand(50)  # dropout between epochs
            again.append(list(sampler))
        assert again == first and first[0] != first[1]  # a new order each epoch, the same each run
        assert list(training_sampler(12, n_extra, 0.5, seed=8)) != first[0]


def test_extra_cases_take_their_share_of_an_epoch_as_long_as_the_own_one() -> None:
    import pytest

    from pipeline.data.feed import training_sampler
    from pipeline.io.errors import InputError

    torch.manual_seed(0)
    n_own, n_extra = 6, 60
    sampler = training_sampler(n_own + n_extra, n_extra, extra_share=0.5)
    epochs = [list(sampler) for _ in range(300)]
    assert all(len(e) == n_own and len(set(e)) == n_own for e in epochs)  # no item twice in an epoch
    share = sum(i >= n_own for e in epochs for i in e) / (300 * n_own)
    assert 0.4 < share < 0.6, share
    # at share 0.1 an own case comes far more often than an extra one; at share 0 never an extra one
    rare = [i for _ in range(300) for i in training_sampler(n_own + n_extra, n_extra, 0.1)]
    assert sum(i >= n_own for i in rare) / len(rare) < 0.2
    assert all(i < n_own for _ in range(20) for i in training_sampler(n_own + n_extra, n_extra, 0.0))
    with pytest.raises(InputError, match="extra_train_share"):
        training_sampler(10, 4, 1.0)
    with pytest.raises(InputError, match="own training part"):
        training_sampler(4, 4, 0.5)
