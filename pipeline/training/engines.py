"""Plumbing that lets MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` (Ignite)
train and evaluate a network with two outputs.

MONAI's engines already do AMP, gradient scaling, accumulation, events and handlers; what
they lack for multi-task learning is small and lives here:

- :class:`MultiTaskPrepareBatch`: image -> inputs; mask, class and the has-label flags -> a
  target dict (so the loss can drop the term of a missing task per sample).
- :class:`LossTermsHandler`: puts the loss components and the learning rate into each
  iteration's output so Stats/TensorBoard handlers log them.
- :class:`ClassificationMetrics`: accuracy, balanced accuracy and macro one-vs-rest AUC
  (MONAI ``compute_roc_auc``) over the cases that have a class.
- output transforms for the metric handlers.

Checkpoint handling lives in :mod:`pipeline.training.checkpoints`, evaluation outputs in
:mod:`pipeline.evaluation.report`, the evaluator's inferer in :mod:`pipeline.inference.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import MeanDice
from monai.metrics import compute_dice, compute_roc_auc
from monai.metrics.utils import do_metric_reduction

from pipeline.runtime import distributed

__all__ = [
    "MultiTaskPrepareBatch",
    "LossTermsHandler",
    "ClassificationMetrics",
    "balanced_accuracy",
    "labelled_seg",
    "image_and_label",
    "seg_picture",
    "LabelledMeanDice",
    "labelled_cls",
    "loss_output",
    "cosine_schedule",
    "param_groups",
    "validation_metrics",
    "pick_metrics",
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
        mask_to_inferer: also hand the cases' masks to the inferer (``(image, target, (), {"mask":
            ...})``, MONAI's evaluator passes them on): the 2-D classifier alone weighs its slices by
            the true tumour area, having no decoder to find the tumour (``configs/cls2d.json``).
    """

    def __init__(self, cls_needs_tumour: bool = False, mask_to_inferer: bool = False) -> None:
        self.cls_needs_tumour = cls_needs_tumour
        self.mask_to_inferer = mask_to_inferer

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
            "image": image,  # what the reconstruction branch reconstructs (its image channels)
        }
        if self.cls_needs_tumour:
            shows_tumour = (target["label"] > 0).flatten(1).any(1)
            target["has_class"] = target["has_class"] * (shows_tumour | (target["has_label"] == 0)).to(
                target["has_class"].dtype)
        if self.mask_to_inferer:
            known = target["has_label"].view(-1, *[1] * (image.dim() - 1)) > 0
            return image, target, (), {"mask": target["label"] * known}
        return image, target


