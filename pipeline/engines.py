"""Plumbing that lets MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` (Ignite)
train and evaluate a network with two outputs.

MONAI's engines already do AMP, gradient scaling, accumulation, events and handlers; what
they lack for multi-task learning is small and lives here:

- :class:`MultiTaskPrepareBatch`: image -> inputs; mask, class and the has-label flags -> a
  target dict (so the loss can drop the term of a missing task per sample).
- :class:`MultiTaskInferer`: whole-volume prediction (sliding window + tumour-centred
  classification, :mod:`pipeline.predict`) as a MONAI ``Inferer`` for the evaluator.
- :class:`LossTermsHandler`: puts the loss components and the learning rate into each
  iteration's output so Stats/TensorBoard handlers log them.
- :class:`ClassificationMetrics`: accuracy, balanced accuracy and macro one-vs-rest AUC
  (MONAI ``compute_roc_auc``) over the cases that have a class.
- output transforms for the metric handlers, and checkpoint helpers for resuming.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointSaver, MeanDice
from monai.inferers import Inferer
from monai.metrics import compute_roc_auc

from pipeline.predict import PredictConfig, predict_volume

__all__ = [
    "MultiTaskPrepareBatch",
    "MultiTaskInferer",
    "LossTermsHandler",
    "ClassificationMetrics",
    "balanced_accuracy",
    "labelled_seg",
    "LabelledMeanDice",
    "labelled_cls",
    "loss_output",
    "latest_checkpoint",
    "checkpoint_objects",
    "resumable",
    "cosine_schedule",
    "AtomicCheckpointSaver",
    "EvaluationReport",
    "print_summary",
]

TARGET_KEYS = ("label", "class", "has_label", "has_class")


def _plain(x: Any) -> Any:
    """MetaTensor -> torch.Tensor (other values unchanged)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class MultiTaskPrepareBatch(PrepareBatch):
    """Batch dict -> ``(image, {"label", "class", "has_label", "has_class"})`` on ``device``.

    Missing keys get defaults: every mask present, class ``-1`` (unknown).

    Args:
        cls_needs_tumour: training on patches: a patch of a case with a mask that holds no
            tumour voxel gets ``has_class = 0``, so the classifier learns the tumour's class from
            patches that show the tumour (a background patch carries no evidence of its genotype,
            and at validation/inference the classifier only sees tumour-centred patches). Cases
            without a mask keep their class.
    """

    def __init__(self, cls_needs_tumour: bool = False) -> None:
        self.cls_needs_tumour = cls_needs_tumour

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Plain tensors: MONAI's MetaTensor dispatch makes every network op several times slower
        # (measured 10-20 s vs 2.4 s per demo training step on CPU) and the engines need no metadata.
        image = _plain(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs)
        b = image.shape[0]
        label = _plain(batchdata.get("label"))
        target = {
            "label": (label if label is not None else torch.zeros_like(image)).to(device=device, non_blocking=non_blocking),
            "class": torch.as_tensor(batchdata.get("class", [-1] * b)).long().view(-1).to(device),
            "has_label": torch.as_tensor(batchdata.get("has_label", [1] * b)).view(-1).to(device),
            "has_class": torch.as_tensor(batchdata.get("has_class", [1] * b)).view(-1).to(device),
        }
        if self.cls_needs_tumour:
            shows_tumour = (target["label"] > 0).flatten(1).any(1)
            target["has_class"] = target["has_class"] * (shows_tumour | (target["has_label"] == 0)).to(
                target["has_class"].dtype)
        return image, target


class MultiTaskInferer(Inferer):
    """Whole-volume inferer: returns ``{"seg": (B, 1, H, W, D) probabilities, "cls": (B, K) | None}``.

    Args: the fields of :class:`pipeline.predict.PredictConfig`.
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "gaussian", classify: str = "patch", threshold: float = 0.5,
                 tta_flips: Sequence[Sequence[int]] | None = None, amp: bool = False,
                 keep_largest: bool = True, class_flip_axes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.cfg = PredictConfig(roi_size, sw_batch_size, overlap, mode, classify, threshold, tta_flips, amp,
                                 keep_largest, class_flip_axes)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> dict:
        seg, cls = predict_volume(network, inputs, self.cfg)
        return {"seg": seg, "cls": cls}


class LossTermsHandler:
    """After each loss computation, copy the loss components and the learning rate into
    ``engine.state.output`` (keys ``loss_seg``, ``loss_cls``, ``lr``) for the logging handlers."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        terms = getattr(engine.loss_function, "last_terms", {})
        out = engine.state.output
        for key in ("seg", "cls"):
            if key in terms:
                out[f"loss_{key}"] = float(terms[key])
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])


