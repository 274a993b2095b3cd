"""Checks a path before any image library reads it, so every bad input gets its true reason.

One function, :func:`check_image_path`, is shared by ``pipeline validate``, training (the
datalist check of :func:`pipeline.data.cohort.load_cohort`) and inference (through
:func:`pipeline.io.imageio.read_volume` / :func:`~pipeline.io.imageio.read_mask`). In order:

1. the file system (:func:`check_entry`): symbolic-link loops, dangling links, FIFOs / sockets /
   devices (reading a FIFO would block for ever), permissions, empty files;
2. for NIfTI files, the header read by nibabel (:func:`check_nifti_header`): not a NIfTI at all,
   non-scalar voxels (RGB, complex, vector intent), the number of dimensions, a header that
   declares more voxel bytes than the file can hold, and degenerate or ambiguous geometry (zero or
   parallel voxel axes, NaN in the affine, qform and sform that disagree);
3. for any file SimpleITK reads, its image information (:func:`check_image_information`): the
   same dimension / component checks for formats nibabel does not read (``.mha``, ``.nrrd``).

Why by hand: SimpleITK reports most of these as "Unable to determine ImageIO reader" or "does
not exist" (a loop, a dangling link and an unreadable file all look like a missing file to it),
reads RGB voxels as their mean, substitutes a spacing of 1 for a zero one, and picks the qform
where nibabel and most viewers pick the sform; nibabel knows the header but not the other formats.
Each check raises :class:`~pipeline.io.errors.InputError` naming the file and the reason.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.errors import InputError

__all__ = ["file_sha256", "check_entry", "check_nifti_header", "check_image_information", "check_image_path", "is_nifti_name",
           "sitk_reason"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Deflate cannot compress better than about 1032:1, so a .nii.gz of N bytes holds at most this many times N.
_MAX_DEFLATE_RATIO = 1032
#: Two voxel-to-world maps that place a voxel corner further apart than this (mm) disagree.
_GEOMETRY_TOLERANCE_MM = 0.1
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def is_nifti_name(path: str | Path) -> bool:
    """True when the name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def check_entry(path: str | Path, allow_dir: bool = False) -> os.stat_result:
    """File-system check of one input path, following links one careful step at a time.

    Args:
        path: the input (a file, or a folder when ``allow_dir``).
        allow_dir: accept a folder (a DICOM series).

    Returns:
        ``os.stat`` of the target.

    Raises:
        InputError: not found, symbolic-link loop, dangling link, not a regular file, permission
            denied, empty file.
    """
    p = Path(path)
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:  # SimpleITK aborts the whole process on such a path (C++ std::logic_error)
        raise InputError(p, f"the path is not valid UTF-8 ({os.fsencode(p)!r}): the image readers cannot open it; "
                            "rename it") from None
    try:
        link = os.lstat(p)
    except FileNotFoundError:
        raise InputError(p, "file not found") from None
    except PermissionError:
        raise InputError(p, "permission denied: a folder on its path cannot be entered by this user") from None
    except OSError as exc:
        raise InputError(p, f"cannot be reached: {exc.strerror}") from None
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(p, "symbolic link loop (the link points, directly or through others, back to "
                                "itself)") from None
        if exc.errno == errno.ENOENT and stat.S_ISLNK(link.st_mode):
            raise InputError(p, f"dangling symbolic link: its target {os.readlink(p)!r} does not exist") from None
        if exc.errno == errno.EACCES:
            raise InputError(p, "permission denied: the link's target cannot be reached by this user") from None
        raise InputError(p, f"cannot be reached: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if not allow_dir:
            raise InputError(p, "is a folder, expected an image file")
        if not os.access(p, os.R_OK | os.X_OK):
            raise InputError(p, "permission denied: the folder cannot be listed by this user")
        return st
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise InputError(p, f"is {kind}, not a regular file; give the image file itself")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise InputError(p, "permission denied: the file cannot be read by this user") from None
    except OSError as exc:
        raise InputError(p, f"cannot be read: {exc.strerror}") from None
    if st.st_size == 0:
        raise InputError(p, "empty file (0 bytes)")
    return st


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ ijk.T).T[:, :3]


