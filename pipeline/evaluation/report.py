"""Evaluation outputs: per-case ``cases.csv``, the run's ``metrics.json`` and the classifier's
``reliability.png`` (Ignite handler), and the console summary of them.

Besides the Dice of the masks as predicted (after the run's component rule), every case is
scored under each rule of :data:`pipeline.inference.postprocess.RULES` (columns ``dice[<rule>]``, summary
``dice_by_postprocessing``), so one evaluation credits each rule on the same trained model.
The classifier's calibration is reported as top-label expected calibration error (``ece``, of the
probabilities as reported, i.e. after the temperature; ``ece_uncalibrated`` at temperature 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

__all__ = ["EvaluationReport", "print_summary"]


def _spacing(batch: dict[str, Any], b: int) -> list[float]:
    """Voxel size (mm) along the array axes of sample ``b``: the column norms of its image's affine
    (a MONAI ``MetaTensor``); 1 mm when the batch carries no affine."""
    import numpy as np

    affine = getattr(batch.get("image"), "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
    a = a[b] if a.ndim == 3 else a
    return [float(v) for v in np.linalg.norm(a[:3, :3], axis=0)]


class EvaluationReport:
    """Evaluator handler: per-case Dice, HD95 and surface Dice (mm, :mod:`pipeline.evaluation.surface`),
    the BraTS lesion-wise Dice and HD95 (:mod:`pipeline.evaluation.lesions`), the numbers of true
    lesions, of predicted components and of the detection head's boxes (``boxes_true``, ``boxes_pred``,
    ``boxes_head``) and class probabilities to ``cases.csv``, and the run's summary (every metric of
    ``engine.state.metrics`` plus ``dice``, the mask components as lesion detections ``det_*`` and the
    detection head's boxes ``det_head_*`` when the network detects
    (:func:`pipeline.evaluation.detection.detection_scores`) and counts) to ``metrics.json``, both written atomically in ``output_dir`` when the evaluation completes.
    Under a process group it runs on every rank: the cases of all ranks are gathered and rank 0
    writes them, in the order one process would have.

    Args:
        output_dir: folder for ``metrics.json`` and ``cases.csv``.
        class_names: names of the classes (CSV columns ``p_<name>``).
        threshold: tumour probability threshold.
        key_map: summary name -> ``engine.state.metrics`` name (e.g. ``dice`` -> ``val_mean_dice``).
        postprocess: the component rule the predictions were made with (reported).
        temperature: the classifier temperature the probabilities were made with (reported).
        min_mass_fraction: parameter of the ``confident`` rule when re-scoring the rules.
        ece_bins: confidence bins of the calibration error and reliability diagram.
        surface_tolerance_mm: tolerance of the normalised surface Dice (:mod:`pipeline.evaluation.surface`).
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], threshold: float = 0.5,
                 key_map: dict[str, str] | None = None, postprocess: str | None = None,
                 temperature: float = 1.0, min_mass_fraction: float = 0.2, ece_bins: int = 10,
                 surface_tolerance_mm: float = 1.0) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.threshold = threshold
        self.key_map = key_map or {"dice": "val_mean_dice", "accuracy": "val_accuracy",
                                   "balanced_accuracy": "val_balanced_accuracy", "auc": "val_auc"}
        self.postprocess = postprocess
        self.temperature = float(temperature)
        self.min_mass_fraction = min_mass_fraction
        self.ece_bins = ece_bins
        self.surface_tolerance_mm = float(surface_tolerance_mm)
        self.rows: list[dict[str, Any]] = []
        self._logits: list[torch.Tensor] = []
        self._iterations: list[tuple[list[dict[str, Any]], list[torch.Tensor]]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows.clear()
        self._logits.clear()
        self._iterations.clear()

    def record(self, engine: Engine) -> None:
        from monai.metrics import compute_dice

        from pipeline.data.boxes import lesion_boxes
        from pipeline.evaluation.detection import mask_detections
        from pipeline.evaluation.lesions import lesion_scores
        from pipeline.evaluation.surface import surface_scores
        from pipeline.inference.postprocess import dice_by_rule

        out, batch = engine.state.output, engine.state.batch
        seg, cls_prob, target = out["pred"]["seg"], out["pred"]["cls"], out["label"]
        seg_raw, logits = out["pred"].get("seg_raw"), out["pred"].get("cls_logits")
        ids = batch.get("id", [f"case{len(self._iterations)}_{i}" for i in range(target["class"].shape[0])])
        rows: list[dict[str, Any]] = []
        logit_rows: list[torch.Tensor] = []
        for b, cid in enumerate(ids):
            row: dict[str, Any] = {"id": cid}
            pred_mask = None if seg is None else (seg[b:b + 1] >= self.threshold).float()
            if pred_mask is not None and int(target["has_label"][b]):
                truth = (target["label"][b:b + 1] > 0).float()
                row["dice"] = float(compute_dice(pred_mask, truth, include_background=True, ignore_empty=False).item())
                pred_np, truth_np, spacing = pred_mask[0, 0].cpu().numpy(), truth[0, 0].cpu().numpy(), _spacing(batch, b)
                row.update(surface_scores(pred_np, truth_np, spacing, self.surface_tolerance_mm))
                row.update(lesion_scores(pred_np, truth_np, spacing))
                prob_np = seg[b, 0].detach().float().cpu().numpy()
                row["_boxes_true"] = lesion_boxes(truth_np, spacing)
                row["_detections"] = mask_detections(pred_np, prob_np, spacing)
                row["boxes_true"], row["boxes_pred"] = len(row["_boxes_true"]), len(row["_detections"][0])
                if "boxes" in out["pred"]:  # the detection head's, next to the mask-derived baseline
                    row["_head_detections"] = out["pred"]["boxes"][b]
                    row["boxes_head"] = len(row["_head_detections"][0])
                row["true_volume_vox"] = int(truth.sum())
                if seg_raw is not None:
                    scores = dice_by_rule(seg_raw[b:b + 1], target["label"][b:b + 1], self.threshold,
                                          self.min_mass_fraction)
                    row.update({f"dice[{rule}]": value for rule, value in scores.items()})
            if pred_mask is not None:
                row["pred_volume_vox"] = int(pred_mask.sum())
            c = int(target["class"][b])
            row["true_class"] = self.class_names[c] if c >= 0 else ""
            if cls_prob is not None:
                for k, name in enumerate(self.class_names):
                    row[f"p_{name}"] = round(float(cls_prob[b, k]), 6)
                row["predicted_class"] = self.class_names[int(cls_prob[b].argmax())]
                if logits is not None and c >= 0:
                    logit_rows.append(logits[b].detach().float().cpu())
                    row["_class_index"] = c
            rows.append(row)
        self._iterations.append((rows, logit_rows))

    def write(self, engine: Engine) -> None:
        import csv
        import io
        import json
        import math

        from pipeline.io.imageio import write_text_atomic
        from pipeline.runtime import distributed

        # every rank's cases in the single-process order (under a process group); rank 0 writes
        gathered = distributed.gather_in_sampler_order(self._iterations)
        self.rows = [row for rows, _ in gathered for row in rows]
        self._logits = [t for _, logits in gathered for t in logits]
        if not distributed.is_main():
            return
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, int | float)}
        summary: dict[str, Any] = {name: metrics.get(src, float("nan")) for name, src in self.key_map.items()}
        dices = [r["dice"] for r in self.rows if "dice" in r]
        by_rule = {k[5:-1]: [r[k] for r in self.rows if k in r] for k in {k for r in self.rows for k in r}
                   if k.startswith("dice[")}
        from pipeline.evaluation.detection import detection_scores
        from pipeline.evaluation.lesions import summarise_lesions
        from pipeline.evaluation.surface import summarise_surface

        boxed = [r for r in self.rows if "_boxes_true" in r]
        detection = detection_scores([r["_detections"] for r in boxed], [r["_boxes_true"] for r in boxed]) if boxed else {}
        headed = [r for r in boxed if "_head_detections" in r]
        head = (detection_scores([r["_head_detections"] for r in headed], [r["_boxes_true"] for r in headed])
                if headed else {})
        summary.update({
            **summarise_surface(self.rows),
            **summarise_lesions(self.rows),
            **{f"det_{k}": v for k, v in detection.items()},
            **{f"det_head_{k}": v for k, v in head.items()},
            "surface_tolerance_mm": self.surface_tolerance_mm,
            "dice_std": float(torch.tensor(dices).std()) if len(dices) > 1 else float("nan"),
            "dice_min": min(dices) if dices else float("nan"),
            "postprocessing": self.postprocess,
            "dice_by_postprocessing": {k: sum(v) / len(v) for k, v in sorted(by_rule.items()) if v},
            "temperature": self.temperature,
            **self._calibration(),
            "n_cases": len(self.rows),
            "n_with_mask": len(dices),
            "n_with_class": sum(1 for r in self.rows if r.get("true_class")),
            "metrics": metrics,
        })
        for key in ("hd95_mm", "surface_dice", "lesion_dice", "lesion_hd95_mm", "ece"):  # for the handlers after this one (MLflow with --tracking)
            if isinstance(summary.get(key), float) and summary[key] == summary[key]:
                engine.state.metrics[key] = summary[key]
        clean = json.loads(json.dumps(summary, default=float), parse_constant=lambda _: None)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in clean.items()}
        write_text_atomic(self.output_dir / "metrics.json", json.dumps(clean, indent=1))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields and not k.startswith("_")]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.output_dir / "cases.csv", buf.getvalue())

    def _calibration(self) -> dict[str, Any]:
        """ECE of the reported probabilities and at temperature 1; writes ``reliability.png``."""
        import numpy as np

        from pipeline.inference.calibration import expected_calibration_error, reliability_diagram

        if not self._logits:
            return {"ece": float("nan"), "ece_uncalibrated": float("nan")}
        logits = torch.stack(self._logits)
        target = np.array([r["_class_index"] for r in self.rows if "_class_index" in r])
        probs = torch.softmax(logits / self.temperature, 1).numpy()
        reliability_diagram(probs, target, self.output_dir / "reliability.png", self.ece_bins,
                            title=f"T = {self.temperature:.2f}: ")
        return {"ece": expected_calibration_error(probs, target, self.ece_bins),
                "ece_uncalibrated": expected_calibration_error(torch.softmax(logits, 1).numpy(), target,
                                                               self.ece_bins)}