def loss_output(output: dict) -> dict[str, float]:
    """Trainer output -> scalars to log: total loss, each component (when computed), lr."""
    loss = output["loss"]
    logged = {"loss": float(loss.detach() if isinstance(loss, torch.Tensor) else loss)}
    for key in ("loss_seg", "loss_cls", "lr"):
        value = output.get(key)
        if value is not None and value == value:  # skip NaN (no sample for that task in the batch)
            logged[key] = float(value)
    return logged


def labelled_seg(threshold: float = 0.5) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform for ``MeanDice``: thresholded prediction and mask of the cases with a mask."""

    def transform(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        target = output["label"]
        keep = target["has_label"].bool()
        return (output["pred"]["seg"][keep] >= threshold).float(), (target["label"][keep] > 0).float()

    return transform


def labelled_cls(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for :class:`ClassificationMetrics`: class probabilities and classes."""
    probs = output["pred"]["cls"]
    cls = output["label"]["class"]
    if probs is None:
        return torch.zeros((0, 1)), torch.zeros(0, dtype=torch.long)
    keep = output["label"]["has_class"].bool() & (cls >= 0)
    return probs[keep].float(), cls[keep].long()


class LabelledMeanDice(MeanDice):
    """MONAI's ``MeanDice`` handler that skips batches in which no case has a mask (a case
    without a mask is left out by :func:`labelled_seg`; MONAI's metric cannot take an empty batch)."""

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        y_pred, y = output
        if len(y_pred) == 0:
            return
        self._seen = True
        super().update(output)

    def reset(self) -> None:
        self._seen = False
        super().reset()

    def compute(self) -> Any:
        """Mean Dice, or ``nan`` when no evaluated case had a mask."""
        return super().compute() if self._seen else float("nan")


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``target`` (sklearn's definition)."""
    recalls = [float((pred[target == k] == k).float().mean()) for k in range(num_classes) if (target == k).any()]
    return sum(recalls) / len(recalls)


CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auc")


class ClassificationMetrics(Metric):
    """Accuracy, balanced accuracy and macro one-vs-rest ROC AUC of a classifier (Ignite metric).

    With ``metric`` set (one of ``accuracy``, ``balanced_accuracy``, ``auc``) it is a scalar
    metric stored under the name it is attached with (so any of them can be the evaluator's key
    metric); without, it writes all three (prefixed by ``prefix``) into ``engine.state.metrics``.
    Values are ``nan`` when no evaluated case has a class (a segmentation-only split), AUC also
    when fewer than two classes are present. Cases without a class are excluded by the output
    transform (:func:`labelled_cls`).
    """

    def __init__(self, num_classes: int, metric: str | None = None, prefix: str = "",
                 output_transform: Callable = labelled_cls, device: str | torch.device = "cpu") -> None:
        if metric is not None and metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {metric!r}")
        self.num_classes = num_classes
        self.metric = metric
        self.prefix = prefix
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        probs, target = output
        if probs.numel() and probs.shape[-1] == self.num_classes:
            self._probs.append(probs.detach().cpu())
            self._targets.append(target.detach().cpu())

    def _values(self) -> dict[str, float]:
        if not self._probs:
            return dict.fromkeys(CLASSIFICATION_METRICS, float("nan"))
        probs = torch.cat(self._probs)
        target = torch.cat(self._targets)
        pred = probs.argmax(1)
        onehot = torch.nn.functional.one_hot(target, self.num_classes)
        present = onehot.sum(0) > 0
        auc = float(compute_roc_auc(probs[:, present], onehot[:, present], average="macro")) \
            if int(present.sum()) >= 2 else float("nan")
        return {
            "accuracy": float((pred == target).float().mean()),
            "balanced_accuracy": balanced_accuracy(pred, target, self.num_classes),
            "auc": auc,
        }

    def compute(self) -> float | dict[str, float]:
        values = self._values()
        if self.metric is not None:
            return values[self.metric]
        return {f"{self.prefix}{k}": v for k, v in values.items()}


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, final_fraction: float = 1.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from its initial value to ``final_fraction`` of it at
    ``epochs`` (stepped once per epoch); ``final_fraction = 1`` keeps it constant (the study).

    Hand-written as a ``LambdaLR`` rather than ``CosineAnnealingLR`` because the latter stores
    ``T_max`` in its state: a run resumed with a larger ``--epochs`` would keep the old horizon
    and the learning rate would climb back up. Here only the epoch count is restored.
    """

    def factor(epoch: int) -> float:
        t = min(epoch, epochs) / max(epochs, 1)
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


_EPOCH_RE = re.compile(r"epoch=(\d+)")
logger = logging.getLogger(__name__)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (zip with its central directory and
    a ``data.pkl`` record), without unpickling it. A file cut short by a kill or a full disk is not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> str | None:
    """Path of the newest complete ``<prefix>_epoch=N.pt`` in ``ckpt_dir`` (highest N), or ``None``.

    A truncated file (a run killed while writing it, before checkpoints were atomic, or a full
    disk) is skipped with a warning, so the run resumes from the newest checkpoint that loads.
    """
    d = Path(ckpt_dir)
    found = sorted(((int(m.group(1)), p) for p in d.glob(f"{prefix}*.pt") if (m := _EPOCH_RE.search(p.name))),
                   reverse=True)
    for _, path in found:
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("checkpoint %s is incomplete (cut short while written?): skipped for resuming", path)
    return None


class _SaveThenRemoveDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes atomically and deletes a superseded checkpoint only
    after its successor is on disk.

    Ignite's ``Checkpoint`` asks its saver to remove the oldest file *before* writing the new
    one, and MONAI's saver writes in place: a run killed during the save of epoch N+1 was left
    with no complete checkpoint at all. Here removals are deferred until the next write has
    succeeded. ``filename`` fixes the file name (as MONAI's own saver does for ``model.pt``).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        written = self.filename or filename
        super().__call__(checkpoint, written, metadata)  # temporary file + os.replace
        for old in self._superseded:
            if old != written and (self.dirname / old).exists():
                (self.dirname / old).unlink()
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        # a fixed-name file is replaced atomically by the next write: nothing to delete
        if self.filename is None:
            self._superseded.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are written atomically (temporary file in the same
    folder, then ``os.replace``) and whose previous checkpoint is deleted only once the new one
    is complete, so a run killed at any moment can resume from a whole checkpoint.

    It also has ``state_dict`` (MONAI's saver only has ``load_state_dict``): the best key metric
    seen so far, so a resumed run keeps ``model.pt`` unless it beats the score from before the
    interruption (put the saver in the resumable checkpoint, :func:`checkpoint_objects`).

    Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _SaveThenRemoveDiskSaver(ckpt.save_handler.dirname,
                                                             getattr(ckpt.save_handler, "filename", None))
        if self._key_metric_checkpoint is not None:
            # a NaN key metric (no validation case could be scored) would stay "best" for ever, as
            # nothing compares greater than NaN: count it as the worst score instead
            score = self._key_metric_checkpoint.score_function

            def finite_score(engine: Engine) -> float:
                value = score(engine)
                return -math.inf if value != value else value

            self._key_metric_checkpoint.score_function = finite_score

    def state_dict(self) -> dict[str, Any]:
        """The key-metric tracking list (``{"_saved": [(score, filename)]}``), or ``{}``."""
        return dict(self._key_metric_checkpoint.state_dict()) if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


def checkpoint_objects(trainer: Engine, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       lr_scheduler: Any = None, best_model_saver: AtomicCheckpointSaver | None = None
                       ) -> dict[str, Any]:
    """What a resumable checkpoint holds: network, optimizer, scheduler, AMP grad scaler (when
    AMP is on), the trainer's state (epoch, iteration) and the best key metric so far (the
    validation ``best_model_saver``, so ``model.pt`` stays the best of the whole run)."""
    objs: dict[str, Any] = {"network": network, "optimizer": optimizer, "trainer": trainer}
    if lr_scheduler is not None:
        objs["lr_scheduler"] = lr_scheduler
    if best_model_saver is not None:
        objs["best_model"] = best_model_saver
    if getattr(trainer, "scaler", None) is not None:
        objs["scaler"] = trainer.scaler
    return objs


def resumable(checkpoint: str | Path | None, objects: dict[str, Any]) -> dict[str, Any]:
    """The part of ``objects`` (:func:`checkpoint_objects`) that ``checkpoint`` holds.

    A checkpoint from a run with AMP off has no grad scaler, one from an older version no
    best-model state: those objects start fresh (with a warning) instead of the resume failing.
    """
    if checkpoint is None:
        return objects
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    missing = [k for k in objects if k not in saved]
    if "network" in missing or "trainer" in missing:
        from pipeline.errors import InputError

        raise InputError(checkpoint, "not a resumable training checkpoint (no network or trainer state)")
    if missing:
        logger.warning("checkpoint %s holds no %s: starting those fresh", checkpoint, missing)
    return {k: v for k, v in objects.items() if k in saved}


class EvaluationReport:
    """Evaluator handler: per-case Dice and class probabilities to ``cases.csv`` and the run's
    summary (every metric of ``engine.state.metrics`` plus ``dice`` and counts) to
    ``metrics.json``, both written atomically in ``output_dir`` when the evaluation completes.

    Args:
        output_dir: folder for ``metrics.json`` and ``cases.csv``.
        class_names: names of the classes (CSV columns ``p_<name>``).
        threshold: tumour probability threshold.
        key_map: summary name -> ``engine.state.metrics`` name (e.g. ``dice`` -> ``val_mean_dice``).
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], threshold: float = 0.5,
                 key_map: dict[str, str] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.threshold = threshold
        self.key_map = key_map or {"dice": "val_mean_dice", "accuracy": "val_accuracy",
                                   "balanced_accuracy": "val_balanced_accuracy", "auc": "val_auc"}
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        from monai.metrics import compute_dice

        out, batch = engine.state.output, engine.state.batch
        seg, cls_prob, target = out["pred"]["seg"], out["pred"]["cls"], out["label"]
        ids = batch.get("id", [f"case{len(self.rows) + i}" for i in range(seg.shape[0])])
        for b, cid in enumerate(ids):
            row: dict[str, Any] = {"id": cid}
            pred_mask = (seg[b:b + 1] >= self.threshold).float()
            if int(target["has_label"][b]):
                truth = (target["label"][b:b + 1] > 0).float()
                row["dice"] = float(compute_dice(pred_mask, truth, include_background=True, ignore_empty=False).item())
                row["true_volume_vox"] = int(truth.sum())
            row["pred_volume_vox"] = int(pred_mask.sum())
            c = int(target["class"][b])
            row["true_class"] = self.class_names[c] if c >= 0 else ""
            if cls_prob is not None:
                for k, name in enumerate(self.class_names):
                    row[f"p_{name}"] = round(float(cls_prob[b, k]), 6)
                row["predicted_class"] = self.class_names[int(cls_prob[b].argmax())]
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        import csv
        import io
        import json
        import math

        from pipeline.imageio import write_text_atomic

        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, int | float)}
        summary: dict[str, Any] = {name: metrics.get(src, float("nan")) for name, src in self.key_map.items()}
        dices = [r["dice"] for r in self.rows if "dice" in r]
        summary.update({
            "dice_std": float(torch.tensor(dices).std()) if len(dices) > 1 else float("nan"),
            "n_cases": len(self.rows),
            "n_with_mask": len(dices),
            "n_with_class": sum(1 for r in self.rows if r.get("true_class")),
            "metrics": metrics,
        })
        clean = json.loads(json.dumps(summary, default=float), parse_constant=lambda _: None)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in clean.items()}
        write_text_atomic(self.output_dir / "metrics.json", json.dumps(clean, indent=1))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.output_dir / "cases.csv", buf.getvalue())


def print_summary(eval_dir: str | Path) -> dict[str, Any]:
    """Print the headline figures of ``eval_dir/metrics.json`` (written by :class:`EvaluationReport`)."""
    import json

    path = Path(eval_dir) / "metrics.json"
    summary = json.loads(path.read_text())

    def fmt(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"evaluation on {summary['n_cases']} cases ({summary['n_with_mask']} with mask, "
          f"{summary['n_with_class']} with class): Dice {fmt('dice')} (sd {fmt('dice_std')}), "
          f"accuracy {fmt('accuracy')}, balanced accuracy {fmt('balanced_accuracy')}, AUC {fmt('auc')}")
    print(f"per-case results: {Path(eval_dir) / 'cases.csv'}; summary: {path}")
    return summary
