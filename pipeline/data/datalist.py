"""Datalists: read (JSON decathlon style or CSV), resolve paths, validate every entry at once.

Format (DESIGN.md): ``{"classes": ["BRAF V600E", "BRAF fusion", "other"], "training":
[{"id": "c001", "image": "c001/flair.nii.gz", "label": "c001/mask.nii.gz", "class": 1}, ...]}``.
``label`` (mask) and ``class`` are optional per case; ``class`` is an index into ``classes``
or a class name. A CSV with the columns ``id,image,label,class`` is accepted too (empty cell =
missing). Relative paths are relative to the datalist's folder.

Classes missing from a case are stored as ``-1`` (``MISSING_CLASS``) and a missing mask as
``has_label = 0`` so the loss can drop the term of the absent task per sample.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.validation import content_errors
from pipeline.io.errors import InputError, InputErrors

__all__ = [
    "DEFAULT_CLASSES",
    "MISSING_CLASS",
    "Case",
    "Datalist",
    "load_datalist",
    "validate_datalist",
    "to_monai_dicts",
    "class_weights",
    "main",
]

DEFAULT_CLASSES = ("BRAF V600E", "BRAF fusion", "other")
MISSING_CLASS = -1


@dataclass(frozen=True)
class Case:
    """One patient: absolute image path, optional mask path and class index."""

    id: str
    image: Path
    label: Path | None = None
    cls: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Datalist:
    """A parsed datalist: class names and cases (paths resolved, classes as indices)."""

    path: Path
    classes: tuple[str, ...]
    cases: tuple[Case, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def by_id(self) -> dict[str, Case]:
        return {c.id: c for c in self.cases}

    def with_classes(self, names: list[str] | tuple[str, ...]) -> Datalist:
        """The same datalist with class indices re-expressed in the order of ``names`` (the
        model's classes, matched by name, case-insensitively).

        Raises:
            InputError: a class of the datalist is not among ``names``.
        """
        lookup = {n.lower(): i for i, n in enumerate(names)}
        unknown = [c for c in self.classes if c.lower() not in lookup]
        if unknown:
            raise InputError(self.path, f"classes {unknown} of the datalist are not among the model's class_names "
                                        f"{list(names)}: fix the datalist's 'classes' or set --class_names")
        order = [lookup[c.lower()] for c in self.classes]
        cases = tuple(Case(c.id, c.image, c.label, None if c.cls is None else order[c.cls], c.extra)
                      for c in self.cases)
        return Datalist(self.path, tuple(names), cases, self.meta)

    def subset(self, ids: list[str]) -> list[Case]:
        """Cases with these ids, in the given order."""
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise InputError(self.path, f"split refers to ids not in the datalist: {missing[:5]}")
        return [index[i] for i in ids]


def _absolute(path: str | Path) -> Path:
    """Absolute, normalised path WITHOUT following links: a link loop or a dangling link is then
    reported under the name the user wrote (by :func:`pipeline.io.filecheck.check_entry`)."""
    return Path(os.path.abspath(path))


def _entry_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an input file (missing, link loop, dangling link, FIFO, unreadable,
    empty), or ``None``; the contents are checked by :func:`validate_datalist`."""
    from pipeline.io.filecheck import check_entry

    try:
        check_entry(path, allow_dir=True)  # a DICOM series folder is an image too
    except InputError as exc:
        return exc.problem
    return None


def _whole_number(text: str) -> bool:
    try:
        return float(text.strip()).is_integer()
    except ValueError:
        return False


def _parse_class(value: Any, classes: tuple[str, ...], where: str, path: Path) -> tuple[int | None, InputError | None]:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None, None
    if isinstance(value, bool):
        return None, InputError(path, f"{where}: class {value!r} is not an index or a class name")
    if isinstance(value, int | float) and float(value).is_integer():
        idx = int(value)
    elif isinstance(value, str) and _whole_number(value):
        idx = int(float(value.strip()))  # "1" or "1.0" (a CSV written by pandas with blank cells)
    elif isinstance(value, str):
        names = {c.lower(): i for i, c in enumerate(classes)}
        if value.strip().lower() not in names:
            return None, InputError(path, f"{where}: unknown class name {value!r}; known: {list(classes)}")
        return names[value.strip().lower()], None
    else:
        return None, InputError(path, f"{where}: class {value!r} is not an index or a class name")
    if idx == MISSING_CLASS:
        return None, None
    if not 0 <= idx < len(classes):
        return None, InputError(path, f"{where}: class index {idx} out of range 0..{len(classes) - 1} ({list(classes)})")
    return idx, None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...], dict[str, Any]]:
    if not path.is_file():
        raise InputError(path, "datalist not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise InputError(path, f"CSV datalist needs an 'image' column (columns: {reader.fieldnames})")
            rows = [dict(r) for r in reader]
        return rows, DEFAULT_CLASSES, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"training": data}
    if not isinstance(data, dict):
        raise InputError(path, "datalist JSON must be an object with a 'training' list (or a list of cases)")
    rows = data.get("training", data.get("cases"))
    if not isinstance(rows, list):
        raise InputError(path, "datalist JSON has no 'training' list")
    classes = tuple(data.get("classes") or DEFAULT_CLASSES)
    if len(set(c.lower() for c in classes)) != len(classes):
        raise InputError(path, f"duplicate class names in 'classes': {list(classes)}")
    meta = {k: v for k, v in data.items() if k not in ("training", "cases", "classes")}
    return rows, classes, meta


