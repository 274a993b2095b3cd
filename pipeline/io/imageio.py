"""Reading and checking volumes (NIfTI, or a DICOM series folder) with SimpleITK.

Every reader here raises :class:`~pipeline.io.errors.InputError` naming the file and the
problem (missing, unreadable/corrupt, not 3-D, NaN/inf voxels, bad mask values, mask grid
different from its image) instead of a library traceback.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError, machine_fault
from pipeline.io.filecheck import NIFTI_SUFFIXES, check_image_path, sitk_reason

__all__ = [
    "read_volume",
    "read_mask",
    "check_volume_array",
    "check_mask_array",
    "check_same_grid",
    "write_image_atomic",
    "nifti_voxels",
    "atomic_write",
    "write_text_atomic",
    "remove_stale_temporaries",
    "is_dicom_dir",
    "series_description",
    "write_checksum",
    "checksum_matches",
]

def is_dicom_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding at least one DICOM series."""
    p = Path(path)
    return p.is_dir() and bool(_series_ids(p))


def series_description(folder: str | Path) -> str:
    """The Series Description (0008,103E) of a DICOM series folder's first file, or ``""``."""
    ids = _series_ids(Path(folder))
    if not ids:
        return ""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    if not files:
        return ""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


_WARNINGS_LOCK = threading.Lock()  # the warning switch is process-wide; folders are checked in threads


def _series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series ids in ``folder``, without ITK's "No Series were found" warning."""
    with _WARNINGS_LOCK:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_any(path: str | Path, pixel_type: int) -> sitk.Image:
    """Read a file or a DICOM series folder after :func:`~pipeline.io.filecheck.check_image_path`."""
    p = Path(path)
    check_image_path(p)
    try:
        if p.is_dir():
            ids = _series_ids(p)
            if not ids:
                raise InputError(p, "folder holds no DICOM series")
            if len(ids) > 1:
                raise InputError(p, f"folder holds {len(ids)} DICOM series; expected one per case")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.SetOutputPixelType(pixel_type)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(p), pixel_type)
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports corrupt / unknown files as RuntimeError
        raise InputError(p, f"cannot be read as an image: {sitk_reason(exc)}") from None
    _check_geometry(img, p)
    return img


def _check_geometry(img: sitk.Image, path: str | Path) -> None:
    """Spacing > 0 and an invertible direction (a DICOM series' geometry is only known once read)."""
    spacing = np.array(img.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(path, f"degenerate geometry: voxel spacing {tuple(spacing.round(4))}; every spacing must "
                               "be positive")
    n = img.GetDimension()
    if abs(np.linalg.det(np.array(img.GetDirection()).reshape(n, n))) < 1e-6:
        raise InputError(path, "degenerate geometry: the direction cosines are not invertible (determinant 0)")


def _squeeze_to_3d(img: sitk.Image, path: str | Path) -> sitk.Image:
    """Accept 4-D images with a single volume (common in NIfTI); reject 2-D or multi-volume."""
    dim = img.GetDimension()
    if dim == 3:
        if min(img.GetSize()) < 2:
            raise InputError(path, f"volume is effectively 2-D (size {img.GetSize()}); a 3-D volume is required")
        return img
    if dim == 4 and img.GetSize()[3] == 1:
        size = list(img.GetSize())
        size[3] = 0
        return _squeeze_to_3d(sitk.Extract(img, size, [0, 0, 0, 0]), path)
    raise InputError(path, f"expected a 3-D volume, got {dim}-D image of size {img.GetSize()}")


def check_volume_array(arr: np.ndarray, path: str | Path) -> None:
    """Raise when an image array has NaN/inf voxels or is constant (empty)."""
    if not np.all(np.isfinite(arr)):
        n = int((~np.isfinite(arr)).sum())
        raise InputError(path, f"{n} voxel(s) are NaN or infinite")
    if arr.size == 0 or float(arr.max()) == float(arr.min()):
        raise InputError(path, "image is constant (empty): nothing to segment")


def check_mask_array(arr: np.ndarray, path: str | Path) -> None:
    """Raise when a mask has negative, non-integer or non-finite values (labels > 0 are tumour)."""
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "mask has NaN or infinite voxels")
    if arr.min() < 0:
        raise InputError(path, f"mask has negative values (min {arr.min()}); labels must be >= 0")
    if not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputError(path, "mask has non-integer values; expected integer labels (any label > 0 is tumour)")


def check_same_grid(image: sitk.Image, mask: sitk.Image, image_path: str | Path, mask_path: str | Path,
                    tol: float = 1e-3, what: str = "mask") -> None:
    """Raise when a mask (or another sequence: ``what``) does not lie on its image's voxel grid
    (size, spacing, origin, direction)."""
    if image.GetSize() != mask.GetSize():
        raise InputError(mask_path, f"{what} shape {mask.GetSize()} differs from image shape {image.GetSize()} ({image_path})")
    for name, a, b in (
        ("spacing", image.GetSpacing(), mask.GetSpacing()),
        ("origin", image.GetOrigin(), mask.GetOrigin()),
        ("direction", image.GetDirection(), mask.GetDirection()),
    ):
        if not np.allclose(a, b, atol=tol * max(1.0, float(np.max(np.abs(a))))):
            raise InputError(mask_path, f"{what} {name} {tuple(round(x, 4) for x in b)} differs from image {name} "
                                        f"{tuple(round(x, 4) for x in a)} ({image_path})")


