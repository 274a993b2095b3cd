"""Input and output of the inference bundle: finding the cases, writing outputs like their inputs,
tumour measures, and the run report.

Case discovery (:func:`find_cases`), in one input folder:

* ``*.nii`` / ``*.nii.gz`` files directly in it: one case each, id = file name without the suffix;
* per-case sub-folders (one level): the file (or DICOM series folder) whose name matches the first
  of ``pattern`` (case-insensitive globs such as ``*flair*`` or ``t2f*``) that matches anything;
  id = the sub-folder name. A sub-folder that is itself a DICOM series is one case. A sub-folder
  where nothing matches, or where several files match, is a failed case;
* the input folder itself a DICOM series: one case, id = the folder name;

or a datalist (JSON/CSV, :func:`pipeline.data.datalist.load_datalist`): its ids and images, and
its masks / classes when given (the report then adds native-space Dice and the true class).

A model of several sequences (``sequences``, e.g. ``flair, t1, t1ce, t2``) takes per-case
sub-folders only: each sequence is the one entry (NIfTI file or DICOM series folder) that matches
the first of its patterns that matches anything (:data:`SEQUENCE_PATTERNS`, or ``sequence_patterns``),
a DICOM series folder by its name or its series description. A sub-folder missing a sequence, or
holding two candidates for one, is a failed case naming the sequence; a NIfTI file directly in the
input folder is a failed case (a lone file cannot hold several sequences).

Nothing is skipped silently: every NIfTI-named entry is a case whatever it turns out to be (a link
loop, a dangling link, a FIFO, a corrupt file: its row says why it failed), a link that cannot be
followed is a failed row, and other files are named in the log as ignored. Two inputs with one id
(``a.nii`` and ``a.nii.gz``, or a file and a sub-folder ``a``) are both failed rows, not guessed
between, and the other cases run. Hidden entries (``.name``) are ignored.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.io.filecheck import check_entry, is_nifti_name
from pipeline.io.imageio import (
    atomic_write,
    is_dicom_dir,
    series_description,
    write_image_atomic,
    write_text_atomic,
)

__all__ = [
    "DEFAULT_PATTERNS",
    "SEQUENCE_PATTERNS",
    "sequence_patterns",
    "InputCase",
    "find_cases",
    "case_id",
    "input_fingerprint",
    "write_like_input",
    "tumour_measures",
    "native_boxes",
    "box_mask",
    "largest_component",
    "report_columns",
    "write_report",
    "case_title",
    "log_row",
]

logger = logging.getLogger(__name__)

#: Default file patterns inside per-case sub-folders, tried in order (case-insensitive).
DEFAULT_PATTERNS: tuple[str, ...] = ("*flair*", "*t2f*", "image.nii*")
#: Default patterns per sequence name, tried in order (case-insensitive): the BraTS 2018 names
#: (``*_flair``, ``*_t1``, ``*_t1ce``, ``*_t2``), the BraTS 2023+ names (``*-t2f``, ``*-t1n``,
#: ``*-t1c``, ``*-t2w``), plain file names and common series descriptions. T1 and T2 patterns are
#: anchored so that ``t1`` never takes a ``t1ce`` nor ``t2`` a ``t2f`` / FLAIR file.
SEQUENCE_PATTERNS: dict[str, tuple[str, ...]] = {
    "flair": ("*flair*", "*-t2f.nii*", "*_t2f.nii*", "t2f.nii*", "*t2_fl*", "*t2fl*", "image.nii*"),
    "t1": ("*_t1.nii*", "*-t1n.nii*", "*_t1n.nii*", "t1.nii*", "t1n.nii*", "*t1w*", "*t1_mprage*", "*mprage*"),
    "t1ce": ("*t1ce*", "*-t1c.nii*", "*_t1c.nii*", "t1c.nii*", "*t1gd*", "*t1_gd*", "*t1*post*", "*t1*+c*",
             "*t1*contrast*"),
    "t2": ("*_t2.nii*", "*-t2w.nii*", "*_t2w.nii*", "t2.nii*", "t2w.nii*", "*t2w*", "*t2_tse*", "*t2*tse*"),
}
_RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])
#: Report fields with a list per case (the detection head's ``boxes``): in ``predictions.json`` only.
JSON_ONLY = ("boxes",)


def sequence_patterns(name: str, overrides: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The file patterns of one sequence: ``overrides[name]`` (a glob or a list), else
    :data:`SEQUENCE_PATTERNS`, else ``*<name>*``."""
    for key, value in (overrides or {}).items():
        if str(key).lower() == name.lower():
            return (value,) if isinstance(value, str) else tuple(value)
    return SEQUENCE_PATTERNS.get(name.lower(), (f"*{name.lower()}*",))