def load_datalist(path: str | Path, check_files: bool = True, check_contents: bool = False,
                  check_cache: str | Path | None = None) -> Datalist:
    """Parse a datalist (JSON or CSV) and check every entry; all problems are reported at once.

    Args:
        path: the datalist file; relative paths inside are relative to its folder.
        check_files: also check that every image/mask exists and can be opened (cheap).
        check_contents: also open every image and mask (:func:`validate_datalist`'s checks),
            reporting those problems together with the entries' own (replaces ``check_files``).
        check_cache: folder remembering cases that passed the content check, by content
            (:func:`pipeline.data.validation.content_errors`); ``None``: check every case.

    Returns:
        The :class:`Datalist`.

    Raises:
        InputError: the file itself is missing or unreadable.
        InputErrors: one or more entries are wrong (missing key/file, unknown class, duplicate id).
    """
    path = _absolute(path)
    rows, classes, meta = _read_rows(path)
    root = path.parent
    errors: list[InputError] = []
    cases: list[Case] = []
    seen: Counter[str] = Counter()
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            errors.append(InputError(path, f"entry {n}: expected an object, got {type(row).__name__}"))
            continue
        image = row.get("image")
        cid = str(row.get("id") or (Path(str(image)).name.split(".")[0] if image else f"#{n}"))
        where = f"case {cid!r}"
        seen[cid] += 1
        if any(sep in cid for sep in ("/", "\\")) or cid in (".", ".."):
            errors.append(InputError(path, f"{where}: an id names the case's output folder, so it cannot "
                                           "contain '/' or '\\' or be '.' or '..'"))
            continue
        if not image:
            errors.append(InputError(path, f"{where}: no 'image'"))
            continue
        img_path = _absolute(root / str(image))
        lbl = row.get("label")
        lbl_path = _absolute(root / str(lbl)) if lbl not in (None, "") else None
        cls, err = _parse_class(row.get("class"), classes, where, path)
        if err:
            errors.append(err)
        if check_files and not check_contents:
            for kind, file in (("image", img_path), ("mask", lbl_path)):
                problem = None if file is None else _entry_problem(file)
                if problem:
                    text = f"{kind} file not found" if problem == "file not found" else f"{kind}: {problem}"
                    errors.append(InputError(file, f"{where}: {text}"))
        extra = {k: v for k, v in row.items() if k not in ("id", "image", "label", "class")}
        cases.append(Case(cid, img_path, lbl_path, cls, extra))
    for cid, k in seen.items():
        if k > 1:
            errors.append(InputError(path, f"duplicate id {cid!r} ({k} entries)"))
    if not rows:
        errors.append(InputError(path, "datalist has no cases"))
    if check_contents:
        errors += content_errors(cases, check_cache)
    if errors:
        raise InputErrors(errors, header=f"datalist {path}")
    return Datalist(path, classes, tuple(cases), meta)


def validate_datalist(dl: Datalist, check_contents: bool = True, check_cache: str | Path | None = None) -> None:
    """Open every image and mask: missing files, link loops, dangling links, unreadable, corrupt or
    non-3-D files, degenerate geometry, NaN voxels, bad mask values, mask grid different from its
    image (:mod:`pipeline.io.filecheck` and :mod:`pipeline.io.imageio`). Every problem is collected and
    raised together.

    Raises:
        InputErrors: listing each bad file and its problem.
    """
    if not check_contents:
        return
    errors = content_errors(dl.cases, check_cache)
    if errors:
        raise InputErrors(errors, header=f"datalist {dl.path}")


def to_monai_dicts(cases: list[Case] | tuple[Case, ...]) -> list[dict[str, Any]]:
    """MONAI dataset items: ``image``/``label`` paths, ``class`` (-1 when missing), ``has_label``.

    Cases without a mask have no ``label`` key: :class:`pipeline.data.missing_labels.FillMissingMaskd`
    adds an all-zero mask after loading (so a batch collates), and ``has_label = 0`` removes it
    from the loss and the metrics.
    """
    out = []
    for c in cases:
        item = {
            "id": c.id,
            "image": str(c.image),
            "class": MISSING_CLASS if c.cls is None else int(c.cls),
            "has_label": 0 if c.label is None else 1,
            "has_class": 0 if c.cls is None else 1,
        }
        if c.label is not None:
            item["label"] = str(c.label)
        out.append(item)
    return out


def class_weights(cases: list[Case] | tuple[Case, ...], num_classes: int) -> list[float]:
    """Inverse-frequency class weights from the cases that have a class, normalised to mean 1.

    Classes absent from ``cases`` get weight 1 (they cannot be weighted from data).
    """
    counts = Counter(c.cls for c in cases if c.cls is not None)
    total = sum(counts.values())
    if total == 0:
        return [1.0] * num_classes
    raw = [total / (num_classes * counts[k]) if counts[k] else 1.0 for k in range(num_classes)]
    mean = sum(raw) / num_classes
    return [r / mean for r in raw]


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline validate DATALIST``: check a datalist and every file it names."""
    p = argparse.ArgumentParser(prog="python -m pipeline validate", description=main.__doc__)
    p.add_argument("datalist", help="datalist JSON or CSV")
    p.add_argument("--no-contents", action="store_true", help="only check that files exist")
    a = p.parse_args(argv)
    dl = load_datalist(a.datalist, check_contents=not a.no_contents)
    n_lbl = sum(c.label is not None for c in dl.cases)
    n_cls = Counter(dl.classes[c.cls] for c in dl.cases if c.cls is not None)
    print(f"{dl.path}: {len(dl.cases)} cases OK; {n_lbl} with mask; classes {dict(n_cls)}")
    return 0
