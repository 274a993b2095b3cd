"""Datalists: read (JSON decathlon style or CSV), resolve paths, validate every entry at once.

Format (DESIGN.md): ``{"classes": ["BRAF V600E", "BRAF fusion", "other"], "training":
[{"id": "c001", "image": "c001/flair.nii.gz", "label": "c001/mask.nii.gz", "class": 1}, ...]}``.
``label`` (mask) and ``class`` are optional per case; ``class`` is an index into ``classes``
or a class name. A CSV with the columns ``id,image,label,class`` is accepted too (empty cell =
missing). Relative paths are relative to the datalist's folder.

Several MRI sequences per case (one image channel each, in one order for every case), in three forms:

* ``"image": ["c001/flair.nii.gz", "c001/t2.nii.gz"]``, optionally named by a top-level
  ``"sequences": ["flair", "t2"]`` (unnamed lists are ``image1``, ``image2``, ...);
* named: a top-level ``"sequences": ["flair", "t2"]`` and a key per sequence in each case
  (``{"id": "c001", "flair": "c001/flair.nii.gz", "t2": "c001/t2.nii.gz"}``);
* CSV without an ``image`` column: every column other than ``id``, ``label`` and ``class`` is a
  sequence, in column order (``id,flair,t2,label,class``).

A single image is the sequence ``image`` (or the one name of ``"sequences"``). The mask is on the
grid of the sequences, which must share one grid (checked with the contents). Which sequences a
model takes, and in which order, is :meth:`Datalist.select`'s business (the config's ``sequences``).

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
    "SINGLE_SEQUENCE",
    "reference_index",
    "model_sequences",
    "dataset_dir",
    "load_datalist",
    "validate_datalist",
    "to_monai_dicts",
    "class_weights",
    "main",
]

DEFAULT_CLASSES = ("BRAF V600E", "BRAF fusion", "other")
MISSING_CLASS = -1
#: The name of the one sequence of a datalist that names none.
SINGLE_SEQUENCE = "image"


@dataclass(frozen=True)
class Case:
    """One patient: absolute image path(s), optional mask path and class index.

    ``image`` is the first sequence; ``images`` every sequence in the datalist's order (empty for a
    single image: :attr:`paths` is the way to read them all).
    """

    id: str
    image: Path
    label: Path | None = None
    cls: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    images: tuple[Path, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every sequence's file, in the datalist's order."""
        return self.images or (self.image,)


