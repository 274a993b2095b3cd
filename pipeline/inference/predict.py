"""Whole-volume prediction shared by the evaluator and the inference bundle.

Segmentation: ``sliding_window_inference`` over the volume (ROI = training patch), sigmoid.
Classification: by default one forward pass on a patch of the training size centred on the
predicted tumour, so the classifier sees what it saw in training; ``classify="whole"`` runs it
on the whole (padded) volume instead. Optional test-time augmentation by flips: the mean of the
un-flipped tumour probabilities, and of the class logits, over every flip set in ``tta_flips``
(identity included). Then the connected-component rule (:mod:`pipeline.inference.postprocess`) and the
classifier's temperature (:mod:`pipeline.inference.calibration`), both normally decided on validation cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, sliding_window_inference
from monai.transforms import SpatialPad

from pipeline.inference.postprocess import RULES, apply_rule, top_component_mask
from pipeline.models.networks import SegmentationOutput
from pipeline.runtime.precision import AMP_DTYPES

__all__ = ["MultiTaskInferer", "detect_boxes", "PredictConfig", "predict_volume", "predict_raw", "tumour_patch_center", "crop_patch",
           "keep_largest_component"]


@dataclass
class PredictConfig:
    """How a volume is predicted.

    Attributes:
        roi_size: sliding-window ROI and classification patch size (the training patch).
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        classify: ``"patch"`` (tumour-centred patch) or ``"whole"`` (whole volume).
        threshold: probability threshold of the tumour mask (also used to find its centre).
        tta_flips: spatial axes (0, 1, 2 of H, W, D) flipped in each TTA pass; ``()`` = identity.
            ``None``/empty list: no TTA.
        amp: autocast on CUDA.
        amp_dtype: its dtype, ``"bfloat16"`` or ``"float16"`` (:mod:`pipeline.runtime.precision`).
        class_flip_axes: the axes flipped in training (``flip_axes``); the classifier's TTA only
            uses the flip sets within them, because the class follows the tumour's location (an
            up-down flip turns a cerebellar tumour into a supratentorial one). ``None``: all.
        postprocess: connected-component rule of :mod:`pipeline.inference.postprocess` (``none``,
            ``largest``, ``confident``); the bundles pass the rule decided on validation cases.
        min_mass_fraction: the ``confident`` rule keeps components with at least this fraction
            of the most confident component's summed probability.
        temperature: class probabilities are ``softmax(logits / temperature)``.
    """

    roi_size: Sequence[int] = (128, 128, 112)
    sw_batch_size: int = 1
    overlap: float = 0.25
    mode: str = "gaussian"
    classify: str = "patch"
    threshold: float = 0.5
    tta_flips: Sequence[Sequence[int]] | None = None
    amp: bool = False
    postprocess: str = "none"
    class_flip_axes: Sequence[int] | None = None
    min_mass_fraction: float = 0.2
    temperature: float = 1.0
    amp_dtype: str = "float16"
    flips: list[tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        if self.classify not in ("patch", "whole"):
            raise ValueError(f"classify must be 'patch' or 'whole', got {self.classify!r}")
        if self.postprocess not in RULES:
            raise ValueError(f"postprocess must be one of {RULES}, got {self.postprocess!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        flips = [tuple(int(a) for a in f) for f in (self.tta_flips or [])]
        self.flips = flips if flips else [()]
        if () not in self.flips:
            self.flips = [(), *self.flips]

    @property
    def class_flips(self) -> list[tuple[int, ...]]:
        """The flip sets the classifier's TTA averages over (identity always included)."""
        if self.class_flip_axes is None:
            return self.flips
        allowed = {int(a) for a in self.class_flip_axes}
        return [f for f in self.flips if set(f) <= allowed]


def tumour_patch_center(prob: torch.Tensor, threshold: float = 0.5) -> list[int]:
    """Voxel centre (H, W, D) of the predicted tumour in a ``(1, H, W, D)`` probability map.

    Centre of mass of the most confident component (largest summed probability) of the
    thresholded mask, so a false-positive blob elsewhere cannot pull the patch off the tumour;
    if nothing reaches ``threshold``, the most probable voxel.
    """
    p = prob[0]
    mask = top_component_mask(prob, threshold)
    if mask is not None:
        idx = mask.nonzero().float().mean(0)
        return [int(round(float(v))) for v in idx]
    flat = int(torch.argmax(p))
    return [int(v) for v in torch.unravel_index(torch.tensor(flat), p.shape)]


