"""Seeded, patient-level splits, stratified by class where known; saved as JSON to repeat a run.

Two kinds: a ratio split (train/val/test, 70/15/15 by default) and k-fold (each fold is the
test set once; a validation share is carved from the remaining folds). Stratification: cases
are grouped by class (unknown class is its own group), each group is shuffled with the seed and
dealt out in proportion, so each part holds every class in about the global proportion.

Split file format::

    {"kind": "ratio", "seed": 0, "ratios": [0.7, 0.15, 0.15], "datalist": "...",
     "splits": [{"name": "repeat0", "train": [ids], "val": [ids], "test": [ids]}, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.data.datalist import Case, load_datalist
from pipeline.io.errors import InputError

__all__ = ["ratio_split", "kfold_split", "repeated_ratio_splits", "fewer_training_cases", "save_splits", "load_splits",
           "main"]


def _groups(cases: list[Case] | tuple[Case, ...]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for c in sorted(cases, key=lambda c: c.id):
        groups[-1 if c.cls is None else c.cls].append(c.id)
    return dict(sorted(groups.items()))


def _largest_remainder(n: int, ratios: list[float]) -> list[int]:
    """Integer counts summing to ``n`` in proportion to ``ratios`` (largest-remainder rounding)."""
    raw = np.asarray(ratios, dtype=float) / sum(ratios) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def ratio_split(cases: list[Case] | tuple[Case, ...], ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> dict[str, list[str]]:
    """One stratified train/val/test split of patient ids.

    Args:
        cases: the datalist's cases (one per patient id).
        ratios: train, val, test shares (normalised; a 0 share gives an empty part).
        seed: random seed; same cases + seed = same split.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (ids, sorted within each part).

    Raises:
        InputError: bad ratios or too few cases for a non-empty val/test.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise InputError(None, f"ratios must be three non-negative numbers, got {ratios}")
    n = len(cases)
    wanted = _largest_remainder(n, list(ratios))
    if any(r > 0 and k == 0 for r, k in zip(ratios, wanted, strict=True)):
        raise InputError(None, f"{n} cases are too few for ratios {ratios} (a part would be empty)")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    # Deal each class group out in proportion, then fix the totals so they match `wanted` exactly.
    leftovers: list[str] = []
    for ids in _groups(cases).values():
        ids = list(rng.permutation(ids))
        k = _largest_remainder(len(ids), list(ratios))
        start = 0
        for name, cnt in zip(parts, k, strict=True):
            parts[name].extend(ids[start:start + cnt])
            start += cnt
    for name, target in zip(list(parts), wanted, strict=True):
        while len(parts[name]) > target:
            leftovers.append(parts[name].pop(int(rng.integers(len(parts[name])))))
    for name, target in zip(list(parts), wanted, strict=True):
        while len(parts[name]) < target:
            parts[name].append(leftovers.pop())
    return {k: sorted(v) for k, v in parts.items()}


def repeated_ratio_splits(cases: list[Case] | tuple[Case, ...], repeats: int = 6,
                          ratios: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0) -> list[dict]:
    """``repeats`` independent ratio splits (the study's protocol: 70/15/15 repeated 6 times)."""
    return [{"name": f"repeat{r}", **ratio_split(cases, ratios, seed=seed * 1000 + r)} for r in range(repeats)]


def kfold_split(cases: list[Case] | tuple[Case, ...], k: int = 5, seed: int = 0, val_fraction: float = 0.15) -> list[dict]:
    """Stratified k-fold: fold ``i`` is the test set once; ``val_fraction`` of the rest is validation.

    Returns:
        ``k`` dicts ``{"name": "fold<i>", "train": [...], "val": [...], "test": [...]}``.
    """
    if k < 2 or k > len(cases):
        raise InputError(None, f"k must be between 2 and the number of cases ({len(cases)}), got {k}")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for ids in _groups(cases).values():
        for j, cid in enumerate(rng.permutation(ids)):
            folds[(offset + j) % k].append(str(cid))
        offset += len(ids)
    by_id = {c.id: c for c in cases}
    out = []
    for i in range(k):
        rest = [by_id[c] for f, fold in enumerate(folds) if f != i for c in fold]
        inner = ratio_split(rest, (1 - val_fraction, val_fraction, 0.0), seed=seed * 1000 + i) if val_fraction > 0 \
            else {"train": sorted(c.id for c in rest), "val": []}
        out.append({"name": f"fold{i}", "train": inner["train"], "val": inner["val"], "test": sorted(folds[i])})
    return out


def fewer_training_cases(splits: list[dict], n: int, seed: int = 0) -> list[dict]:
    """The same splits with only ``n`` of each split's training cases (validation and test untouched),
    for a learning curve: the ``n`` kept are the first of a seeded shuffle of the split's training
    ids, so for one seed and split the cases kept at a smaller ``n`` are among those kept at a larger
    one (nested subsets, as a learning curve needs).

    Raises:
        InputError: ``n`` is below 1 or above a split's number of training cases.
    """
    out = []
    for k, split in enumerate(splits):
        train = sorted(split["train"])
        if not 1 <= n <= len(train):
            raise InputError(None, f"--train-cases {n}: split {k} ({split.get('name', '')}) has {len(train)} "
                                   "training cases")
        order = np.random.default_rng([seed, k]).permutation(len(train))
        out.append({**split, "train": sorted(train[i] for i in order[:n])})
    return out


def save_splits(path: str | Path, splits: list[dict], **info) -> Path:
    """Write splits (and how they were made) to JSON atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({**info, "splits": splits}, f, indent=1)
    os.replace(tmp, p)
    return p


def load_splits(path: str | Path) -> list[dict]:
    """Read a split file written by :func:`save_splits`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "split file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        splits = data["splits"]
        for s in splits:
            s["train"], s["val"], s["test"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(p, f"not a split file written by `python -m pipeline split` ({exc})") from None
    for k, s in enumerate(splits):
        parts = {name: set(s[name]) for name in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = parts[a] & parts[b]
            if shared:  # the same patient on both sides would leak into the evaluation
                raise InputError(p, f"split {k} ({s.get('name', '')}): ids in both {a} and {b}: {sorted(shared)[:5]}")
    return splits


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline split --datalist F --out F [--kind ratio|kfold] [--repeats N] [--folds K]``."""
    p = argparse.ArgumentParser(prog="python -m pipeline split", description=__doc__.splitlines()[0])
    p.add_argument("--datalist", required=True, help="datalist (JSON or CSV) of the cohort")
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--kind", choices=("ratio", "kfold"), default="ratio",
                   help="ratio: repeated seeded train/validation/test splits; kfold: K folds, each the test part once")
    p.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"), help="split fractions (kind ratio; default 0.7 0.15 0.15)")
    p.add_argument("--repeats", type=int, default=1, help="repeated splits (kind ratio)")
    p.add_argument("--folds", type=int, default=5, help="folds (kind kfold)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (patient-level, stratified by class)")
    a = p.parse_args(argv)
    dl = load_datalist(a.datalist)
    if a.kind == "ratio":
        splits = repeated_ratio_splits(dl.cases, a.repeats, tuple(a.ratios), a.seed)
        info = {"kind": "ratio", "ratios": list(a.ratios)}
    else:
        splits = kfold_split(dl.cases, a.folds, a.seed)
        info = {"kind": "kfold", "folds": a.folds}
    save_splits(a.out, splits, seed=a.seed, datalist=str(dl.path), **info)
    for s in splits:
        print(f"{s['name']}: train {len(s['train'])}, val {len(s['val'])}, test {len(s['test'])}")
    print(f"wrote {a.out}")
    return 0
