"""Opening every image and mask of a datalist before training, fast enough to run on every start.

The checks are those of :func:`pipeline.io.imageio.read_volume` / :func:`~pipeline.io.imageio.read_mask`
(:mod:`pipeline.io.filecheck` first, then voxels and grids), done so that a 40-case 1 mm cohort does not
cost half a minute at every start:

- one read of the voxels per NIfTI file (nibabel; the grid comes from SimpleITK's header read), where
  ``read_volume`` reads them twice (SimpleITK for the image, nibabel for the NaNs SimpleITK hides);
  DICOM series and other formats go through ``read_volume`` / ``read_mask`` unchanged;
- cases checked in parallel threads (decompression and reading release the GIL);
- a case that passed is remembered under the SHA-256 of its files' bytes (``cache_dir/<digest>``,
  a file holding ``passed <digest>``, written atomically), so an unchanged case is not opened again;
  hashing reads the compressed bytes only (about 0.03 s for a 30 MB file). A changed byte is a new
  digest; failures are never cached; an entry whose content is not exactly that line (cut short,
  changed) is reported in one warning and the case is checked again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.errors import InputError
from pipeline.io.imageio import write_text_atomic

__all__ = ["CHECKS_VERSION", "check_volume_file", "check_mask_file", "case_errors", "content_errors"]

logger = logging.getLogger(__name__)

#: Part of every cache key: bump it when a check is added, so earlier passes are not trusted.
CHECKS_VERSION = "2026-12-06.1"


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid (the ``sitk.Image`` geometry getters, for ``check_same_grid``)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802 - SimpleITK's names
        return self.size

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
        return self.spacing

    def GetOrigin(self) -> tuple[float, ...]:  # noqa: N802
        return self.origin

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        return self.direction

    @classmethod
    def of(cls, img: Any) -> Grid:
        return cls(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))


def _header_grid(reader: Any, path: Path) -> Grid:
    """The 3-D grid from SimpleITK's header read (:func:`pipeline.io.filecheck.check_image_information`);
    a 4-D file holding one volume: its first 3 axes."""
    n = len(reader.GetSize())
    direction = np.array(reader.GetDirection()).reshape(n, n)[:3, :3]
    # a negative pixdim is a flip: ReadImageInformation reports it signed, ReadImage folds it into the direction
    spacing = tuple(abs(float(v)) for v in reader.GetSpacing()[:3])
    grid = Grid(tuple(reader.GetSize())[:3], spacing, tuple(reader.GetOrigin())[:3], tuple(direction.ravel().tolist()))
    if np.any(np.array(grid.spacing) <= 0) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(path, f"degenerate geometry: spacing {grid.spacing}, direction determinant "
                               f"{np.linalg.det(direction):.3g}")
    return grid


def _is_nifti_file(path: Path) -> bool:
    from pipeline.io.filecheck import is_nifti_name

    return path.is_file() and is_nifti_name(path)


def check_volume_file(path: str | Path) -> Grid:
    """Every check of ``read_volume(path)``, reading a NIfTI's voxels once; returns its grid.

    Raises:
        InputError: see :func:`pipeline.io.imageio.read_volume`.
    """
    from pipeline.io.filecheck import check_image_path
    from pipeline.io.imageio import check_volume_array, nifti_voxels, read_volume

    p = Path(path)
    reader = check_image_path(p)
    if not _is_nifti_file(p):
        return Grid.of(read_volume(p))
    grid = _header_grid(reader, p)
    check_volume_array(nifti_voxels(p), p)
    return grid


def check_mask_file(path: str | Path, reference: Grid | None = None, reference_path: str | Path | None = None) -> None:
    """Every check of ``read_mask(path, reference)``, reading a NIfTI's voxels once.

    Raises:
        InputError: see :func:`pipeline.io.imageio.read_mask`.
    """
    from pipeline.io.filecheck import check_image_path
    from pipeline.io.imageio import check_mask_array, check_same_grid, nifti_voxels, read_mask

    p = Path(path)
    reader = check_image_path(p)
    if not _is_nifti_file(p):
        grid = Grid.of(read_mask(p))
    else:
        grid = _header_grid(reader, p)
        check_mask_array(nifti_voxels(p), p)
    if reference is not None:
        check_same_grid(reference, grid, reference_path or "image", p)


def case_errors(case: Any, sequences: tuple[str, ...] | None = None) -> list[InputError]:
    """The problems of one datalist case's images and mask (all reported, even when an image is bad).

    Several sequences (``case.paths``) must share one grid, the first one's: the registration found
    on the reference sequence moves them all, and the mask is drawn on that grid.

    An unexpected library error is that file's problem too (type and first line), so one odd file
    never hides the other cases' reports behind a traceback.
    """
    from pipeline.io.imageio import check_same_grid

    errors: list[InputError] = []
    paths = tuple(getattr(case, "paths", None) or (case.image,))
    names = sequences if sequences and len(sequences) == len(paths) else tuple(f"image{k}" for k in range(1, len(paths) + 1))
    grids: list[Grid | None] = []
    for name, path in zip(names, paths, strict=True):
        what = "" if len(paths) == 1 else f"sequence {name!r}: "
        try:
            grids.append(check_volume_file(path))
        except InputError as exc:
            grids.append(None)
            errors.append(InputError(exc.path, f"case {case.id!r}: {what}{exc.problem}"))
        except Exception as exc:  # noqa: BLE001 - reported per file, see the docstring
            grids.append(None)
            errors.append(InputError(path, f"case {case.id!r}: {what}cannot be read ({_first_line(exc)})"))
    grid = grids[0]
    for name, path, other in zip(names[1:], paths[1:], grids[1:], strict=True):
        if grid is None or other is None:
            continue
        try:
            check_same_grid(grid, other, paths[0], path, what=f"sequence {name!r}")
        except InputError as exc:
            errors.append(InputError(path, f"case {case.id!r}: {exc.problem}: the sequences of a case must share "
                                           "one grid (co-register them onto the first one)"))
    if case.label is not None:
        try:
            check_mask_file(case.label, grid, case.image)
        except InputError as exc:
            what = exc.problem if exc.problem.startswith("mask") else f"mask: {exc.problem}"
            errors.append(InputError(exc.path, f"case {case.id!r}: {what}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(InputError(case.label, f"case {case.id!r}: mask: cannot be read ({_first_line(exc)})"))
    return errors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _digest(case: Any) -> str | None:
    """SHA-256 of the case's files' bytes and the checks' version; ``None`` when a file cannot be hashed."""
    from pipeline.io.filecheck import file_sha256

    h = hashlib.sha256(CHECKS_VERSION.encode())
    for path in (*(getattr(case, "paths", None) or (case.image,)), case.label):
        if path is None:
            h.update(b"-")
            continue
        p = Path(path)
        h.update(p.name.lower().encode())  # the checks depend on the name too (.nii vs .nii.gz)
        if not (p.is_file() or p.is_dir()) or (p.is_file() and not os.access(p, os.R_OK)):
            return None
        try:
            h.update(file_sha256(p).encode())
        except OSError:
            return None
    return h.hexdigest()