def _check_affine(p: Path, affine: np.ndarray, which: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError(p, f"degenerate geometry: the {which} holds NaN or infinite values")
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths < 1e-6):
        zero = [ax for ax, n in zip("ijk", lengths, strict=True) if n < 1e-6]
        raise InputError(p, f"degenerate geometry: the {which} gives voxel axis {'/'.join(zero)} zero length "
                            "(spacing 0), so the voxels have no position in space; fix the header")
    if abs(float(np.linalg.det(axes))) < 1e-6 * float(np.prod(lengths)):
        raise InputError(p, f"degenerate geometry: the {which}'s voxel axes are parallel (determinant 0), so "
                            "the volume has no 3-D position in space; fix the header")


def _header_shape_problem(shape: tuple[int, ...]) -> str | None:
    if any(s < 1 for s in shape):
        return f"the header declares an axis of size 0 (shape {shape}): no voxels to read"
    if len(shape) < 3:
        return f"{len(shape)}-D image of size {shape}: a 3-D volume is required"
    if len(shape) >= 5 and int(np.prod(shape[4:])) > 1:
        return (f"non-scalar voxels: {int(np.prod(shape[4:]))} components per voxel (shape {shape}); a scalar "
                "MRI volume is required")
    if len(shape) >= 4 and int(np.prod(shape[3:])) > 1:
        return f"4-D image with {int(np.prod(shape[3:]))} volumes (shape {shape}): give one 3-D volume"
    if min(shape[:3]) < 2:
        return f"volume is effectively 2-D (size {shape[:3]}): a 3-D volume is required"
    return None