class LossTermsHandler:
    """After each loss computation, copy the loss components and the learning rate into
    ``engine.state.output`` (keys ``loss_seg``, ``loss_cls``, ``loss_recon``, ``loss_det``, ``lr``, and the learnt task
    weights ``w_seg`` / ``w_cls`` under ``mtl_method: uncertainty`` and ``gradnorm``) for the logging handlers."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        terms = getattr(engine.loss_function, "last_terms", {})
        out = engine.state.output
        for key in ("seg", "cls", "recon", "det"):
            if key in terms:
                out[f"loss_{key}"] = float(terms[key])
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        loss = engine.loss_function
        if getattr(loss, "log_vars", None) is not None or getattr(loss, "balanced", False):  # learnt task weights
            out.update(loss.task_weights())


def loss_output(output: dict) -> dict[str, float]:
    """Trainer output -> scalars to log: total loss, each component (when computed), lr."""
    loss = output["loss"]
    logged = {"loss": float(loss.detach() if isinstance(loss, torch.Tensor) else loss)}
    for key in ("loss_seg", "loss_cls", "loss_recon", "loss_det", "lr", "grad_seg", "grad_cls", "grad_cos", "grad_conflict", "w_seg", "w_cls"):
        value = output.get(key)
        if value is not None and value == value:  # skip NaN (no sample for that task in the batch)
            logged[key] = float(value)
    return logged


def labelled_seg(threshold: float = 0.5) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform for ``MeanDice``: thresholded prediction and mask of the cases with a mask."""

    def transform(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        target = output["label"]
        if output["pred"]["seg"] is None:  # the classifier alone: no mask to score
            return torch.zeros(0), torch.zeros(0)
        keep = target["has_label"].bool()
        return (output["pred"]["seg"][keep] >= threshold).float(), (target["label"][keep] > 0).float()

    return transform


def image_and_label(batch: dict) -> tuple[Any, Any]:
    """Batch transform for ``TensorBoardImageHandler``: the batch's image and true mask."""
    return batch["image"], batch["label"]


def seg_picture(output: dict) -> Any:
    """Output transform for ``TensorBoardImageHandler``: the predicted tumour probabilities, or
    ``[None]`` (no picture) for a network without decoder."""
    seg = output["pred"]["seg"]
    return [None] if seg is None else seg


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
    without a mask is left out by :func:`labelled_seg`; MONAI's metric cannot take an empty batch).

    Under a process group (``multi_gpu_train.json``) the per-case Dice of every rank is gathered in
    the single-process order (:func:`pipeline.runtime.distributed.gather_in_sampler_order`) and reduced as
    MONAI's metric would, so the value equals a one-process evaluation of the same cases. MONAI's own
    buffer gathering is not used there: a rank without a masked case has no buffer, skips the
    all-gather and leaves the others waiting for ever.
    """

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        y_pred, y = output
        if not distributed.is_distributed():
            if len(y_pred):
                self._seen = True
                super().update(output)
            return
        if len(y_pred) == 0:
            self._rows.append(None)
            return
        fn = self.metric_fn
        self._rows.append(compute_dice(y_pred.detach(), y.detach(), include_background=fn.include_background,
                                       ignore_empty=fn.ignore_empty).cpu())

    def reset(self) -> None:
        self._seen = False
        self._rows: list[torch.Tensor | None] = []
        super().reset()

    def compute(self) -> Any:
        """Mean Dice, or ``nan`` when no evaluated case had a mask."""
        if not distributed.is_distributed():
            return super().compute() if self._seen else float("nan")
        rows = [r for r in distributed.gather_in_sampler_order(self._rows) if r is not None]
        if not rows:
            return float("nan")
        value, _ = do_metric_reduction(torch.cat(rows), self.metric_fn.reduction)
        return float(value)


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
    transform (:func:`labelled_cls`). Under a process group every rank's cases are gathered
    before the values are computed, so they equal a one-process evaluation of the same cases.
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
        elif distributed.is_distributed():  # keeps the iterations aligned for the gathering
            self._probs.append(torch.zeros((0, self.num_classes)))
            self._targets.append(torch.zeros(0, dtype=torch.long))

    def _values(self) -> dict[str, float]:
        # under a process group: every rank's cases, in the single-process order
        pairs = distributed.gather_in_sampler_order(list(zip(self._probs, self._targets, strict=True)))
        if not any(len(t) for _, t in pairs):
            return dict.fromkeys(CLASSIFICATION_METRICS, float("nan"))
        probs = torch.cat([p for p, _ in pairs])
        target = torch.cat([t for _, t in pairs])
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


def param_groups(network: torch.nn.Module, lr: float, head_lr_factor: float = 1.0,
                 loss: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the classifier head at ``lr * head_lr_factor``, the rest at ``lr``;
    the loss's own parameters (the learnt task weights of ``mtl_method: uncertainty``,
    :class:`pipeline.models.losses.MultiTaskLoss`), when it has any, at ``lr`` without weight decay.

    The head is a few thousand weights on top of an encoder that Adam moves at ``lr``; with the
    demo's few hundred steps it barely leaves its initial state at the encoder's rate (training
    cross-entropy still near chance after 22 epochs on an unseen cohort seed), so it may learn faster.
    Frozen parameters (``requires_grad = False``, :mod:`pipeline.training.staging`) are left out.
    """
    trained = [p for p in network.parameters() if p.requires_grad]
    own = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    extra = [{"params": own, "lr": lr, "weight_decay": 0.0}] if own else []
    head = getattr(distributed.unwrap(network), "classifier", None)
    if head is None or head_lr_factor == 1.0:
        return [{"params": trained, "lr": lr}, *extra]
    head_ids = {id(p) for p in head.parameters() if p.requires_grad}
    groups = [{"params": [p for p in trained if id(p) not in head_ids], "lr": lr},
              {"params": [p for p in trained if id(p) in head_ids], "lr": lr * head_lr_factor}, *extra]
    return [g for g in groups if g["params"]]


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


def validation_metrics(segmentation: dict, classification: dict, multitask: bool = True,
                       detection: dict | None = None, detect: bool = False) -> dict:
    """The validation metrics by name: the segmentation ones, the classification ones when the
    network classifies (``multitask``), the detection ones when it detects (``detect``)."""
    return {**segmentation, **(classification if multitask else {}), **((detection or {}) if detect else {})}


def pick_metrics(metrics: dict, names: Sequence[str] = (), exclude: Sequence[str] = ()) -> dict:
    """``metrics`` restricted to ``names`` (all when empty) and without ``exclude``: the evaluator's
    ``key_val_metric`` (``names=[key]``) and ``additional_metrics`` (``exclude=[key]``).

    Raises:
        KeyError: a name in ``names`` that is not a metric, with the ones there are.
    """
    missing = [n for n in names if n not in metrics]
    if missing:
        raise KeyError(f"metric(s) {missing} not among {sorted(metrics)}")
    return {k: v for k, v in metrics.items() if (not names or k in names) and k not in exclude}
