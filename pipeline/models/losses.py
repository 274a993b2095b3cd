"""MultiTaskLoss: the study's ``L = L_seg + w * L_cls`` with per-sample masking of missing labels, an
optional reconstruction term ``+ w_rec * MSE`` (the auxiliary branch of ``configs/recon.json``), and the
multi-task methods by name (:data:`MTL_METHODS`): the loss itself implements ``uncertainty`` and holds
``gradnorm``'s weights, the gradient rules (``pcgrad``, ``stop`` and ``gradnorm``'s update of its weights)
live in :mod:`pipeline.training.gradients`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from pipeline.io.errors import InputError
from pipeline.runtime import distributed

__all__ = ["MultiTaskLoss", "MTL_METHODS", "SEG_LOSSES"]

#: How the two tasks share the encoder (``mtl_method``): ``fixed``, the study's ``L_seg + w L_cls``;
#: ``uncertainty``, each term weighted by a learnt homoscedastic uncertainty (Kendall, Gal and
#: Cipolla 2018); ``pcgrad``, gradient surgery on the encoder (Yu et al. 2020); ``stop``, the class
#: gradient stopped below the deepest ``cls_grad_levels`` encoder levels; ``gradnorm``, the weights
#: moved so that both terms pull on the encoder's deepest level at rates set by their training progress
#: (Chen et al. 2018).
MTL_METHODS: tuple[str, ...] = ("fixed", "uncertainty", "pcgrad", "stop", "gradnorm")

#: The segmentation term (``seg_loss``): ``dice``, the study's soft Dice; ``dice_ce``, the Dice plus the
#: binary cross-entropy (nnU-Net's Dice + CE for one sigmoid channel); ``dice_focal``, the Dice plus the
#: binary focal loss (the 2-D study's).
SEG_LOSSES: tuple[str, ...] = ("dice", "dice_ce", "dice_focal")


class MultiTaskLoss(nn.Module):
    """Soft Dice (squared denominators, sigmoid, over the batch) + ``w`` x class-weighted CE.

    ``L_seg = 1 - 2 sum(p g) / (sum(p^2) + sum(g^2) + eps)`` over every voxel of every sample
    that has a mask (MONAI ``DiceLoss(sigmoid=True, squared_pred=True, batch=True)``), and
    ``L_cls`` = cross-entropy weighted by class (``weight[c] * CE``, normalised by the summed
    weights as in ``torch.nn.CrossEntropyLoss``) over the samples that have a class. A sample
    without a mask adds no segmentation term, one without a class no classification term; a
    batch with neither gives a zero loss that still back-propagates (zero gradients).

    With a reconstruction output (the network's fourth, ``reconstruct=True``), ``L_rec`` is the mean
    squared error between it and the input image's channels over every voxel of every sample (a
    case without mask or class still trains it). ``L = w_seg L_seg + w L_cls + w_rec L_rec``; a
    term whose weight is 0 is not computed (staged training, :mod:`pipeline.training.staging`).

    Args:
        cls_weight: ``w`` (study: 0.3). ``0`` or a network without a head: segmentation only.
        class_weights: per-class CE weights (e.g. inverse training frequencies from
            :func:`pipeline.data.datalist.class_weights`); ``None`` = uniform.
        eps: denominator smoothing of the Dice term.
        seg_weight: ``w_seg`` (1; 0 in a stage that does not train the segmentation).
        recon_weight: ``w_rec`` (0: no reconstruction term even if the network reconstructs).
        seg_loss: one of :data:`SEG_LOSSES`: ``dice`` (the study), ``dice_ce`` (the Dice plus the binary
            cross-entropy, mean over the voxels of the samples with a mask: nnU-Net's Dice + CE) or
            ``dice_focal`` (the Dice plus the binary focal loss, MONAI ``FocalLoss`` on the sigmoid with
            ``focal_gamma``, the same mean: the 2-D study's segmentation loss, ``configs/mtl2d.json``).
        focal_gamma: the focal loss's exponent.
        mtl_method: one of :data:`MTL_METHODS`. ``uncertainty`` replaces the fixed weights of the
            segmentation and class terms by learnt ones: each term ``L_i`` becomes
            ``exp(-s_i) L_i + s_i / 2`` (``s_i = log sigma_i^2``, Kendall et al.'s classification
            form, used for the Dice term too), ``s`` a parameter of this module (the optimizer
            must get :meth:`parameters`; ``train.json`` passes the loss to
            :func:`pipeline.training.engines.param_groups`) that starts at ``-log(w)`` so the first
            steps weigh as ``fixed``; at its optimum a term weighs ``1 / (2 L_i)``, so the class term
            loses weight as the segmentation improves. ``gradnorm``: the weights are this module's
            buffers ``task_w`` (starting at ``w_seg``, ``w``; their sum kept), moved between steps by
            :class:`pipeline.training.gradients.EncoderGradientRule`; ``initial_terms`` holds the
            first step's unweighted losses (GradNorm's ``L_i(0)``); both are in the resumable
            checkpoint. The other methods leave the loss as ``fixed`` (their rule acts on the gradients).

        det_weight: ``w_det`` of the detection term (0: off, the default): with a detection output (the
            network's last, ``detect=True``), ``L_det`` = the anchors' classification loss + the box
            regression loss of :class:`pipeline.models.detection.LesionDetector`, over the samples
            that have a mask, each lesion of the mask patch above ``det_min_volume_mm3`` a target box
            (a sample without a mask gives no box targets and no term, as for the other heads).
        detector: the :class:`~pipeline.models.detection.LesionDetector` (needed when ``det_weight > 0``).
        det_min_volume_mm3: the smallest lesion that is a target.

    :meth:`compute` takes the tensors explicitly; :meth:`forward` is the MONAI-engine adapter
    (``loss(pred, target)`` with the network's output tuple and the target dict from
    :class:`pipeline.training.engines.MultiTaskPrepareBatch`) and returns the total, keeping the
    components of the last call in ``last_terms`` for logging.

    Returns (compute):
        dict with ``loss`` (total, scalar tensor), ``seg``, ``cls`` and ``recon`` (detached
        components, ``nan`` when the batch has no sample for that task or the term is off) and
        ``n_seg`` / ``n_cls``.

    Example:
        >>> loss = MultiTaskLoss(cls_weight=0.3, class_weights=[1.0, 2.0, 1.0])
        >>> out = loss.compute(seg_logits, cls_logits, masks, classes, has_label, has_class)
        >>> out["loss"].backward()
    """

    def __init__(self, cls_weight: float = 0.3, class_weights: Sequence[float] | torch.Tensor | None = None,
                 eps: float = 1e-5, seg_weight: float = 1.0, recon_weight: float = 0.0, seg_loss: str = "dice",
                 focal_gamma: float = 2.0, mtl_method: str = "fixed", det_weight: float = 0.0,
                 detector: nn.Module | None = None, det_min_volume_mm3: float = 50.0) -> None:
        super().__init__()
        if seg_loss not in SEG_LOSSES:
            raise InputError(None, f"seg_loss must be one of {', '.join(SEG_LOSSES)}, got {seg_loss!r}")
        if mtl_method not in MTL_METHODS:
            raise InputError(None, f"mtl_method must be one of {', '.join(MTL_METHODS)}, got {mtl_method!r}")
        self.mtl_method = mtl_method
        # binary cross-entropy is the focal loss at gamma 0 (MONAI's FocalLoss weighs by exp(0 * ...) = 1)
        gamma = 0.0 if seg_loss == "dice_ce" else focal_gamma
        self.focal = FocalLoss(use_softmax=False, gamma=gamma, reduction="none") if seg_loss != "dice" else None
        self.cls_weight = float(cls_weight)
        self.seg_weight = float(seg_weight)
        self.recon_weight = float(recon_weight)
        self.det_weight = float(det_weight)
        if self.det_weight > 0 and detector is None:
            raise InputError(None, "det_weight > 0 needs the detector (pipeline.models.detection.LesionDetector)")
        self.detector = detector if self.det_weight > 0 else None
        self.det_min_volume_mm3 = float(det_min_volume_mm3)
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, batch=True, smooth_nr=0.0, smooth_dr=eps)
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w, persistent=False)
        self.last_terms: dict[str, torch.Tensor] = {}
        # learnt only when both tasks train: with one term there is nothing to balance
        learnt = mtl_method == "uncertainty" and self.seg_weight > 0 and self.cls_weight > 0
        self.log_vars = (nn.Parameter(torch.tensor([-math.log(self.seg_weight), -math.log(self.cls_weight)]))
                         if learnt else None)
        self.balanced = mtl_method == "gradnorm" and self.seg_weight > 0 and self.cls_weight > 0
        if self.balanced:
            self.register_buffer("task_w", torch.tensor([self.seg_weight, self.cls_weight]))
            self.register_buffer("initial_terms", torch.full((2,), float("nan")))

    def _weighted(self, seg: torch.Tensor, ce: torch.Tensor, n_seg: int, n_cls: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(segmentation term, class term, regulariser)``: the weighted losses (what moves the
        network) and the uncertainty weighting's ``sum s_i / 2`` over the present terms."""
        if self.balanced:
            w = self.task_w.to(seg.device, copy=True)  # the rule moves task_w before this step's backward pass
            return w[0] * seg, w[1] * ce, seg.new_zeros(())
        if self.log_vars is None:
            return self.seg_weight * seg, self.cls_weight * ce, seg.new_zeros(())
        s = self.log_vars.to(seg.device)
        reg = seg.new_zeros(()) + (0.5 * s[0] if n_seg else 0.0) + (0.5 * s[1] if n_cls else 0.0)
        return torch.exp(-s[0]) * seg, torch.exp(-s[1]) * ce, reg

    def task_weights(self) -> dict[str, float]:
        """The current weights of the segmentation and class terms (``w_seg``, ``w_cls``)."""
        if self.balanced:
            w = self.task_w.tolist()
            return {"w_seg": w[0], "w_cls": w[1]}
        if self.log_vars is None:
            return {"w_seg": self.seg_weight, "w_cls": self.cls_weight}
        w = torch.exp(-self.log_vars.detach()).tolist()
        return {"w_seg": w[0], "w_cls": w[1]}

    def forward(self, pred: tuple | list, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """Engine adapter: ``pred = (seg_logits, class_logits | None, embedding[, reconstruction])``,
        ``target`` with keys ``label``, ``class``, ``has_label``, ``has_class`` (and ``image``, the
        network's input, for the reconstruction term). Returns the total loss."""
        det = pred[-1] if isinstance(pred[-1], (list, tuple)) else None
        recon = pred[3] if len(pred) > 3 and isinstance(pred[3], torch.Tensor) else None
        terms = self.compute(pred[0], pred[1], target["label"], target["class"],
                             target.get("has_label"), target.get("has_class"), recon, target.get("image"), det)
        self.last_terms = terms
        return terms["loss"]

    def compute(
        self,
        seg_logits: torch.Tensor | None,
        cls_logits: torch.Tensor | None,
        mask: torch.Tensor,
        cls: torch.Tensor,
        has_label: torch.Tensor | None = None,
        has_class: torch.Tensor | None = None,
        recon: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        det: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args: ``seg_logits`` / ``mask`` ``(B, 1, H, W, D)``; ``cls_logits`` ``(B, K)`` or None;
        ``cls`` ``(B,)`` int (``-1`` = unknown); ``has_label`` / ``has_class`` ``(B,)`` 0/1
        (default: every mask present; class present where ``cls >= 0``). ``seg_logits`` is ``None``
        for a network without decoder (the classifier alone): no segmentation term. ``recon``
        ``(B, C, H, W, D)`` and ``image`` (whose first ``C`` channels it reconstructs): the
        reconstruction term, when ``recon_weight > 0``. ``det``: the detection head's maps, the
        detection term when ``det_weight > 0``."""
        if seg_logits is None and cls_logits is None:
            raise ValueError("the network returned neither segmentation nor class logits")
        ref = seg_logits if seg_logits is not None else cls_logits
        b = ref.shape[0]
        dev = ref.device
        has_label = torch.ones(b, dtype=torch.bool, device=dev) if has_label is None else has_label.to(dev).bool().view(-1)
        has_mask = has_label  # the detection's targets come from the mask whatever the segmentation's weight
        if seg_logits is None or self.seg_weight == 0:
            has_label = torch.zeros_like(has_label)
        use_recon = recon is not None and self.recon_weight > 0
        if use_recon and image is None:
            raise ValueError("the reconstruction term needs the input image (target['image'])")
        cls = cls.to(dev).long().view(-1)
        has_class = (cls >= 0) if has_class is None else (has_class.to(dev).bool().view(-1) & (cls >= 0))
        zero = ref.float().sum() * 0.0  # keeps the graph: a valid loss with zero gradients
        if self.det_weight > 0 and det is None:
            raise InputError(None, "det_weight > 0 but the network has no detection head (set detect: true)")
        use_det = self.det_weight > 0 and bool(has_mask.any())
        det_loss = self._detection(det, mask, has_mask) if use_det else zero
        if distributed.is_distributed():
            out = self._whole_batch(seg_logits, cls_logits, mask, cls, has_label, has_class,
                                    recon if use_recon else None, image)
            if self.det_weight > 0:
                # each process's own samples: DDP's gradient average is the mean over processes
                out["loss"] = out["loss"] + self.det_weight * (det_loss + sum(m.float().sum() * 0.0 for m in det))
                out["det"] = det_loss.detach() if use_det else torch.tensor(float("nan"), device=dev)
            return out

        n_seg = int(has_label.sum())
        seg = self.dice(seg_logits[has_label].float(), (mask[has_label] > 0).float()) if n_seg else zero
        if n_seg and self.focal is not None:
            seg = seg + self.focal(seg_logits[has_label].float(), (mask[has_label] > 0).float()).mean()

        n_cls = int(has_class.sum()) if cls_logits is not None and self.cls_weight > 0 else 0
        if n_cls:
            weight = None if self.class_weights is None else self.class_weights.to(dev)
            ce = F.cross_entropy(cls_logits[has_class].float(), cls[has_class], weight=weight)
        else:
            ce = zero
        rec = F.mse_loss(recon.float(), image[:, : recon.shape[1]].float()) if use_recon else zero
        seg_term, cls_term, reg = self._weighted(seg, ce, n_seg, n_cls)
        total = seg_term + cls_term + self.recon_weight * rec + reg + self.det_weight * det_loss
        nan = torch.tensor(float("nan"), device=dev)
        # the weighted terms with their graph, for the gradient statistics and rules (pipeline.training.gradients)
        graph = {"seg_term": seg_term, "cls_term": cls_term} if n_seg and n_cls else {}
        return {
            "loss": total,
            **graph,
            "seg": seg.detach() if n_seg else nan,
            "cls": ce.detach() if n_cls else nan,
            "recon": rec.detach() if use_recon else nan,
            "det": det_loss.detach() if use_det else nan,
            "n_seg": torch.tensor(n_seg),
            "n_cls": torch.tensor(n_cls),
        }

    def _detection(self, det: Sequence[torch.Tensor], mask: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
        """The detection term over the samples with a mask: anchor classification + box regression
        against the boxes of the mask patch's lesions."""
        from pipeline.models.detection import mask_box_targets

        keep = has_label.nonzero().view(-1)
        maps = [m[keep].float() for m in det]
        boxes = mask_box_targets(mask[keep], self.detector.spacing_mm, self.det_min_volume_mm3)
        cls_loss, box_loss = self.detector.loss(maps, boxes, mask.shape[2:])
        return cls_loss + box_loss

    def _whole_batch(self, seg_logits: torch.Tensor | None, cls_logits: torch.Tensor | None, mask: torch.Tensor,
                     cls: torch.Tensor, has_label: torch.Tensor, has_class: torch.Tensor,
                     recon: torch.Tensor | None = None, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss of the global batch (every process's samples), identical on every rank.

        Each process sums its part of the Dice's intersection / denominator and of the weighted
        cross-entropy's numerator / denominator; :func:`pipeline.runtime.distributed.all_reduce_sum` adds
        them over the processes (differentiably), so DDP's gradient average equals one process's
        gradient on the whole batch: the batch-level Dice and the class-weighted mean do not
        decompose into a mean of per-process losses. Every output enters the loss (times 0 where a
        process has no sample for a task), so every parameter has a gradient on every rank (DDP).
        """
        dev = (seg_logits if seg_logits is not None else cls_logits).device
        keep = sum(o.float().sum() * 0.0 for o in (seg_logits, cls_logits, recon) if o is not None)
        if seg_logits is not None and self.seg_weight > 0:
            p = torch.sigmoid(seg_logits[has_label].float())
            g = (mask[has_label] > 0).float()
            dims = [0, *range(2, p.dim())]  # MONAI DiceLoss(batch=True): sums over samples and voxels per channel
            part = torch.cat([(p * g).sum(dims), (p * p).sum(dims) + (g * g).sum(dims)]) + keep
            if self.focal is not None:  # summed focal loss and voxel count: the global batch's mean
                f = self.focal(seg_logits[has_label].float(), g)
                focal_part = torch.stack([f.sum(), torch.tensor(float(f.numel()), device=dev)]) + keep
        else:
            part = keep.view(1).expand(2)
            focal_part = keep.view(1).expand(2)
        if self.focal is None:
            focal_part = keep.view(1)[:0]
        use_cls = cls_logits is not None and self.cls_weight > 0
        if use_cls:
            ce = F.cross_entropy(cls_logits[has_class].float(), cls[has_class], reduction="none")
            w = (self.class_weights.to(dev)[cls[has_class]] if self.class_weights is not None
                 else torch.ones_like(ce))
            cls_part = torch.stack([(w * ce).sum(), w.sum()]) + keep
        else:
            cls_part = keep.view(1).expand(2)
        if recon is not None:  # summed squared error and voxel count: the global batch's mean
            err = (recon.float() - image[:, : recon.shape[1]].float()) ** 2
            rec_part = torch.stack([err.sum(), torch.tensor(float(err.numel()), device=dev)]) + keep
        else:
            rec_part = keep.view(1).expand(2)
        counts = torch.tensor([float(has_label.sum()) if seg_logits is not None and self.seg_weight > 0 else 0.0,
                               float(has_class.sum()) if use_cls else 0.0], device=dev)
        total = distributed.all_reduce_sum(torch.cat([part, focal_part, cls_part, rec_part, counts]))
        c = part.numel() // 2
        o = 2 * c + focal_part.numel()  # where the class term's sums start
        n_seg, n_cls = int(total[-2]), int(total[-1])
        seg = (1.0 - 2.0 * total[:c] / (total[c:2 * c] + self.dice.smooth_dr)).mean() if n_seg else keep
        if n_seg and self.focal is not None:
            seg = seg + total[2 * c] / total[2 * c + 1]
        ce_all = total[o] / total[o + 1] if n_cls else keep
        rec = total[o + 2] / total[o + 3] if recon is not None else keep
        nan = torch.tensor(float("nan"), device=dev)
        seg_term, cls_term, reg = self._weighted(seg, ce_all, n_seg, n_cls)
        return {
            "loss": seg_term + cls_term + self.recon_weight * rec + reg + keep,
            "seg": seg.detach() if n_seg else nan,
            "cls": ce_all.detach() if n_cls else nan,
            "recon": rec.detach() if recon is not None else nan,
            "det": nan,
            "n_seg": torch.tensor(n_seg),
            "n_cls": torch.tensor(n_cls),
        }