def print_summary(eval_dir: str | Path) -> dict[str, Any]:
    """Print the headline figures of ``eval_dir/metrics.json`` (written by :class:`EvaluationReport`)."""
    import json

    from pipeline.runtime import distributed

    if not distributed.is_main():  # rank 0 wrote and prints the evaluation
        return {}
    path = Path(eval_dir) / "metrics.json"
    summary = json.loads(path.read_text(encoding="utf-8"))

    def fmt(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"evaluation on {summary['n_cases']} cases ({summary['n_with_mask']} with mask, "
          f"{summary['n_with_class']} with class): Dice {fmt('dice')} (sd {fmt('dice_std')}), HD95 "
          f"{fmt('hd95_mm')} mm, surface Dice {fmt('surface_dice')} ({summary.get('surface_tolerance_mm')} mm), "
          f"lesion-wise Dice {fmt('lesion_dice')} and HD95 {fmt('lesion_hd95_mm')} mm, "
          f"accuracy {fmt('accuracy')}, balanced accuracy {fmt('balanced_accuracy')}, AUC {fmt('auc')}, "
          f"ECE {fmt('ece')}")
    by_rule = summary.get("dice_by_postprocessing") or {}
    if by_rule:
        rules = ", ".join(f"{k} {v:.3f}" for k, v in by_rule.items())
        print(f"post-processing {summary.get('postprocessing')!r} applied; Dice under each rule: {rules}")
    print(f"per-case results: {Path(eval_dir) / 'cases.csv'}; summary: {path}")
    return summary