def crop_patch(image: torch.Tensor, center: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop a ``size`` patch of a ``(C, H, W, D)`` image centred at ``center``, shifted to stay
    inside the image and zero-padded where the image is smaller than ``size``."""
    starts = []
    for c, s, n in zip(center, size, image.shape[1:], strict=True):
        start = min(max(int(c) - s // 2, 0), max(n - s, 0))
        starts.append(start)
    sl = tuple(slice(st, st + s) for st, s in zip(starts, size, strict=True))
    patch = image[(slice(None), *sl)]
    return SpatialPad(spatial_size=list(size))(patch)


def keep_largest_component(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Zero the probability outside the largest connected component (26-connectivity) of
    ``prob >= threshold``, per sample of a ``(B, 1, H, W, D)`` map (the ``largest`` rule of
    :func:`pipeline.inference.postprocess.apply_rule`)."""
    return apply_rule(prob, "largest", threshold)


def _flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Flip spatial axes (0-based over H, W, D) of a ``(B, C, H, W, D)`` tensor."""
    return torch.flip(x, dims=[a + 2 for a in axes]) if axes else x


def _in_plane(flips: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """2-D mode: the flip sets without the depth axis (2), duplicates removed, order kept."""
    return list(dict.fromkeys(tuple(a for a in f if a != 2) for f in flips))


@torch.no_grad()
def predict_volume(network: torch.nn.Module, image: torch.Tensor, cfg: PredictConfig
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predict one or more whole volumes: :func:`predict_raw`, then the component rule
    ``cfg.postprocess`` and ``softmax(logits / cfg.temperature)``.

    Returns:
        ``(seg_prob, class_prob)``: ``(B, 1, H, W, D)`` tumour probabilities and ``(B, K)``
        class probabilities (``None`` for a segmentation-only network).
    """
    seg_raw, logits = predict_raw(network, image, cfg)
    return finish(seg_raw, logits, cfg)


def finish(seg_raw: torch.Tensor | None, logits: torch.Tensor | None, cfg: PredictConfig
           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Raw prediction -> ``(post-processed tumour probability, calibrated class probabilities)``
    (``None`` for a missing output)."""
    seg = None if seg_raw is None else apply_rule(seg_raw, cfg.postprocess, cfg.threshold, cfg.min_mass_fraction)
    probs = None if logits is None else torch.softmax(logits.float() / cfg.temperature, dim=1)
    return seg, probs


@torch.no_grad()
def predict_raw(network: torch.nn.Module, image: torch.Tensor, cfg: PredictConfig, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Predict one or more whole volumes before post-processing and calibration.

    Args:
        network: a :class:`~pipeline.models.networks.MultiTaskSegResNet` (or any module returning
            ``(seg_logits, class_logits | None, embedding)``), already on the right device.
        image: ``(B, C, H, W, D)`` float tensor on the network's device.
        cfg: :class:`PredictConfig`.
        mask: ``(B, 1, H, W, D)`` true masks, used only by a 2-D network without decoder (its slices'
            class probabilities weighted by the true tumour area instead of the predicted one).

    Returns:
        ``(seg_prob, class_logits)``: ``(B, 1, H, W, D)`` tumour probabilities (no component
        rule) and ``(B, K)`` class logits (mean over the classifier's TTA flips; ``None`` for a
        segmentation-only network). A network without decoder (``has_decoder = False``, the
        classifier alone) gives ``None`` for the tumour and is classified on the whole volume. A
        2-D network (``spatial_dims == 2``) predicts the volume slice by slice
        (:func:`pipeline.data.slices.predict_slicewise`; no sliding window; flip TTA in the slices' plane,
        depth flips dropped).
    """
    was_training = network.training
    network.eval()
    device_type = image.device.type
    if int(getattr(network, "spatial_dims", 3)) == 2 and image.dim() == 5:  # 2-D mode: slice by slice
        from pipeline.data.slices import predict_slicewise

        # flip TTA in the slices' plane: each flip set's slice-by-slice prediction, un-flipped; the
        # tumour is the mean over every flip set, the class over those within the training flips.
        # A depth flip (axis 2) only reorders slices predicted one by one, so it is dropped.
        seg_flips = _in_plane(cfg.flips) if getattr(network, "has_decoder", True) else []
        class_flips = _in_plane(cfg.class_flips)
        segs, class_logits = [], []
        with torch.autocast(device_type=device_type, dtype=AMP_DTYPES[cfg.amp_dtype],
                            enabled=cfg.amp and device_type == "cuda"):
            for f in dict.fromkeys(seg_flips + class_flips):  # each pass once, in order
                seg_f, logits_f = predict_slicewise(network, _flip(image, f),
                                                    weights_from=None if mask is None else _flip(mask, f))
                if seg_f is not None and f in seg_flips:
                    segs.append(_flip(seg_f, f))
                if logits_f is not None and f in class_flips:
                    class_logits.append(logits_f.float())
        network.train(was_training)
        return (torch.stack(segs).mean(0) if segs else None,
                torch.stack(class_logits).mean(0) if class_logits else None)
    seg_net = SegmentationOutput(network)
    if not getattr(network, "has_decoder", True):
        with torch.autocast(device_type=device_type, dtype=AMP_DTYPES[cfg.amp_dtype],
                            enabled=cfg.amp and device_type == "cuda"):
            logits = _classify(network, image, None, dataclasses.replace(cfg, classify="whole"))
        network.train(was_training)
        return None, logits
    with torch.autocast(device_type=device_type, dtype=AMP_DTYPES[cfg.amp_dtype],
                            enabled=cfg.amp and device_type == "cuda"):
        seg_prob = torch.stack([
            _flip(torch.sigmoid(sliding_window_inference(
                _flip(image, f), list(cfg.roi_size), cfg.sw_batch_size, seg_net,
                overlap=cfg.overlap, mode=cfg.mode).float()), f)
            for f in cfg.flips
        ]).mean(0)
        class_logits = _classify(network, image, seg_prob, cfg)
    network.train(was_training)
    return seg_prob, class_logits


def _classify(network: torch.nn.Module, image: torch.Tensor, seg_prob: torch.Tensor | None, cfg: PredictConfig
              ) -> torch.Tensor | None:
    if cfg.classify == "patch" and seg_prob is not None:
        patches = torch.stack([
            crop_patch(image[b], tumour_patch_center(seg_prob[b], cfg.threshold), cfg.roi_size)
            for b in range(image.shape[0])
        ])
    else:
        k = int(getattr(network, "downsampling", 8))  # the encoder's total down-sampling
        size = [((s + k - 1) // k) * k for s in image.shape[2:]]
        patches = torch.stack([SpatialPad(spatial_size=size)(image[b]) for b in range(image.shape[0])])
    all_logits = []
    for f in cfg.class_flips:
        logits = network(_flip(patches, f))[1]
        if logits is None:
            return None
        all_logits.append(logits.float())
    return torch.stack(all_logits).mean(0)


def detect_boxes(network: torch.nn.Module, image: torch.Tensor, detector: torch.nn.Module
                 ) -> list[tuple[Any, Any]]:
    """The detection head's boxes on whole volumes ``(B, C, H, W, D)``: per sample ``(boxes (N, 6),
    scores (N,))``, voxel indices of ``image`` (``[x0, y0, z0, x1, y1, z1]``, upper corner exclusive),
    best first. The volume is padded at its far end to a multiple of the encoder's down-sampling
    (so voxel indices keep their meaning) and seen whole (the anchors then cover every lesion in
    one pass; sliding windows would need their boxes merged); boxes are clipped to the volume.
    ``detector``: :class:`pipeline.models.detection.LesionDetector`."""
    k = int(getattr(network, "downsampling", 8))
    size = list(image.shape[2:])
    full = [((s + k - 1) // k) * k for s in size]
    padded = SpatialPad(spatial_size=full, method="end")
    was_training = network.training
    network.eval()
    with torch.no_grad():
        maps = network(torch.stack([padded(image[b]) for b in range(image.shape[0])]))[-1]
    network.train(was_training)
    hi = np.asarray(size * 2, dtype=float)
    return [(np.clip(boxes, 0, hi), scores) for boxes, scores in detector.decode(maps, full)]


class MultiTaskInferer(Inferer):
    """Whole-volume inferer: returns ``{"seg": (B, 1, H, W, D) probabilities after the component
    rule, "cls": (B, K) calibrated probabilities | None, "seg_raw": the probabilities before the
    component rule, "cls_logits": (B, K) | None}``, and with a network that detects (``detect``) and
    a ``detector``, ``"boxes"``: per sample the head's ``(boxes, scores)`` (:func:`detect_boxes`).

    Args: the fields of :class:`PredictConfig`; ``detector``, the
    :class:`pipeline.models.detection.LesionDetector` that decodes the detection head.
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "gaussian", classify: str = "patch", threshold: float = 0.5,
                 tta_flips: Sequence[Sequence[int]] | None = None, amp: bool = False,
                 postprocess: str = "none", class_flip_axes: Sequence[int] | None = None,
                 min_mass_fraction: float = 0.2, temperature: float = 1.0, amp_dtype: str = "float16",
                 detector: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.cfg = PredictConfig(roi_size, sw_batch_size, overlap, mode, classify, threshold, tta_flips, amp,
                                 postprocess, class_flip_axes, min_mass_fraction, float(temperature), amp_dtype)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, mask: torch.Tensor | None = None,
                 **kwargs: Any) -> dict:
        seg_raw, logits = predict_raw(network, inputs, self.cfg, mask=mask)
        seg, cls = finish(seg_raw, logits, self.cfg)
        out = {"seg": seg, "cls": cls, "seg_raw": seg_raw, "cls_logits": logits}
        if self.detector is not None and getattr(network, "detect", False):
            out["boxes"] = detect_boxes(network, inputs, self.detector)
        return out