@dataclass(frozen=True)
class Datalist:
    """A parsed datalist: class names and cases (paths resolved, classes as indices)."""

    path: Path
    classes: tuple[str, ...]
    cases: tuple[Case, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    sequences: tuple[str, ...] = (SINGLE_SEQUENCE,)

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
        cases = tuple(Case(c.id, c.image, c.label, None if c.cls is None else order[c.cls], c.extra, c.images)
                      for c in self.cases)
        return Datalist(self.path, tuple(names), cases, self.meta, self.sequences)

    def select(self, wanted: list[str] | tuple[str, ...] | None) -> Datalist:
        """The same datalist with the sequences a model takes, in its order.

        ``None`` keeps them all. A datalist of one sequence serves any one-sequence model whatever
        the names (a FLAIR-only datalist names nothing), and a model of one unnamed image
        (``image``) takes the FLAIR of a datalist of several. Unnamed sequences (``image1`` ...) are
        taken by position when the counts agree; named ones by name (case-insensitive).

        Raises:
            InputError: a wanted sequence the datalist does not have, or a count that differs.
        """
        if wanted is None or list(wanted) == list(self.sequences):
            return self
        wanted = [str(w) for w in wanted]
        if not wanted:
            raise InputError(self.path, "the list of sequences to use is empty")
        have = [s.lower() for s in self.sequences]
        if len(self.sequences) == 1 and len(wanted) == 1:
            order = [0]
        elif wanted == [SINGLE_SEQUENCE] and "flair" in have:  # a model of one unnamed image: the FLAIR
            order = [have.index("flair")]
        elif all(w.lower() in have for w in wanted):
            order = [have.index(w.lower()) for w in wanted]
        elif _unnamed(self.sequences) and len(wanted) == len(self.sequences):
            order = list(range(len(wanted)))
        else:
            missing = [w for w in wanted if w.lower() not in have]
            raise InputError(self.path, f"the model takes the sequences {wanted} but the datalist has "
                                        f"{list(self.sequences)} (missing {missing}): name them with a top-level "
                                        "'sequences' list or set 'sequences' in the overlay")
        cases = []
        for c in self.cases:
            paths = tuple(c.paths[k] for k in order)
            cases.append(Case(c.id, paths[0], c.label, c.cls, c.extra, paths if len(paths) > 1 else ()))
        return Datalist(self.path, self.classes, tuple(cases), self.meta, tuple(wanted))

    def subset(self, ids: list[str]) -> list[Case]:
        """Cases with these ids, in the given order."""
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise InputError(self.path, f"split refers to ids not in the datalist: {missing[:5]}")
        return [index[i] for i in ids]


def reference_index(sequences: list[str] | tuple[str, ...] | None, reference: str | int | None = None) -> int:
    """Which of a case's sequences the registration is estimated on.

    Args:
        sequences: the sequences' names in channel order (``None``: one image).
        reference: a name (case-insensitive), an index, or ``None``: ``flair`` when among the
            sequences, else the first.

    Raises:
        InputError: a name that is not among ``sequences``, or an index out of range.
    """
    names = [str(n).lower() for n in (sequences or [SINGLE_SEQUENCE])]
    if reference is None:
        return names.index("flair") if "flair" in names else 0
    if isinstance(reference, int) and not isinstance(reference, bool):
        if not 0 <= reference < len(names):
            raise InputError(None, f"reference_sequence {reference} is out of range for the sequences {list(sequences or [])}")
        return reference
    if str(reference).lower() not in names:
        raise InputError(None, f"reference_sequence {reference!r} is not among the sequences {list(sequences or [])}")
    return names.index(str(reference).lower())


def model_sequences(datalist: str | Path | None, sequences: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The sequences a model trained on ``datalist`` takes, in channel order (``in_channels`` is
    their number): ``sequences`` when the config names them, else every sequence of the datalist,
    else one image.

    Raises:
        InputError / InputErrors: ``sequences`` is not a non-empty list of names, or the datalist
            cannot be read.
    """
    if sequences is not None:
        if isinstance(sequences, str) or not sequences or not all(isinstance(n, str) and n for n in sequences):
            raise InputError(None, f"sequences must be a non-empty list of sequence names, e.g. ['flair', 't2'], "
                                   f"got {sequences!r}")
        return list(sequences)
    if datalist in (None, ""):
        return [SINGLE_SEQUENCE]
    # the names only: the entries' problems are reported all together when the cohort is loaded
    rows, _, _, declared = _read_rows(_absolute(datalist))
    if declared:
        return list(declared)
    first = next((r.get("image") for r in rows if isinstance(r, dict) and r.get("image")), None)
    n = len(first) if isinstance(first, list) else 1
    return [SINGLE_SEQUENCE] if n == 1 else [f"image{k}" for k in range(1, n + 1)]


def dataset_dir(datalist: str | Path | None) -> str | None:
    """The folder of the datalist (MONAI's ``dataset_dir`` workflow property), ``None`` without one."""
    return os.path.dirname(os.path.abspath(datalist)) if datalist not in (None, "") else None


def _unnamed(sequences: tuple[str, ...]) -> bool:
    return sequences == tuple(f"image{k}" for k in range(1, len(sequences) + 1)) or sequences == (SINGLE_SEQUENCE,)


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


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...], dict[str, Any], tuple[str, ...] | None]:
    """``(rows, classes, meta, declared sequence names or None)``."""
    if not path.is_file():
        raise InputError(path, "datalist not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [dict(r) for r in reader]
        if "image" in columns:
            return rows, DEFAULT_CLASSES, {}, None
        sequences = tuple(c for c in columns if c not in ("id", "label", "class"))
        if not sequences:
            raise InputError(path, f"CSV datalist needs an 'image' column or one column per sequence (columns: {columns})")
        return rows, DEFAULT_CLASSES, {}, sequences
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
    declared = data.get("sequences")
    if declared is not None:
        if (not isinstance(declared, list) or not declared
                or not all(isinstance(n, str) and n.strip() for n in declared)):
            raise InputError(path, f"'sequences' must be a list of sequence names, got {declared!r}")
        if len({n.lower() for n in declared}) != len(declared):
            raise InputError(path, f"duplicate names in 'sequences': {declared}")
        if {n.lower() for n in declared} & {"id", "label", "class", "image"}:
            raise InputError(path, f"'sequences' {declared}: 'id', 'label', 'class' and 'image' are reserved keys")
        declared = tuple(declared)
    meta = {k: v for k, v in data.items() if k not in ("training", "cases", "classes", "sequences")}
    return rows, classes, meta, declared


def _row_images(row: dict[str, Any], declared: tuple[str, ...] | None, where: str) -> tuple[list[str], str | None]:
    """The case's sequence files as written (relative or absolute), or why they cannot be read."""
    image = row.get("image")
    if isinstance(image, list):
        if not image or not all(isinstance(v, str) and v.strip() for v in image):
            return [], f"{where}: 'image' must be a file name or a non-empty list of file names"
        if declared is not None and len(image) != len(declared):
            return [], (f"{where}: {len(image)} images but the datalist's 'sequences' names {len(declared)} "
                        f"({list(declared)})")
        return [str(v) for v in image], None
    if image not in (None, ""):
        if declared is not None and len(declared) > 1:
            return [], (f"{where}: one image but the datalist has the sequences {list(declared)}: give a list or "
                        "a key per sequence")
        return [str(image)], None
    if declared is None:
        return [], f"{where}: no 'image'"
    missing = [n for n in declared if row.get(n) in (None, "")]
    if missing:
        return [], f"{where}: no {', '.join(repr(n) for n in missing)} sequence (the datalist's sequences: {list(declared)})"
    return [str(row[n]) for n in declared], None


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
    rows, classes, meta, declared = _read_rows(path)
    root = path.parent
    errors: list[InputError] = []
    cases: list[Case] = []
    seen: Counter[str] = Counter()
    first: tuple[str, int] | None = None  # the first readable case and its number of sequences
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            errors.append(InputError(path, f"entry {n}: expected an object, got {type(row).__name__}"))
            continue
        images, problem = _row_images(row, declared, "")
        cid = str(row.get("id") or (Path(images[0]).name.split(".")[0] if images else f"#{n}"))
        where = f"case {cid!r}"
        seen[cid] += 1
        if any(sep in cid for sep in ("/", "\\")) or cid in (".", ".."):
            errors.append(InputError(path, f"{where}: an id names the case's output folder, so it cannot "
                                           "contain '/' or '\\' or be '.' or '..'"))
            continue
        if problem:
            errors.append(InputError(path, f"{where}{problem}"))
            continue
        if first is None:
            first = (cid, len(images))
        elif len(images) != first[1]:
            errors.append(InputError(path, f"{where}: {len(images)} sequence(s), but case {first[0]!r} has {first[1]}: "
                                           "every case needs the same sequences in the same order"))
            continue
        names = declared or ((SINGLE_SEQUENCE,) if len(images) == 1 else
                             tuple(f"image{k}" for k in range(1, len(images) + 1)))
        img_paths = tuple(_absolute(root / v) for v in images)
        lbl = row.get("label")
        lbl_path = _absolute(root / str(lbl)) if lbl not in (None, "") else None
        cls, err = _parse_class(row.get("class"), classes, where, path)
        if err:
            errors.append(err)
        if check_files and not check_contents:
            kinds = [("image" if len(img_paths) == 1 else f"sequence {name!r}", f)
                     for name, f in zip(names, img_paths, strict=True)]
            for kind, file in (*kinds, ("mask", lbl_path)):
                problem = None if file is None else _entry_problem(file)
                if problem:
                    text = f"{kind} file not found" if problem == "file not found" else f"{kind}: {problem}"
                    errors.append(InputError(file, f"{where}: {text}"))
        keys = {"id", "image", "label", "class", *(declared or ())}
        extra = {k: v for k, v in row.items() if k not in keys}
        cases.append(Case(cid, img_paths[0], lbl_path, cls, extra, img_paths if len(img_paths) > 1 else ()))
    for cid, k in seen.items():
        if k > 1:
            errors.append(InputError(path, f"duplicate id {cid!r} ({k} entries)"))
    if not rows:
        errors.append(InputError(path, "datalist has no cases"))
    sequences = declared or ((SINGLE_SEQUENCE,) if first is None or first[1] == 1 else
                             tuple(f"image{k}" for k in range(1, first[1] + 1)))
    if check_contents:
        errors += content_errors(cases, check_cache, sequences)
    if errors:
        raise InputErrors(errors, header=f"datalist {path}")
    return Datalist(path, classes, tuple(cases), meta, sequences)


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
    errors = content_errors(dl.cases, check_cache, dl.sequences)
    if errors:
        raise InputErrors(errors, header=f"datalist {dl.path}")


def to_monai_dicts(cases: list[Case] | tuple[Case, ...]) -> list[dict[str, Any]]:
    """MONAI dataset items: ``image``/``label`` paths, ``class`` (-1 when missing), ``has_label``.

    ``image`` is one path, or a list of paths for several sequences (``LoadImaged`` stacks them as
    channels in that order).

    Cases without a mask have no ``label`` key: :class:`pipeline.data.missing_labels.FillMissingMaskd`
    adds an all-zero mask after loading (so a batch collates), and ``has_label = 0`` removes it
    from the loss and the metrics.
    """
    out = []
    for c in cases:
        item = {
            "id": c.id,
            "image": str(c.image) if len(c.paths) == 1 else [str(p) for p in c.paths],
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