def read_volume(path: str | Path, check: bool = True) -> sitk.Image:
    """Read a 3-D image (NIfTI file or DICOM series folder) as float32 and validate it.

    Args:
        path: ``.nii``/``.nii.gz`` file (any format SimpleITK reads) or a DICOM series folder.
        check: also reject NaN/inf voxels and constant images.

    Returns:
        The ``sitk.Image`` (float32, 3-D, geometry as in the file).

    Raises:
        InputError: missing, corrupt, not 3-D, NaN voxels or constant image.
    """
    img = _squeeze_to_3d(_read_any(path, sitk.sitkFloat32), path)
    if check:
        _check_nifti_finite(path)
        check_volume_array(sitk.GetArrayViewFromImage(img), path)
    return img


def nifti_voxels(path: str | Path) -> np.ndarray:
    """A NIfTI file's voxels as nibabel reads them (scaled by the header's slope), with NaN kept.

    Raises:
        InputError: truncated or corrupt file.
    """
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:  # SimpleITK may read a truncated .gz silently
        raise InputError(path, f"cannot be read as an image (truncated or corrupt file): {exc}") from None


def _check_nifti_finite(path: str | Path) -> None:
    """SimpleITK's NIfTI reader silently turns NaN voxels into 0, so a NaN-corrupted file would
    pass unnoticed; read the raw voxels with nibabel to catch them."""
    p = Path(path)
    if not p.is_file() or not p.name.lower().endswith(NIFTI_SUFFIXES):
        return
    data = nifti_voxels(p)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(p, f"{n} voxel(s) are NaN or infinite")


def read_mask(path: str | Path, reference: sitk.Image | None = None, reference_path: str | Path | None = None) -> sitk.Image:
    """Read a tumour mask, validate its values and (optionally) its grid; return a binary uint8 image.

    Any label > 0 is tumour, so BraTS-style multi-label masks are accepted.

    Raises:
        InputError: missing/corrupt file, not 3-D, negative/non-integer/NaN values, grid mismatch.
    """
    img = _squeeze_to_3d(_read_any(path, sitk.sitkFloat32), path)
    _check_nifti_finite(path)  # SimpleITK reads NaN mask voxels as 0
    arr = sitk.GetArrayViewFromImage(img)
    check_mask_array(arr, path)
    if reference is not None:
        check_same_grid(reference, img, reference_path or "image", path)
    out = sitk.GetImageFromArray((arr > 0).astype(np.uint8))
    out.CopyInformation(img)
    return out


def atomic_write(path: str | Path, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A reader never sees a half-written file and an interrupted write leaves no partial output
    (the temporary file is removed). The result is readable like any written file (0644).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
    except OSError as exc:
        raise machine_fault(exc, p) or exc from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, p)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        fault = machine_fault(exc, p) if isinstance(exc, Exception) else None
        if fault is not None:  # a full disk or a read-only folder: one line naming the file
            raise fault from exc
        raise
    return p


def remove_stale_temporaries(folder: str | Path, names: list[str] | tuple[str, ...]) -> int:
    """Delete the temporary files :func:`atomic_write` leaves for ``names`` in ``folder`` when its
    process is killed mid-write (``.<name>.<random><suffix>``); returns how many were removed.

    Only for a folder that one process writes at a time (an inference run's output folder).
    """
    removed = 0
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def write_image_atomic(img: sitk.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` atomically (see :func:`atomic_write`), compressed."""
    p = Path(path)
    suffix = ".nii.gz" if p.name.endswith(".nii.gz") else p.suffix

    def write(tmp: str) -> None:
        sitk.WriteImage(img, tmp, useCompression=True)
        if suffix.endswith(".gz"):
            _check_gzip_written(tmp)

    return atomic_write(p, write, suffix)


def _check_gzip_written(path: str) -> None:
    """ITK's compressed writers ignore a failed write (a full disk): read the stream back whole, else
    raise the ``OSError`` the writer should have raised (``ENOSPC`` when the disk is nearly full)."""
    import errno
    import gzip
    import shutil

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < (1 << 20)
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (the written file is incomplete: {exc})", path) from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text atomically (see :func:`atomic_write`) as UTF-8; a file name that is not valid
    UTF-8 (a surrogate-escaped byte) is written as a ``\\udcXX`` escape instead of failing."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="backslashreplace"))


def write_checksum(path: str | Path) -> Path:
    """Write ``<path>.sha256`` (the file's SHA-256), atomically: the cache's proof of a whole entry."""
    from pipeline.io.filecheck import file_sha256

    return write_text_atomic(f"{path}.sha256", file_sha256(path) + "\n")


def checksum_matches(path: str | Path) -> bool | None:
    """Whether ``path``'s bytes match its ``.sha256`` (:func:`write_checksum`); ``None`` when either
    is missing (an entry written before checksums existed, or never)."""
    from pipeline.io.filecheck import file_sha256

    p, side = Path(path), Path(f"{path}.sha256")
    if not (p.is_file() and side.is_file()):
        return None
    try:
        return side.read_text(encoding="utf-8").strip() == file_sha256(p)
    except (OSError, UnicodeDecodeError):
        return False
