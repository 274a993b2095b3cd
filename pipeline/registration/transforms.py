"""Atlas registration: ITK linear transforms collapsed to one affine, read and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.io.imageio import atomic_write

__all__ = ["to_affine", "read_transform", "write_transform_atomic"]


def to_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Collapse a 3-D linear transform (Euler, similarity, affine, or a composite of them) into one affine."""
    matrix, offset = np.eye(3), np.zeros(3)
    # a composite applies its last-added transform first; compose point by point numerically
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1.0
        matrix[:, i] = np.array(transform.TransformPoint(tuple(e))) - origin
    offset = origin
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(matrix.ravel()))
    out.SetTranslation(tuple(offset))
    return out


def read_transform(path: str | Path) -> sitk.AffineTransform:
    """Read a ``.tfm`` written by :func:`write_transform_atomic` (or any 3-D linear ITK transform)."""
    try:
        return to_affine(sitk.ReadTransform(str(path)))
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an ITK transform: {str(exc).strip().splitlines()[-1][:200]}") from None


def write_transform_atomic(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK ``.tfm`` through a temporary file in the same folder, then rename; the file is
    read back first (ITK's writer ignores a failed write: a full disk)."""
    def write(tmp: str) -> None:
        sitk.WriteTransform(transform, tmp)
        try:
            back = sitk.ReadTransform(tmp)
        except RuntimeError:
            back = None
        if back is None or len(back.GetParameters()) != len(transform.GetParameters()):
            import errno
            import os
            import shutil

            code = errno.ENOSPC if shutil.disk_usage(os.path.dirname(tmp) or ".").free < (1 << 20) else errno.EIO
            raise OSError(code, f"{os.strerror(code)} (the written transform is incomplete)", tmp)

    return atomic_write(path, write, ".tfm")
