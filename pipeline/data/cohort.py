"""From a datalist to the MONAI dataset items a bundle run needs (one call from the config).

``load_cohort`` validates every entry and file before anything trains (all problems reported
together), makes or re-reads the seeded patient split (saved in the run's output folder so a
resumed or repeated run uses the same patients), computes the training-set class weights,
and writes the atlas brain mask next to the run's cache so the transform chain can load it.

``extra_train`` names a second datalist whose every case joins the training part only (never
validation or test), e.g. the synthetic cohort beside a few real scans: the items follow the
split's own training items in ``Cohort.train`` and ``Cohort.info["extra_train"]`` counts them, so
that :func:`pipeline.data.feed.training_sampler` can draw them at a chosen share.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipeline.data.datalist import class_weights, load_datalist, to_monai_dicts
from pipeline.data.splits import load_splits, ratio_split, save_splits
from pipeline.io.errors import InputError
from pipeline.runtime.distributed import main_process_first

__all__ = ["Cohort", "load_cohort", "atlas_brain_mask_file", "content_check_cache"]

logger = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Dataset items of one split, ready for ``monai.data.Dataset`` (``cohort.train`` ...)."""

    classes: list[str]
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    class_weights: list[float]
    split_file: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def content_check_cache(registration_cache: str | Path) -> str:
    """The folder where the datalist's content check remembers the cases that passed: beside the
    registration cache, so runs that share one share the other."""
    return os.path.join(os.path.dirname(str(registration_cache)), "checked")


def atlas_brain_mask_file(atlas_path: str | None, atlas_mask: str | None, spacing: float | None,
                          cache_dir: str | Path, dilate_mm: float = 4.0) -> str:
    """Write (once) the atlas brain mask, dilated by ``dilate_mm``, as NIfTI in ``cache_dir``.

    The chain multiplies each registered image by it (skull and background removed, tumours at
    the brain surface kept by the margin) before z-scoring inside it.
    """
    from pipeline.registration.atlas import load_atlas

    atlas = load_atlas(atlas_path, atlas_mask, spacing)
    path = Path(cache_dir) / f"atlas_{atlas.name}_{atlas.fingerprint()}_brain{dilate_mm:g}mm.nii.gz"
    with main_process_first():  # several processes (multi_gpu_train.json): rank 0 writes it
        if not path.exists():
            _write_brain_mask(atlas, path, dilate_mm)
    return str(path)


def _write_brain_mask(atlas: Any, path: Path, dilate_mm: float) -> None:
    from pipeline.io.imageio import write_image_atomic

    radius = [max(1, round(dilate_mm / s)) for s in atlas.brain_mask.GetSpacing()]
    mask = sitk.BinaryDilate(atlas.brain_mask > 0, radius) if dilate_mm > 0 else atlas.brain_mask > 0
    write_image_atomic(sitk.Cast(mask, sitk.sitkUInt8), path)


def load_cohort(
    datalist: str | Path,
    output_dir: str | Path,
    split_file: str | Path | None = None,
    split_index: int = 0,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    validate: bool = True,
    brain_mask: str | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    check_cache: str | Path | None = None,
    sequences: list[str] | tuple[str, ...] | None = None,
    extra_train: str | Path | None = None,
) -> Cohort:
    """Validate a datalist and return the items of one train/val/test split.

    Args:
        datalist: JSON or CSV datalist (see :mod:`pipeline.data.datalist`).
        output_dir: the run's folder; the split is saved there as ``split.json`` (and re-read
            from there when the run resumes).
        split_file: an existing split file (e.g. from ``python -m pipeline split`` or the
            experiment runner); ``None`` = use ``output_dir/split.json`` or make one.
        split_index: which split of the file (repeat / fold).
        ratios, seed: how a new split is made.
        validate: open every image/mask and check it (NaN, 3-D, mask grid/values).
        brain_mask: path added to every item as ``brain`` (see :func:`atlas_brain_mask_file`).
        class_names: the model's classes (config ``class_names``); the datalist's classes are
            matched to them by name (another order is fine, an unknown class is an error).
        check_cache: folder remembering cases that passed validation, by content (an unchanged
            case is not opened again at the next start).
        sequences: the sequences the model takes, in channel order (:meth:`Datalist.select`);
            ``None``: all of the datalist's.
        extra_train: a datalist whose cases are all added to the training part (checked like the
            main one; its ids must differ from the main datalist's, its classes be the model's).

    Raises:
        InputError / InputErrors: bad datalist, files or split.
    """
    if not datalist:
        raise InputError(None, "no datalist given: pass --datalist PATH (JSON or CSV)")
    with main_process_first():  # several processes: rank 0 checks the files and writes the split first
        return _load_cohort(datalist, output_dir, split_file, split_index, ratios, seed, validate, brain_mask,
                            class_names, check_cache, sequences, extra_train)


def _load_cohort(datalist: str | Path, output_dir: str | Path, split_file: str | Path | None, split_index: int,
                 ratios: tuple[float, float, float], seed: int, validate: bool, brain_mask: str | None,
                 class_names: list[str] | tuple[str, ...] | None, check_cache: str | Path | None,
                 sequences: list[str] | tuple[str, ...] | None, extra_train: str | Path | None = None) -> Cohort:
    dl = load_datalist(datalist, check_contents=validate, check_cache=check_cache)  # every entry and file problem at once
    dl = dl.select(sequences)
    if class_names is not None:
        dl = dl.with_classes(class_names)
    own = Path(output_dir) / "split.json"
    source = Path(split_file) if split_file else own
    if source.exists():
        splits = load_splits(source)
        if not 0 <= split_index < len(splits):
            raise InputError(source, f"split_index {split_index} out of range (file has {len(splits)} splits)")
        split = splits[split_index]
    else:
        split = {"name": f"seed{seed}", **ratio_split(dl.cases, ratios, seed)}
        save_splits(own, [split], kind="ratio", ratios=list(ratios), seed=seed, datalist=str(dl.path))
        source = own
    unassigned = set(dl.by_id()) - set(split["train"]) - set(split["val"]) - set(split["test"])
    if unassigned:  # e.g. cases added to the datalist after the split was made
        logger.warning("%d case(s) of %s are in no part of split %s and are not used: %s", len(unassigned), dl.path,
                       source, sorted(unassigned)[:10])
    parts = {k: to_monai_dicts(dl.subset(split[k])) for k in ("train", "val", "test")}
    train_cases = dl.subset(split["train"])
    extra_cases: list = []
    if extra_train:
        extra = load_datalist(extra_train, check_contents=validate, check_cache=check_cache).select(dl.sequences)
        extra = extra.with_classes(class_names if class_names is not None else dl.classes)
        clash = sorted(set(extra.by_id()) & set(dl.by_id()))
        if clash:  # one id, two patients: the split, the caches' logs and the tables would mix them up
            raise InputError(extra.path, f"--extra_train: {len(clash)} id(s) also in {dl.path}: {clash[:5]}")
        extra_cases = list(extra.cases)
        parts["train"] += to_monai_dicts(extra_cases)
    if brain_mask:
        for items in parts.values():
            for item in items:
                item["brain"] = brain_mask
    return Cohort(
        classes=list(dl.classes),
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        class_weights=class_weights(train_cases + extra_cases, len(dl.classes)),
        split_file=str(source),
        info={"split": split.get("name"), "datalist": str(dl.path), "sequences": list(dl.sequences),
              "extra_train": len(extra_cases)},
    )
