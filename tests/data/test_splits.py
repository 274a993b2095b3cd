"""Patient-level splits: reproducible with the seed, stratified by class, saved and re-read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.datalist import Case
from pipeline.data.splits import (
    fewer_training_cases,
    kfold_split,
    load_splits,
    ratio_split,
    repeated_ratio_splits,
    save_splits,
)
from pipeline.io.errors import InputError


def cohort(n: int = 60, unknown: int = 6) -> list[Case]:
    return [Case(f"p{i:03d}", Path(f"/x/{i}.nii.gz"), None, None if i < unknown else i % 3) for i in range(n)]


def test_ratio_split_partitions_and_sizes():
    cases = cohort()
    s = ratio_split(cases, (0.7, 0.15, 0.15), seed=3)
    ids = s["train"] + s["val"] + s["test"]
    assert sorted(ids) == sorted(c.id for c in cases) and len(set(ids)) == len(ids)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (42, 9, 9)


def test_ratio_split_reproducible_and_seed_dependent():
    cases = cohort()
    assert ratio_split(cases, seed=5) == ratio_split(list(reversed(cases)), seed=5)
    assert ratio_split(cases, seed=5) != ratio_split(cases, seed=6)


def test_ratio_split_is_stratified():
    cases = cohort(90, unknown=0)
    s = ratio_split(cases, (0.6, 0.2, 0.2), seed=0)
    by_id = {c.id: c.cls for c in cases}
    for part, n in (("train", 54), ("val", 18), ("test", 18)):
        counts = Counter(by_id[i] for i in s[part])
        assert all(abs(counts[k] - n / 3) <= 1 for k in range(3)), (part, counts)


def test_repeated_splits_differ():
    splits = repeated_ratio_splits(cohort(), repeats=6, seed=0)
    assert len({tuple(s["test"]) for s in splits}) == 6


def test_kfold_each_case_tested_once():
    cases = cohort(50)
    folds = kfold_split(cases, k=5, seed=1)
    tested = [i for f in folds for i in f["test"]]
    assert sorted(tested) == sorted(c.id for c in cases)
    for f in folds:
        assert not set(f["test"]) & (set(f["train"]) | set(f["val"]))
        assert not set(f["train"]) & set(f["val"])


def test_save_and_load_roundtrip(tmp_path):
    splits = repeated_ratio_splits(cohort(), repeats=2, seed=0)
    path = save_splits(tmp_path / "s.json", splits, seed=0)
    assert load_splits(path) == splits


def test_bad_inputs():
    with pytest.raises(InputError, match="too few"):
        ratio_split(cohort(3, 0), (0.7, 0.15, 0.15))
    with pytest.raises(InputError, match="k must be"):
        kfold_split(cohort(4, 0), k=5)
    with pytest.raises(InputError, match="split file not found"):
        load_splits("/nonexistent/split.json")


def test_overlapping_split_file_is_rejected(tmp_path):
    import json

    path = tmp_path / "split.json"
    path.write_text(json.dumps({"splits": [{"name": "x", "train": ["a", "b"], "val": ["c"], "test": ["b"]}]}), encoding="utf-8")
    with pytest.raises(InputError, match=r"ids in both train and test: \['b'\]"):
        load_splits(path)


def test_fewer_training_cases_are_nested_and_leave_val_and_test_alone():
    folds = kfold_split(cohort(40), k=4, seed=2)
    small, large = fewer_training_cases(folds, 3, seed=2), fewer_training_cases(folds, 10, seed=2)
    for full, s, m in zip(folds, small, large, strict=True):
        assert (s["val"], s["test"], m["test"]) == (full["val"], full["test"], full["test"])
        assert len(s["train"]) == 3 and len(m["train"]) == 10
        assert set(s["train"]) < set(m["train"]) < set(full["train"])
    assert fewer_training_cases(folds, 3, seed=2) == small
    assert [s["train"] for s in fewer_training_cases(folds, 3, seed=3)] != [s["train"] for s in small]
    assert len({tuple(s["train"]) for s in small}) == 4  # each split draws its own subset
    with pytest.raises(InputError, match="training cases"):
        fewer_training_cases(folds, len(folds[0]["train"]) + 1)