def _memo_text(key: str) -> str:
    return f"passed {key}\n"


def _remembered(entry: Path, key: str) -> bool:
    """Whether the memo says this case passed: its entry holds exactly :func:`_memo_text`; an entry
    that does not (cut short, changed) is reported and the case is checked again."""
    try:
        text = entry.read_bytes()
    except FileNotFoundError:
        return False
    if text == _memo_text(key).encode():
        return True
    logger.warning("datalist check memo entry %s is corrupt (content does not match its name): checked again", entry)
    return False


def content_errors(cases: list[Any] | tuple[Any, ...], cache_dir: str | Path | None = None,
                   sequences: tuple[str, ...] | None = None, workers: int | None = None) -> list[InputError]:
    """Every problem of the cases' images and masks, in case order.

    Args:
        cases: datalist cases (``id``, ``image`` / ``paths``, ``label``).
        cache_dir: where passed cases are remembered by content (``None``: check everything).
        sequences: the sequences' names, for the messages.
        workers: threads (default: the CPU count, at most 8).

    Returns:
        The problems (empty when every case passes).
    """
    cache = Path(cache_dir) if cache_dir else None
    start = time.perf_counter()

    def one(case: Any) -> tuple[list[InputError], bool]:
        key = _digest(case) if cache else None
        if key and _remembered(cache / key, key):  # type: ignore[operator]
            return [], True
        errors = case_errors(case, sequences)
        if key and not errors and _digest(case) == key:  # unchanged while it was checked
            write_text_atomic(cache / key, _memo_text(key))  # type: ignore[operator]
        return errors, False

    n = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        results = list(pool.map(one, cases))
    reused = sum(hit for _, hit in results)
    logger.info("checked %d case(s) in %.1f s (%d unchanged since they last passed)", len(cases),
                time.perf_counter() - start, reused)
    return [e for errors, _ in results for e in errors]
