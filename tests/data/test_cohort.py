"""From a datalist to a split's dataset items: extra training cases from a second datalist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.cohort import load_cohort
from pipeline.io.errors import InputError


def _second_datalist(first: Path, prefix: str, classes: list[str] | None, n: int = 5) -> Path:
    """A datalist of the first one's files under other ids (``classes`` None: no class column)."""
    doc = json.loads(first.read_text(encoding="utf-8"))
    entries = []
    for e in doc["training"][:n]:
        e = {**e, "id": prefix + e["id"], "image": str(first.parent / e["image"]),
             "label": str(first.parent / e["label"])}
        if classes is None:
            e.pop("class")
        entries.append(e)
    path = first.parent / f"{prefix}datalist.json"
    path.write_text(json.dumps({"classes": classes or [], "training": entries}), encoding="utf-8")
    return path


def test_extra_cases_join_the_training_part_only(tiny_cohort, tmp_path):
    names = ["BRAF V600E", "BRAF fusion", "other"]
    alone = load_cohort(tiny_cohort, tmp_path / "a", class_names=names)
    # the second datalist lists its classes in another order: matched to the model's by name
    extra = _second_datalist(tiny_cohort, "x", ["other", "BRAF fusion", "BRAF V600E"])
    mixed = load_cohort(tiny_cohort, tmp_path / "b", class_names=names, extra_train=extra)
    assert mixed.train[:len(alone.train)] == alone.train
    assert (mixed.val, mixed.test) == (alone.val, alone.test)  # the split is the main datalist's
    added = mixed.train[len(alone.train):]
    assert mixed.info["extra_train"] == len(added) == 5 and alone.info["extra_train"] == 0
    first = json.loads(tiny_cohort.read_text(encoding="utf-8"))["training"][:5]
    assert [a["class"] for a in added] == [2 - e["class"] for e in first]  # 0 <-> 2 swapped by name


def test_extra_cases_must_not_reuse_an_id_nor_bring_an_unknown_class(tiny_cohort, tmp_path):
    same_ids = _second_datalist(tiny_cohort, "", ["BRAF V600E", "BRAF fusion", "other"])
    with pytest.raises(InputError, match="also in"):
        load_cohort(tiny_cohort, tmp_path / "a", extra_train=same_ids)
    unknown = _second_datalist(tiny_cohort, "y", ["BRAF V600E", "BRAF fusion", "H3 K27M"])
    with pytest.raises(InputError, match="H3 K27M"):
        load_cohort(tiny_cohort, tmp_path / "b", class_names=["BRAF V600E", "BRAF fusion", "other"],
                    extra_train=unknown)