@dataclass(frozen=True)
class InputCase:
    """One case to run.

    Attributes:
        id: output folder name and report id.
        path: NIfTI file or DICOM series folder.
        label: optional ground-truth mask on the input's grid (datalist input only).
        true_class: optional true class name (datalist input only).
        problem: set when discovery already knows the case cannot run (reported as failed).
        sequences: every sequence's file in the model's channel order when it takes several
            (``path`` is then the reference sequence: the grid outputs are written on).
    """

    id: str
    path: Path
    label: Path | None = None
    true_class: str | None = None
    problem: str | None = None
    sequences: tuple[Path, ...] = ()

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every input file, in channel order."""
        return self.sequences or (self.path,)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and is_nifti_name(path)


def case_id(path: str | Path) -> str:
    """Id of a file directly in the input folder: its name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a link that cannot be followed (loop, dangling)."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports a loop so
        return None


def _visible(folder: Path, exclude: set[Path]) -> list[Path]:
    """Non-hidden entries of ``folder``, sorted, without following any link (so a link loop or a
    dangling link is listed, never raised or dropped here)."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if not e.name.startswith("."))
    return [folder / n for n in names if _resolved(folder / n) not in exclude]


def _broken(path: Path) -> str | None:
    """Why a link cannot be followed (``check_entry``'s reason), or ``None`` when it can."""
    if not path.is_symlink() or _resolved(path) is not None:
        return None
    try:
        check_entry(path, allow_dir=True)
    except InputError as exc:
        return exc.problem
    return None


def _match(folder: Path, patterns: Sequence[str], descriptions: bool = False) -> list[Path]:
    """Entries of ``folder`` (NIfTI-named entries, whatever they are, or folders) matching the first
    pattern that matches any; with ``descriptions`` a DICOM series folder also matches by its series
    description."""
    entries = [p for p in _visible(folder, set()) if is_nifti_name(p) or p.is_dir() or _broken(p)]
    names = {p: [p.name.lower()] for p in entries}
    if descriptions:
        for p in entries:
            if p.is_dir() and is_dicom_dir(p):
                names[p].append(series_description(p).lower())
    for pat in patterns:
        found = [p for p in entries if any(fnmatch.fnmatch(n, pat.lower()) for n in names[p] if n)]
        if found:
            return found
    return []


def _sequence_case(folder: Path, sequences: Sequence[str], overrides: dict[str, Any] | None,
                   reference: int) -> InputCase:
    """A per-case sub-folder holding one entry per sequence."""
    found: list[Path] = []
    for name in sequences:
        patterns = sequence_patterns(name, overrides)
        try:
            hits = _match(folder, patterns, descriptions=True)
        except OSError as exc:
            return InputCase(folder.name, folder, problem=f"cannot list this folder: {exc.strerror}")
        if not hits:
            return InputCase(folder.name, folder, problem=f"no {name} sequence: nothing in this folder matches "
                                                          f"{list(patterns)} (set sequence_patterns)")
        if len(hits) > 1:
            names = ", ".join(p.name for p in hits[:4])
            return InputCase(folder.name, folder, problem=f"{len(hits)} entries match the {name} patterns ({names}); "
                                                          "give sequence_patterns")
        found.append(hits[0])
    if len(set(found)) < len(found):
        same = [n for n, p in zip(sequences, found, strict=True) if found.count(p) > 1]
        return InputCase(folder.name, folder, problem=f"one file matches the sequences {same}: give sequence_patterns")
    return InputCase(folder.name, found[reference], sequences=tuple(found))


def _sub_folder_case(folder: Path, patterns: Sequence[str]) -> InputCase:
    try:
        found = _match(folder, patterns)
    except OSError as exc:
        return InputCase(folder.name, folder, problem=f"cannot list this folder: {exc.strerror}")
    if len(found) == 1:
        return InputCase(folder.name, found[0])
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        return InputCase(folder.name, folder, problem=f"{len(found)} entries match the file pattern ({names}); "
                                                      "give a more specific --pattern")
    if is_dicom_dir(folder):
        return InputCase(folder.name, folder)
    # listed as a failed case, not skipped: the report names every sub-folder of the input
    return InputCase(folder.name, folder, problem=f"nothing in this folder matches the file pattern {list(patterns)} "
                                                  "and it holds no DICOM series; give --pattern")


def _folder_cases(root: Path, patterns: Sequence[str], exclude: set[Path], sequences: Sequence[str] = (),
                  overrides: dict[str, Any] | None = None, reference: int = 0) -> list[InputCase]:
    """Every entry of ``root`` that could be a case becomes one (or a failed row): NIfTI-named entries
    (whatever they turn out to be), folders, and links that cannot be followed. Other files are
    listed in the log as ignored."""
    try:
        entries = _visible(root, exclude)
    except OSError as exc:
        raise InputError(root, f"cannot list the input folder: {exc.strerror}") from None
    cases, ignored = [], []
    for entry in entries:
        broken = _broken(entry)
        if is_nifti_name(entry) and len(sequences) > 1:
            cases.append(InputCase(case_id(entry), entry, problem=f"the model takes {len(sequences)} sequences "
                                   f"({', '.join(sequences)}): put each case's files in a sub-folder of its own"))
        elif is_nifti_name(entry):
            cases.append(InputCase(case_id(entry), entry))  # reading it gives the reason if it is bad
        elif broken:
            cases.append(InputCase(entry.name, entry, problem=broken))
        elif entry.is_dir() and len(sequences) > 1 and not is_dicom_dir(entry):
            cases.append(_sequence_case(entry, sequences, overrides, reference))
        elif entry.is_dir():
            cases.append(_sub_folder_case(entry, patterns))
        else:
            ignored.append(entry.name)
    if ignored:
        logger.info("ignored %d entr%s of %s that %s neither NIfTI files nor folders: %s", len(ignored),
                    "y" if len(ignored) == 1 else "ies", root, "is" if len(ignored) == 1 else "are",
                    ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    if all(c.problem for c in cases) and is_dicom_dir(root) and len(sequences) <= 1:  # the folder is one series
        return [InputCase(root.name, root)]
    return cases


def _fail_clashing_ids(cases: list[InputCase]) -> list[InputCase]:
    """Cases whose id is shared by another input become failed rows (none of them runs, so no
    output folder is ambiguous); the others are unchanged."""
    counts = Counter(c.id for c in cases)
    out = []
    for c in cases:
        if counts[c.id] > 1:
            others = ", ".join(o.path.name for o in cases if o.id == c.id and o is not c)
            c = InputCase(c.id, c.path, c.label, c.true_class, sequences=c.sequences,
                          problem=f"case id {c.id!r} is also given by {others} (one output folder per id): rename "
                                  "all but one of them; none of them is run")
        out.append(c)
    return out


def find_cases(input_dir: str | Path | None = None, datalist: str | Path | None = None,
               pattern: str | Sequence[str] = DEFAULT_PATTERNS, exclude: Sequence[str | Path | None] = (),
               sequences: Sequence[str] | None = None, sequence_patterns: dict[str, Any] | None = None,
               reference_sequence: str | int | None = None, required: bool = True) -> list[InputCase]:
    """The cases of an input folder or a datalist (rules in the module docstring), sorted by id.

    Args:
        input_dir: folder of NIfTI files, per-case sub-folders or DICOM series.
        datalist: JSON/CSV datalist instead of a folder.
        pattern: glob or list of globs for the file inside a per-case sub-folder.
        exclude: folders never taken as cases (the output folder when it lies inside the input).
        sequences: the sequences the model takes, in channel order (several: per-case sub-folders,
            one entry per sequence); ``None`` or one: ``pattern`` finds the one image.
        sequence_patterns: ``{name: glob or [globs]}`` replacing :data:`SEQUENCE_PATTERNS` for a name.
        reference_sequence: the sequence the registration runs on and outputs are written like.
        required: ``False`` answers ``[]`` when neither source is given (the bundle's ``dataset``
            property, which the model zoo's checks parse before any input is named).

    Raises:
        InputError: neither or both sources given, missing or unlistable folder, no case found.
        Inputs that cannot run (a link loop, a dangling link, an unlistable sub-folder, several
        inputs with one id) are cases with a ``problem``: failed rows of the report.
    """
    if not required and input_dir in (None, "") and datalist in (None, ""):
        return []
    if (input_dir in (None, "")) == (datalist in (None, "")):
        raise InputError(None, "give either --input_dir DIR (a folder of NIfTI files, per-case sub-folders or DICOM "
                               "series) or --datalist FILE")
    if datalist not in (None, ""):
        from pipeline.data.datalist import load_datalist, reference_index

        dl = load_datalist(datalist, check_files=False).select(sequences)  # a missing file fails its own case only
        ref = reference_index(dl.sequences, reference_sequence) if len(dl.sequences) > 1 else 0
        return [InputCase(c.id, c.paths[ref], c.label, None if c.cls is None else dl.classes[c.cls],
                          sequences=c.images) for c in dl.cases]
    root = Path(input_dir)
    if not root.is_dir():
        if os.path.lexists(root):
            broken = _broken(root)  # a link loop, a dangling link: its reason
            raise InputError(root, broken or "is not a folder: give the folder that holds the scans (--input_dir)")
        raise InputError(root, "input folder not found")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    skip = {Path(p).resolve() for p in exclude if p not in (None, "")}
    if root.resolve() in skip:
        raise InputError(root, "the output folder must differ from the input folder (inputs are never modified)")
    names = list(sequences or [])
    ref = 0
    if len(names) > 1:
        from pipeline.data.datalist import reference_index

        ref = reference_index(names, reference_sequence)
    cases = _folder_cases(root, patterns, skip, names, sequence_patterns, ref)
    if not cases:
        raise InputError(root, f"no input volumes found: expected *.nii / *.nii.gz files, per-case sub-folders "
                               f"holding a file matching {patterns}, or DICOM series folders")
    return sorted(_fail_clashing_ids(cases), key=lambda c: (c.id, c.path.name))


def input_fingerprint(path: str | Path) -> str:
    """Cheap identity of an input (size and modification time of its file(s)), to tell whether the
    outputs of an earlier run still belong to it."""
    p = Path(path)
    try:
        if not p.exists():
            return "missing"
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError as exc:  # a file vanished while listed, a folder that cannot be read
        return f"unreadable:{exc.errno}"
    return f"{len(stats)}:{sum(s[1] for s in stats)}:{max((s[2] for s in stats), default=0)}"


# ----------------------------------------------------------------------------- writing outputs


def write_like_input(image: sitk.Image, reference: str | Path, path: str | Path, dtype: type = np.uint8) -> Path:
    """Write ``image`` (on the input's grid) atomically so it overlays its input in any viewer.

    A NIfTI input's header is reused (nibabel): same shape, same qform/sform and codes, so the
    output's affine equals the input's exactly. A DICOM input is written as NIfTI in the series'
    geometry (SimpleITK).

    Args:
        image: SimpleITK image on the reference's voxel grid.
        reference: the input file (or DICOM folder) the image belongs to.
        path: ``.nii.gz`` output path.
        dtype: voxel type written (uint8 masks, float32 probabilities).
    """
    ref = Path(reference)
    if not _is_nifti(ref):
        return write_image_atomic(sitk.Cast(image, _SITK_TYPES[np.dtype(dtype)]), path)
    import nibabel as nib

    src = nib.load(str(ref))
    data = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(dtype)
    if data.size == int(np.prod(src.shape)):
        data = data.reshape(src.shape)  # e.g. a 4-D input holding one volume
    out = nib.Nifti1Image(data, src.affine)
    out.header.set_qform(src.header.get_qform(), code=int(src.header["qform_code"]))
    out.header.set_sform(src.header.get_sform(), code=int(src.header["sform_code"]))
    out.header.set_xyzt_units(*src.header.get_xyzt_units())
    return _save_nifti_atomic(out, Path(path))


_SITK_TYPES = {np.dtype(np.uint8): sitk.sitkUInt8, np.dtype(np.float32): sitk.sitkFloat32}


def _save_nifti_atomic(img: Any, path: Path) -> Path:
    import nibabel as nib

    return atomic_write(path, lambda tmp: nib.save(img, tmp), ".nii.gz")


# ----------------------------------------------------------------------------- measures


def _triple(values: Sequence[float], digits: int | None = None) -> str:
    return " ".join(str(int(v)) if digits is None else f"{v:.{digits}f}" for v in values)


def tumour_measures(seg: sitk.Image) -> dict[str, Any]:
    """Volume and bounding box of a native-space mask.

    Returns:
        ``volume_ml`` (voxel count x native voxel volume), ``bbox_voxel_min`` / ``bbox_voxel_max``
        (inclusive voxel indices ``i j k``, the NIfTI / nibabel array order) and ``bbox_ras_min_mm`` /
        ``bbox_ras_max_mm`` (extent of the tumour voxel centres in scanner RAS mm, the NIfTI
        world convention); the boxes are empty strings when no voxel is tumour.
    """
    arr = sitk.GetArrayViewFromImage(seg) > 0
    volume = float(arr.sum()) * float(np.prod(seg.GetSpacing())) / 1000.0
    out: dict[str, Any] = {"volume_ml": round(volume, 3), "bbox_voxel_min": "", "bbox_voxel_max": "",
                           "bbox_ras_min_mm": "", "bbox_ras_max_mm": ""}
    if not arr.any():
        return out
    ijk = np.argwhere(arr)[:, ::-1].astype(float)  # (z, y, x) -> (i, j, k)
    direction = np.array(seg.GetDirection()).reshape(3, 3)
    lps = (direction @ (ijk * np.array(seg.GetSpacing())).T).T + np.array(seg.GetOrigin())
    ras = lps * _RAS_FROM_LPS
    out.update({"bbox_voxel_min": _triple(ijk.min(0)), "bbox_voxel_max": _triple(ijk.max(0)),
                "bbox_ras_min_mm": _triple(ras.min(0), 1), "bbox_ras_max_mm": _triple(ras.max(0), 1)})
    return out


def native_boxes(boxes: Any, scores: Any, atlas: sitk.Image, transform: sitk.Transform, native: sitk.Image
                 ) -> list[dict[str, Any]]:
    """The detection head's boxes, found on the atlas grid, in the scan's own space.

    Each atlas box ``[x0, y0, z0, x1, y1, z1]`` (voxel indices, upper corner exclusive) spans the
    voxels' edges from ``x0 - 0.5`` to ``x1 - 0.5``; its eight corners go through ``transform``
    (atlas -> native, the registration's) and the native box is their extent: rotated or
    sheared, an atlas box becomes a larger native box that still holds it.

    Returns:
        One dict per box, best first: ``score``, ``voxel_min`` / ``voxel_max`` (inclusive native
        voxel indices ``i j k``, clipped to the scan, as ``bbox_voxel_*``) and ``ras_min_mm`` /
        ``ras_max_mm`` (the corners' extent in scanner RAS mm).
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, 6)
    out = []
    size = np.asarray(native.GetSize()) - 1
    for box, score in zip(b, np.asarray(scores, dtype=float).reshape(-1), strict=True):
        lo, hi = box[:3] - 0.5, box[3:] - 0.5
        corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        lps = np.array([transform.TransformPoint(atlas.TransformContinuousIndexToPhysicalPoint(c)) for c in corners])
        ijk = np.array([native.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in lps])
        vmin = np.clip(np.ceil(ijk.min(0) - 1e-6), 0, size)  # voxels whose centre lies inside
        vmax = np.clip(np.floor(ijk.max(0) + 1e-6), 0, size)
        ras = lps * _RAS_FROM_LPS
        out.append({"score": round(float(score), 4), "voxel_min": _triple(vmin), "voxel_max": _triple(vmax),
                    "ras_min_mm": _triple(ras.min(0), 1), "ras_max_mm": _triple(ras.max(0), 1)})
    return out


def box_mask(native: sitk.Image, boxes: Sequence[dict[str, Any]]) -> sitk.Image:
    """A mask on ``native``'s grid with the voxels of every box of :func:`native_boxes` (for the QC picture)."""
    arr = np.zeros(native.GetSize()[::-1], np.uint8)
    for box in boxes:
        lo = [int(v) for v in box["voxel_min"].split()]
        hi = [int(v) for v in box["voxel_max"].split()]
        arr[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = 1
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(native)
    return mask


def largest_component(seg: sitk.Image) -> sitk.Image:
    """The largest connected component (26-connectivity) of a mask; an empty mask stays empty."""
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(seg > 0, True), sortByObjectSize=True)
    return sitk.Cast(labels == 1, sitk.sitkUInt8)


# ----------------------------------------------------------------------------- report

_TIMES = ("seconds_registration", "seconds_network", "seconds_writing", "seconds_total")


def report_columns(class_names: Sequence[str], rows: Sequence[dict[str, Any]] = ()) -> list[str]:
    """CSV columns: id, input, status, ``p_<class>`` each, predicted class, volume, boxes, times,
    ``reused`` (finished by an earlier run), then any extra columns (``dice``, ``true_class``,
    ``lesions_detected``) but the list-valued ones (:data:`JSON_ONLY`)."""
    cols = ["id", "input", "status", *[f"p_{n}" for n in class_names], "predicted_class", "volume_ml",
            "bbox_voxel_min", "bbox_voxel_max", "bbox_ras_min_mm", "bbox_ras_max_mm", *_TIMES, "reused"]
    for row in rows:
        cols += [k for k in row if k not in cols and not k.startswith("_") and k not in JSON_ONLY]
    return cols


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_report(rows: Sequence[dict[str, Any]], output_dir: str | Path, class_names: Sequence[str],
                 summary: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``predictions.json`` (atomically) in ``output_dir``.

    Returns:
        The two paths.
    """
    out = Path(output_dir)
    cols = report_columns(class_names, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{k: _clean(r.get(k)) for k in cols} for r in rows])
    csv_path = write_text_atomic(out / "predictions.csv", buf.getvalue())
    doc = {"summary": summary or {}, "class_names": list(class_names),
           "cases": [{k: _clean(v) for k, v in r.items() if not k.startswith("_")} for r in rows]}
    json_path = write_text_atomic(out / "predictions.json", json.dumps(doc, indent=1))
    return csv_path, json_path


def printable(text: str) -> str:
    """``text`` with each surrogate-escaped byte (from a file name that is not UTF-8) written as a
    ``\\udcXX`` escape, so that a UTF-8 terminal, log file or picture title can show it (the raw
    surrogate makes the stream's encoder raise)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def case_title(row: dict[str, Any]) -> str:
    """One-line result of a case (QC picture title, progress line): id, class, probability, volume."""
    cls = row.get("predicted_class")
    p = row.get(f"p_{cls}") if cls else None
    what = f"{cls} (p {p:.2f})" if cls else "segmentation only"
    tumour = f"tumour {row['volume_ml']:.1f} mL" if row.get("volume_ml") else "no tumour found"
    return f"{printable(row['id'])}: {what}, {tumour}"


def log_row(row: dict[str, Any], n: int, total: int) -> None:
    """Progress line of case ``n`` of ``total`` (logger ``pipeline.inference.cases``)."""
    head = f"[{n}/{total}] {printable(row['id'])}:"
    if row["status"] != "ok":
        logger.error("%s %s", head, row["status"])
    elif row.get("reused"):
        logger.info("%s finished by an earlier run, skipped", head)
    else:
        logger.info("%s ok, %s; registration %.1f s, network %.1f s, writing %.1f s", head,
                    case_title(row).split(": ", 1)[1], row["seconds_registration"], row["seconds_network"],
                    row["seconds_writing"])
