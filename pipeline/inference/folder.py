"""Folder inference: native-space tumour masks, class probabilities and a report, per case.

Per case (:meth:`FolderInference.run`): read and check the scan
(:func:`~pipeline.io.imageio.read_volume`); run the training chain itself (``preprocessing_transforms``):
registration onto the atlas (:class:`~pipeline.data.transforms.RegisterToAtlasd`, transforms cached on
disk), loading, atlas brain mask, z-score inside it; predict with the evaluator's inferer
(:class:`~pipeline.inference.predict.MultiTaskInferer`: sliding window, tumour-centred classification,
optional flip TTA); bring the tumour PROBABILITY map back to the native grid
(:func:`~pipeline.registration.resample.map_to_native`, linear) and threshold it there.

Why the probability map and not the atlas-grid mask: interpolating the probabilities places the
native boundary between atlas voxels (a thick-slice or finer native grid gets a smooth outline,
not the atlas grid's staircase), and ``seg.nii.gz == (prob.nii.gz >= threshold)`` holds exactly,
so the two outputs never disagree.

Outputs (:mod:`pipeline.inference.cases`), all written atomically, inputs never touched:
``OUT/<id>/seg.nii.gz`` (uint8, the input's shape and affine), ``prob.nii.gz`` (optional),
``qc.png`` (native scan, mask outline, centred on the tumour) and ``result.json`` (the case's report
row, written last: its presence means the case is finished, so a re-run skips it unless
``overwrite``); ``OUT/predictions.csv`` and ``OUT/predictions.json`` for the whole run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.data.transforms import split_at_registration
from pipeline.inference.cases import (
    InputCase,
    box_mask,
    case_title,
    input_fingerprint,
    largest_component,
    log_row,
    native_boxes,
    tumour_measures,
    write_like_input,
    write_report,
)
from pipeline.io.errors import InputError, MachineError, find_input_error
from pipeline.io.imageio import (
    is_dicom_dir,
    read_mask,
    read_volume,
    remove_stale_temporaries,
    write_text_atomic,
)

__all__ = [
    "InferenceOptions",
    "FolderInference",
    "runner_from_config",
]

logger = logging.getLogger(__name__)
#: Files a case's folder holds (their temporaries are removed when a killed run left them).
_CASE_FILES = ("seg.nii.gz", "seg.dcm", "prob.nii.gz", "qc.png", "result.json")
#: The detection head's boxes scoring at least this are counted (``lesions_detected``) and drawn on ``qc.png``;
#: ``predictions.json`` lists every box the head's selector kept (score >= its ``score_thresh``).
QC_BOX_SCORE = 0.5
_CHANGED = "the file changed while it was processed (still being copied or written?); run again once it is complete"


@dataclass
class InferenceOptions:
    """What is written and where.

    Attributes:
        output_dir: the run's folder (``OUT``).
        class_names: class names, in the network's output order (report columns ``p_<name>``).
        brain_mask: the atlas brain mask file the training chain normalises with
            (``brain_mask_file``).
        ckpt: the checkpoint used (reported, and part of the key that tells finished cases apart).
        overwrite: redo cases an earlier run finished.
        write_prob: also write ``prob.nii.gz`` (native tumour probability, float32).
        qc: write ``qc.png``.
    """

    output_dir: str | Path
    class_names: Sequence[str]
    brain_mask: str | None = None
    ckpt: str | Path | None = None
    overwrite: bool = False
    write_prob: bool = False
    qc: bool = True

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.class_names = list(self.class_names)


@dataclass
class _Timer:
    """Seconds per stage of one case."""

    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[f"seconds_{name}"] = round(now - self.last, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "seconds_total": round(time.perf_counter() - self.start, 3)}


def _file_stamp(path: str | Path | None) -> str:
    p = Path(path) if path else None
    return f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p and p.is_file() else str(path)


def _registration_settings(value: Any) -> Any:
    """``RegistrationSettings`` from itself or from a dict of its fields (a bundle config)."""
    from pipeline.registration.settings import RegistrationSettings

    if isinstance(value, RegistrationSettings):
        return value
    return RegistrationSettings.from_dict(dict(value))


class FolderInference:
    """Runs the cases of a folder one by one; a failing case is reported and the others go on.

    Args:
        network: the trained network (:func:`load_network`), on ``device``.
        inferer: :class:`~pipeline.inference.predict.MultiTaskInferer` (its ``cfg`` holds ROI, overlap, TTA
            flips, classification mode and threshold).
        preprocessing: the training chain (``preprocessing_transforms``): registration onto the
            atlas (:class:`~pipeline.data.transforms.RegisterToAtlasd`, cached), loading, brain mask,
            z-score; split by :func:`split_at_registration`.
        options: :class:`InferenceOptions`.
        device: the network's device.
        registration_settings: replaces the chain's registration settings when given
            (``RegistrationSettings`` or a dict of its fields, e.g. a cheaper registration in
            tests); ``None`` keeps them.
    """

    def __init__(self, network: torch.nn.Module, inferer: Callable, preprocessing: Any, options: InferenceOptions,
                 device: str | torch.device = "cpu", registration_settings: Any = None) -> None:
        if not getattr(network, "has_decoder", True):
            raise InputError(options.ckpt, "this model is the classifier alone (configs/classify_only.json, the "
                                           "experiment's single-task arm): it has no segmentation output, and folder "
                                           "inference writes masks; use a multi-task model")
        self.network = network
        self.inferer = inferer
        self.register, self.normalise = split_at_registration(preprocessing)
        if registration_settings is not None:
            self._registerer.settings = _registration_settings(registration_settings)
        self.options = options
        self.device = torch.device(device)
        self.rows: list[dict[str, Any]] = []

    @property
    def _registerer(self) -> Any:
        return self.register.transforms[-1]

    # ------------------------------------------------------------------ bookkeeping

    @property
    def threshold(self) -> float:
        return float(self.inferer.cfg.threshold)

    @cached_property
    def settings_key(self) -> str:
        """Digest of everything that decides a case's outputs (checkpoint, prediction and
        registration settings, atlas, written files): outputs made with other settings are redone."""
        reg = self._registerer
        doc = {"ckpt": _file_stamp(self.options.ckpt), "predict": repr(asdict(self.inferer.cfg)),
               "registration": reg.settings.key(), "already_registered": reg.already_registered,
               "interpolator": reg.interpolator,
               "normalisation": [type(t).__name__ for t in getattr(self.normalise, "transforms", [])],
               "atlas": reg.atlas.fingerprint(), "brain_mask": self.options.brain_mask,
               "classes": self.options.class_names, "prob": self.options.write_prob, "qc": self.options.qc}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _outputs(self, folder: Path, case: InputCase | None = None) -> list[Path]:
        names = ["seg.nii.gz"] + (["prob.nii.gz"] if self.options.write_prob else []) + (
            ["qc.png"] if self.options.qc else []) + (["seg.dcm"] if case is not None and is_dicom_dir(case.path) else [])
        return [folder / n for n in names]

    def _fingerprint(self, case: InputCase) -> dict[str, str]:
        return {"input": ";".join(input_fingerprint(p) for p in case.inputs), "settings": self.settings_key}

    def finished(self, case: InputCase) -> dict[str, Any] | None:
        """The report row of a case an earlier run finished with these settings, else ``None``."""
        folder = self.options.output_dir / case.id
        if self.options.overwrite or not all(p.exists() for p in self._outputs(folder, case)):
            return None
        try:
            row = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if row.get("_fingerprint") != self._fingerprint(case) or row.get("input") != str(case.path):
            return None
        return {**row, "reused": True}

    # ------------------------------------------------------------------ one case

    def _atlas_input(self, case: InputCase, image: sitk.Image) -> tuple[dict[str, Any], sitk.Transform]:
        """Register (cached) and resample onto the atlas; the transform is atlas -> native."""
        from pipeline.registration.transforms import read_transform

        images = [str(p) for p in case.inputs]
        item = self.register({"image": images[0] if len(images) == 1 else images, "brain": self.options.brain_mask})
        tfm = item.get("to_atlas")
        return item, (read_transform(tfm) if tfm else sitk.AffineTransform(3))

    def _predict(self, item: dict[str, Any]) -> tuple[sitk.Image, torch.Tensor | None, tuple | None]:
        """Normalise like training, predict; the tumour probability as an atlas-grid image, the class
        probabilities, and the detection head's ``(boxes, scores)`` on the atlas grid (``None``
        for a network without the head)."""
        from pipeline.registration.atlas import nifti_to_sitk

        data = self.normalise(item)
        image = data["image"]
        x = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)[None].to(self.device)
        with torch.no_grad():
            pred = self.inferer(x, self.network)
        prob = pred["seg"][0, 0].float().cpu().numpy()
        affine = np.asarray(image.affine, dtype=float)  # the loaded atlas-grid file's RAS affine
        cls = pred["cls"][0].float().cpu() if pred.get("cls") is not None else None
        boxes = pred["boxes"][0] if pred.get("boxes") is not None else None
        return nifti_to_sitk(prob, affine), cls, boxes

    def _class_columns(self, cls: torch.Tensor | None) -> dict[str, Any]:
        names = self.options.class_names
        if cls is None:
            return {f"p_{n}": None for n in names} | {"predicted_class": None}
        if cls.numel() != len(names):
            raise InputError(None, f"the network gives {cls.numel()} class probabilities but class_names has "
                                   f"{len(names)}: {names}")
        return {f"p_{n}": round(float(p), 6) for n, p in zip(names, cls, strict=True)} | {
            "predicted_class": names[int(cls.argmax())]}

    def _truth_columns(self, case: InputCase, image: sitk.Image, seg: sitk.Image) -> dict[str, Any]:
        """Native-space Dice against a datalist's mask, and the true class, when given."""
        out: dict[str, Any] = {}
        if case.label is not None:
            try:
                truth = sitk.GetArrayViewFromImage(read_mask(case.label, image, case.path)) > 0
            except InputError as exc:  # a bad ground truth does not cost the case its prediction
                out["dice_error"] = str(exc)[:300]
                truth = None
            if truth is not None:
                pred = sitk.GetArrayViewFromImage(seg) > 0
                denom = int(truth.sum()) + int(pred.sum())
                out["dice"] = round(2.0 * int((truth & pred).sum()) / denom, 4) if denom else 1.0
        if case.true_class is not None:
            out["true_class"] = case.true_class
        return out

    def _write(self, case: InputCase, image: sitk.Image, prob: sitk.Image, seg: sitk.Image, row: dict) -> None:
        from pipeline.io.qc import mask_center_index, save_orthogonal_slices

        folder = self.options.output_dir / case.id
        write_like_input(seg, case.path, folder / "seg.nii.gz", np.uint8)
        if is_dicom_dir(case.path):  # also as a DICOM SEG over the source series, for a PACS or viewer
            from pipeline.inference.dicom_seg import write_dicom_seg

            write_dicom_seg(seg, case.path, folder / "seg.dcm")
        if self.options.write_prob:
            write_like_input(prob, case.path, folder / "prob.nii.gz", np.float32)
        if self.options.qc:  # planes through the largest tumour component, not between scattered blobs
            shown = [b for b in row.get("boxes", []) if b["score"] >= QC_BOX_SCORE]
            save_orthogonal_slices(image, folder / "qc.png", outline=seg, title=case_title(row),
                                   center_index=mask_center_index(largest_component(seg)),
                                   boxes=box_mask(image, shown) if shown else None)

    def _discard_outputs(self, case: InputCase) -> None:
        """Remove what an earlier run (other settings or input, or ``overwrite``) or this failed
        attempt left in the case's folder, so no mask stands beside a 'failed' report row."""
        folder = self.options.output_dir / case.id
        for path in (*self._outputs(folder), folder / "seg.dcm", folder / "prob.nii.gz", folder / "result.json"):
            path.unlink(missing_ok=True)
        remove_stale_temporaries(folder, _CASE_FILES)

    def process(self, case: InputCase) -> dict[str, Any]:
        """Run one case and write its outputs; raises on a bad case (see :meth:`run_case`).

        A file that changes while it is processed (still being copied) fails with that reason,
        whatever error the half-written file caused, and is redone by the next run.
        """
        if case.problem:
            raise InputError(case.path, case.problem)
        folder = self.options.output_dir / case.id
        (folder / "result.json").unlink(missing_ok=True)  # the "finished" marker goes last
        remove_stale_temporaries(folder, _CASE_FILES)  # left by a run killed while it wrote
        fingerprint = self._fingerprint(case)  # taken before reading
        try:
            row = self._outputs_of(case)
            if self._fingerprint(case) != fingerprint:
                raise InputError(case.path, _CHANGED)
        except Exception:
            if self._fingerprint(case) != fingerprint:
                raise InputError(case.path, _CHANGED) from None
            raise
        write_text_atomic(folder / "result.json", json.dumps({**row, "_fingerprint": fingerprint}, indent=1))
        return row

    def _outputs_of(self, case: InputCase) -> dict[str, Any]:
        """Read, register, predict, map back and write one case; its report row."""
        from pipeline.registration.resample import map_to_native

        timer = _Timer()
        image = read_volume(case.path)
        _check_sequence_grids(case, image)
        item, transform = self._atlas_input(case, image)
        timer.lap("registration")
        prob_atlas, cls, detected = self._predict(item)
        timer.lap("network")
        prob = map_to_native(prob_atlas, transform, image, is_mask=False)
        seg = sitk.Cast(prob >= self.threshold, sitk.sitkUInt8)
        row = {"id": case.id, "input": str(case.path), "status": "ok", **self._class_columns(cls),
               **tumour_measures(seg), **self._truth_columns(case, image, seg)}
        if detected is not None:  # the detection head's boxes: all in the JSON, their count in the CSV
            row["boxes"] = native_boxes(*detected, prob_atlas, transform, image)
            row["lesions_detected"] = sum(b["score"] >= QC_BOX_SCORE for b in row["boxes"])
        self._write(case, image, prob, seg, row)
        timer.lap("writing")
        return {**row, **timer.total(), "reused": False}

    def run_case(self, case: InputCase) -> dict[str, Any]:
        """A case's report row: reused from an earlier run, computed now, or failed with the reason.

        Raises:
            MachineError: an output (or the registration cache) could not be written: a full disk or
                a read-only folder fails every later case too, so the run stops; the cases finished
                before stay whole and in the report as it was written after the last of them.
        """
        done = None if case.problem else self.finished(case)  # a clashing id never reuses an earlier output
        if done is not None:
            return done
        try:
            return self.process(case)
        except Exception as exc:  # one bad case never stops the others; a full or read-only disk stops all
            err = find_input_error(exc)
            if isinstance(err, MachineError):
                with contextlib.suppress(OSError):  # a read-only folder keeps what it holds
                    self._discard_outputs(case)
                raise err from exc
            self._discard_outputs(case)
            if err is None:
                logger.debug("case %s failed", case.id, exc_info=True)
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            else:
                reason = err.problem if err.path in (None, str(case.path)) else str(err)
            return {"id": case.id, "input": str(case.path), "status": f"failed: {reason[:300]}", "reused": False}

    # ------------------------------------------------------------------ the run

    def summary(self) -> dict[str, Any]:
        """Counts and settings of the run (the ``summary`` block of ``predictions.json``)."""
        cfg = self.inferer.cfg
        return {"n_cases": len(self.rows), "n_ok": sum(r["status"] == "ok" for r in self.rows),
                "n_failed": sum(r["status"] != "ok" for r in self.rows),
                "n_reused": sum(bool(r.get("reused")) for r in self.rows), "checkpoint": str(self.options.ckpt),
                "threshold": cfg.threshold, "classify": cfg.classify, "tta_flips": [list(f) for f in cfg.flips],
                "roi_size": list(cfg.roi_size), "overlap": cfg.overlap, "device": str(self.device)}

    def run(self, cases: Sequence[InputCase]) -> list[dict[str, Any]]:
        """Run every case (report rewritten after each one), in order; returns the report rows.

        Raises:
            InputError: another inference run writes this output folder (:mod:`pipeline.runtime.locks`).
            MachineError: a full disk or a read-only folder (:meth:`run_case`).
        """
        from pipeline.runtime.locks import folder_lock

        with folder_lock(self.options.output_dir, "inference run"):
            return self._run(cases)

    def _run(self, cases: Sequence[InputCase]) -> list[dict[str, Any]]:
        self.rows = []
        total = len(cases)
        remove_stale_temporaries(self.options.output_dir, ("predictions.csv", "predictions.json"))
        logger.info("inference on %d case(s) -> %s", total, self.options.output_dir)
        for n, case in enumerate(cases, 1):
            row = self.run_case(case)
            self.rows.append(row)
            log_row(row, n, total)
            write_report(self.rows, self.options.output_dir, self.options.class_names, self.summary())
        return self.rows

    def exit_on_failure(self) -> None:
        """Print the one-line summary; exit with status 1 when any case failed."""
        s = self.summary()
        failed = [r["id"] for r in self.rows if r["status"] != "ok"]
        line = (f"inference: {s['n_ok']} of {s['n_cases']} case(s) ok ({s['n_reused']} from an earlier run), "
                f"{s['n_failed']} failed -> {self.options.output_dir / 'predictions.csv'}")
        if failed:
            print(f"{line}; failed: {', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}", file=sys.stderr)
            sys.stderr.flush()
            raise SystemExit(1)
        print(line)


def _check_sequence_grids(case: InputCase, reference: sitk.Image) -> None:
    """Every sequence of a case checked like an image and on the reference sequence's grid (one
    registration moves them all)."""
    from pipeline.data.validation import check_volume_file
    from pipeline.io.imageio import check_same_grid

    for path in case.inputs:
        if path != case.path:
            check_same_grid(reference, check_volume_file(path), case.path, path, what="sequence")


def runner_from_config(config_files: Sequence[str | Path], **overrides: Any
                       ) -> tuple[FolderInference, list[InputCase]]:
    """Parse the inference bundle in-process: ``(runner, cases)``, as ``monai.bundle run`` would.

    Run from the repository root (the configs' ``%bundles/...`` macros are relative to it).

    Args:
        config_files: ``inference.json`` and its overlays, merged in order.
        overrides: config ids and values, like the command line's ``--key value``.

    Example:
        runner, cases = runner_from_config(["bundles/plgg_mtl/configs/inference.json", "configs/demo.json"],
                                           input_dir="scans", output_dir="out", ckpt="model.pt")
        rows = runner.run(cases)
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(overrides)
    return parser.get_parsed_content("runner"), parser.get_parsed_content("cases")
