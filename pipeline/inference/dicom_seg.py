"""The predicted mask of a DICOM series input as a DICOM Segmentation object (highdicom), so a
PACS or a viewer (OHIF, 3D Slicer) shows it over the original series.

One binary segment ("Tumour": SNOMED CT morphologically abnormal structure / neoplasm, automatic,
algorithm ``plgg_mtl``), one frame per source slice that holds tumour (empty frames omitted),
referencing the source series' study, series, frame of reference and every source instance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.io.imageio import atomic_write

__all__ = ["bundle_version", "source_files", "write_dicom_seg"]

ALGORITHM = "plgg_mtl"


def source_files(series_dir: str | Path) -> list[str]:
    """The files of the (one) DICOM series in ``series_dir``, in the slice order SimpleITK reads
    them in (that of the volume the mask was predicted on)."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if len(ids) != 1:
        raise InputError(series_dir, f"expected one DICOM series, found {len(ids)}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), ids[0]))


def bundle_version() -> str:
    """The bundle's version (``bundles/plgg_mtl/configs/metadata.json``), ``unknown`` without it."""
    import json

    from pipeline.models.onnx_export import METADATA

    try:
        return str(json.loads(METADATA.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def write_dicom_seg(mask: sitk.Image, series_dir: str | Path, path: str | Path, version: str | None = None) -> Path:
    """Write ``mask`` (on the series' own grid, as read from ``series_dir``) as a DICOM SEG at ``path``.

    Args:
        mask: binary mask, SimpleITK image of the source volume's size (slices = source files).
        series_dir: the DICOM series folder the mask was predicted from.
        path: output file (``seg.dcm``), written atomically.
        version: the algorithm version recorded in the object (default: :func:`bundle_version`).

    Raises:
        InputError: the series cannot be read by pydicom, or the mask does not match its slices.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    version = version or bundle_version()
    files = source_files(series_dir)
    try:
        sources = [pydicom.dcmread(f) for f in files]
    except Exception as exc:  # noqa: BLE001 - any pydicom failure is a bad input file
        raise InputError(series_dir, f"cannot be read by pydicom for the DICOM SEG: {exc}") from None
    frames = sitk.GetArrayFromImage(mask) > 0  # (slices, rows, columns), slices in file order
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(series_dir, f"mask {frames.shape} does not match the series' {len(sources)} slices of "
                                     f"{sources[0].Rows} x {sources[0].Columns}")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM, version=version, family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="pipeline",
        manufacturer_model_name=ALGORITHM,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{ALGORITHM} tumour segmentation (research use only)",
        omit_empty_frames=True,
    )
    return atomic_write(Path(path), lambda tmp: seg.save_as(tmp), ".dcm")