def check_nifti_header(path: str | Path, file_size: int | None = None) -> None:
    """Check a NIfTI file's header (nibabel, no voxel data read).

    Raises:
        InputError: not a NIfTI, truncated/corrupt gzip header, non-scalar voxels, not 3-D, more
            voxel bytes declared than the file can hold, degenerate or ambiguous geometry.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    p = Path(path)
    size = os.stat(p).st_size if file_size is None else file_size
    gz = p.name.lower().endswith(".gz")
    with open(p, "rb") as fh:
        head = fh.read(352)
    if gz and not head.startswith(b"\x1f\x8b"):
        if head[344:348] in (b"n+1\0", b"n+2\0") or head[4:8] in (b"n+2\0",):
            raise InputError(p, "an uncompressed NIfTI file named .nii.gz: rename it to .nii")
        raise InputError(p, f"not a NIfTI image: named .nii.gz but not gzip-compressed (it starts with {head[:16]!r})")
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as fh:
            inner = fh.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(p, f"corrupt or truncated gzip file ({exc})") from None
    if len(inner) < 348:
        raise InputError(p, f"not a NIfTI image, or a truncated one: {len(inner)} bytes{' once decompressed' if gz else ''}, "
                            f"shorter than a NIfTI header (348 bytes; it starts with {inner[:16]!r})")
    if inner[344:348] not in (b"n+1\0", b"ni1\0") and inner[4:8] not in (b"n+2\0",):
        if not gz and inner.startswith(b"\x1f\x8b"):
            raise InputError(p, "gzip-compressed data named .nii: rename it to .nii.gz")
        raise InputError(p, f"not a NIfTI image: no NIfTI header (it starts with {inner[:16]!r})")
    try:
        img = nib.load(str(p))
    except HeaderDataError as exc:  # an invalid datatype code, vox_offset or dim[0]
        raise InputError(p, f"corrupt NIfTI header: {str(exc).splitlines()[0][:160]}") from None
    except ImageFileError as exc:
        raise InputError(p, f"not a NIfTI image (no valid header: {str(exc).splitlines()[0][:160]})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(p, f"corrupt or truncated gzip file: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(p, f"not a readable NIfTI image: {str(exc).splitlines()[0][:160]}") from None
    if isinstance(img, nib.Nifti2Image):
        raise InputError(p, "a NIfTI-2 file, which the image reader (SimpleITK) cannot open; save it as NIfTI-1, e.g. "
                            "nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), 'scan.nii.gz')")
    if not isinstance(img, nib.Nifti1Image):
        raise InputError(p, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
    hdr = img.header
    dtype = hdr.get_data_dtype()
    if dtype.names is not None:  # RGB24 / RGBA32: a record of colour channels per voxel
        raise InputError(p, f"non-scalar voxels ({'/'.join(dtype.names)} colour channels per voxel, e.g. a "
                            "screenshot or a colour map): a scalar MRI volume is required")
    if dtype.kind == "c":
        raise InputError(p, "complex-valued voxels (raw k-space or phase data?): a scalar magnitude volume is required")
    shape = tuple(int(s) for s in hdr.get_data_shape())
    problem = _header_shape_problem(shape)
    if problem:
        raise InputError(p, problem)
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize + int(hdr.get_data_offset())
    capacity = size * _MAX_DEFLATE_RATIO + 65536 if gz else size
    if declared > capacity:
        raise InputError(p, f"header declares {' x '.join(map(str, shape))} {dtype} voxels ({_size(declared)}) "
                            f"but the file holds {_size(size)}{' compressed' if gz else ''}: truncated file or "
                            "corrupt header")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if inner[344:348] in (b"n+1\0", b"ni1\0") and (qcode > 0 or scode == 0):
        # nibabel (and SimpleITK) silently replace a zero voxel size by 1: read the raw pixdim
        endian = "<" if int.from_bytes(inner[:4], "little") == 348 else ">"
        pixdim = np.frombuffer(inner[76:92], dtype=f"{endian}f4")[1:4]
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
            raise InputError(p, f"degenerate geometry: the header's voxel size (pixdim) is {tuple(pixdim.tolist())}, "
                                "and a voxel size of 0 gives the voxels no position in space (libraries "
                                "silently substitute 1 mm); fix the header")
    forms = [(hdr.get_sform(), "sform")] if scode > 0 else []
    forms += [(hdr.get_qform(), "qform")] if qcode > 0 else []
    for affine, which in forms or [(img.affine, "voxel size (pixdim)")]:
        _check_affine(p, np.asarray(affine, dtype=float), which)
    if len(forms) == 2:
        gap = float(np.max(np.linalg.norm(_corners(forms[0][0], shape) - _corners(forms[1][0], shape), axis=1)))
        if gap > _GEOMETRY_TOLERANCE_MM:
            raise InputError(p, f"ambiguous geometry: the header's qform and sform place the volume up to {gap:.1f} mm "
                                "apart, and tools differ in which they use (nibabel and most viewers the sform, "
                                "SimpleITK the qform or the sform depending on the codes); make them agree (e.g. "
                                "fslorient -copysform2qform)")


def check_image_information(path: str | Path) -> Any:
    """Check what SimpleITK reports about a file before reading its voxels (any format it reads).

    Returns:
        The ``sitk.ImageFileReader`` with the image information read (size, spacing, origin,
        direction), so callers need not read the header again.

    Raises:
        InputError: unreadable by SimpleITK (with its reason), not 3-D, non-scalar voxels.
    """
    import SimpleITK as sitk

    p = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if p.name.lower().endswith(".gz"):
            _check_gzip_stream(p)  # SimpleITK says "Unable to determine ImageIO reader" for corrupt data too
        raise InputError(p, f"cannot be read as an image: {sitk_reason(exc)}") from None
    if reader.GetNumberOfComponents() > 1:
        raise InputError(p, f"non-scalar voxels ({reader.GetNumberOfComponents()} components per voxel, e.g. RGB): a "
                            "scalar MRI volume is required")
    problem = _header_shape_problem(tuple(int(s) for s in reader.GetSize()))
    if problem:
        raise InputError(p, problem)
    return reader


def _check_gzip_stream(p: Path) -> None:
    """Decompress the whole file; raise with zlib's reason when the stream is corrupt or cut short."""
    try:
        with gzip.open(p, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(p, f"corrupt or truncated gzip data ({exc})") from None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def sitk_reason(exc: BaseException) -> str:
    """The reason line of a SimpleITK error (the ``ERROR:`` line), without its source location."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR:" in ln:
            return ln.split("ERROR:", 1)[1].strip()[:200]
    useful = [ln for ln in lines if not ln.rstrip(":").endswith((".cxx", ".h", ".hxx")) and ".cxx:" not in ln]
    return (useful or lines or ["unknown error"])[-1][:200]


def check_image_path(path: str | Path, allow_dir: bool = True) -> Any:
    """Every check above that applies to ``path`` (a file, or a DICOM series folder when ``allow_dir``).

    Returns:
        SimpleITK's reader holding the file's image information (:func:`check_image_information`);
        ``None`` for a folder.

    Raises:
        InputError: the first problem found, naming the file and the reason.
    """
    st = check_entry(path, allow_dir=allow_dir)
    if stat.S_ISDIR(st.st_mode):
        return None
    if is_nifti_name(path):
        check_nifti_header(path, st.st_size)
    return check_image_information(path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a DICOM folder: of its sorted files' names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
