"""The catalogue of bad inputs, as builders of tiny files.

Each image builder writes one bad input at ``dest`` (a ``bad_<kind>.nii.gz`` path; some change the
suffix) from a good 3-D NIfTI ``good``, and returns the path it made. ``IMAGE_KINDS`` maps a kind
to ``(builder, words the message must hold)``. :func:`snapshot` records an input folder's bytes
(without reading FIFOs or following links) so a test can show that nothing was modified.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def _data(good: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(good)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _save(dest: Path, data: np.ndarray, affine: np.ndarray | None = None, header: nib.Nifti1Header | None = None
          ) -> Path:
    nib.Nifti1Image(data, affine, header).to_filename(dest)
    return dest


def _header(shape: tuple[int, ...], dtype=np.float32) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    return hdr


def symlink_loop(dest: Path, good: Path) -> Path:
    os.symlink(dest.name, dest)
    return dest


def dangling_symlink(dest: Path, good: Path) -> Path:
    os.symlink("deleted_scan.nii.gz", dest)
    return dest


def degenerate_affine(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    hdr = _header(data.shape)
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    rows = affine.copy()
    rows[:, 1] = 0.0  # the j voxel axis has no length
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = rows[0], rows[1], rows[2]
    return _save(dest, data, None, hdr)


def zero_pixdim(dest: Path, good: Path) -> Path:
    """qform only, with a voxel size of 0 along k, which nibabel and SimpleITK both silently read as
    1 mm (so the raw header bytes are patched: nibabel would fix the field on writing)."""
    data, affine = _data(good)
    hdr = _header(data.shape)
    hdr.set_qform(affine, code=1)
    hdr["sform_code"] = 0
    raw = bytearray(gzip.decompress(_save(dest, data, None, hdr).read_bytes()))
    raw[76 + 3 * 4: 76 + 4 * 4] = np.float32(0.0).tobytes()  # pixdim[3], little-endian as nibabel writes
    dest.write_bytes(gzip.compress(bytes(raw)))
    return dest


def empty(dest: Path, good: Path) -> Path:
    dest.write_bytes(b"")
    return dest


def text_file(dest: Path, good: Path) -> Path:
    dest.write_text("patient notes, not an image\n", encoding="utf-8")
    return dest


def huge_header(dest: Path, good: Path) -> Path:
    hdr = _header((32767, 32767, 32767), np.int16)
    hdr.set_sform(np.eye(4), code=1)
    dest.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096))
    return dest


def two_d(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, data[:, :, data.shape[2] // 2], affine)


def rgb(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    scaled = (255 * (data - data.min()) / max(float(np.ptp(data)), 1e-6)).astype(np.uint8)
    out = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    out["R"], out["G"], out["B"] = scaled, scaled, scaled
    return _save(dest, out, affine)


def complex_voxels(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, (data + 1j * data).astype(np.complex64), affine)


def corrupt_gzip(dest: Path, good: Path) -> Path:
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(255 - b for b in raw[mid:mid + 64])
    dest.write_bytes(bytes(raw))
    return dest


def truncated_gzip(dest: Path, good: Path) -> Path:
    raw = good.read_bytes()
    dest.write_bytes(raw[: len(raw) // 2])
    return dest


def truncated_nii(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    plain = dest.with_name(dest.name.replace(".nii.gz", ".nii"))
    _save(plain, data, affine)
    raw = plain.read_bytes()
    plain.write_bytes(raw[: len(raw) // 2])
    return plain


def four_d(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, np.stack([data, data, data], axis=-1), affine)


def nan_voxel(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    data[2, 3, 4] = np.nan
    return _save(dest, data, affine)


def inf_voxel(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    data[2, 3, 4] = np.inf
    return _save(dest, data, affine)


def all_zero(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, np.zeros_like(data), affine)


def constant(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, np.full_like(data, 412.0), affine)


def qform_sform_disagree(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    img = nib.Nifti1Image(data, affine)
    shifted = affine.copy()
    shifted[:3, 3] += 15.0
    img.set_qform(shifted, code=1)
    img.set_sform(affine, code=2)
    img.to_filename(dest)
    return dest


def one_voxel_axis(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    return _save(dest, data[:, :, :1], affine)


def fifo(dest: Path, good: Path) -> Path:
    os.mkfifo(dest)
    return dest


def uncompressed_named_gz(dest: Path, good: Path) -> Path:
    dest.write_bytes(gzip.decompress(good.read_bytes()))
    return dest


def folder_named_nifti(dest: Path, good: Path) -> Path:
    dest.mkdir()
    (dest / "notes.txt").write_text("not a DICOM series", encoding="utf-8")
    return dest


def unknown_datatype(dest: Path, good: Path) -> Path:
    """A header whose datatype code is 0 (DT_UNKNOWN): nibabel raises HeaderDataError, not ValueError."""
    raw = bytearray(gzip.decompress(good.read_bytes()))
    raw[70:72] = np.int16(0).tobytes()  # datatype, little-endian as nibabel writes
    dest.write_bytes(gzip.compress(bytes(raw)))
    return dest


def nifti2(dest: Path, good: Path) -> Path:
    data, affine = _data(good)
    nib.Nifti2Image(data, affine).to_filename(dest)
    return dest


#: kind -> (builder, words the failure message must hold)
IMAGE_KINDS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "symlink_loop": (symlink_loop, "symbolic link loop"),
    "dangling_symlink": (dangling_symlink, "dangling symbolic link"),
    "degenerate_affine": (degenerate_affine, "degenerate geometry"),
    "zero_pixdim": (zero_pixdim, "degenerate geometry"),
    "empty": (empty, "empty file (0 bytes)"),
    "text_file": (text_file, "not a NIfTI image"),
    "huge_header": (huge_header, "header declares 32767 x 32767 x 32767"),
    "two_d": (two_d, "2-D image"),
    "rgb": (rgb, "non-scalar voxels"),
    "complex": (complex_voxels, "complex-valued voxels"),
    "corrupt_gzip": (corrupt_gzip, "corrupt"),
    "truncated_gzip": (truncated_gzip, "truncated"),
    "truncated_nii": (truncated_nii, "truncated file"),
    "four_d": (four_d, "4-D image with 3 volumes"),
    "nan": (nan_voxel, "NaN or infinite"),
    "inf": (inf_voxel, "NaN or infinite"),
    "all_zero": (all_zero, "constant"),
    "constant": (constant, "constant"),
    "qform_sform_disagree": (qform_sform_disagree, "ambiguous geometry"),
    "one_voxel_axis": (one_voxel_axis, "effectively 2-D"),
    "fifo": (fifo, "FIFO"),
    "uncompressed_named_gz": (uncompressed_named_gz, "uncompressed NIfTI file named .nii.gz"),
    "folder_named_nifti": (folder_named_nifti, "no DICOM series"),
    "nifti2": (nifti2, "a NIfTI-2 file"),
    "unknown_datatype": (unknown_datatype, "corrupt NIfTI header"),
}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: a link's target, a regular file's SHA-256, a folder, or another
    kind's mode; links and FIFOs are never opened."""
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode), st.st_mode)
    return out
