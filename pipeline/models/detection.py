"""Lesions as boxes from the shared encoder: a RetinaNet-style detection head and its training and
decoding, all from MONAI's detection components (``monai.apps.detection``).

- :class:`LesionDetectionHead`: a 1x1 convolution per chosen encoder level to a common width, then
  MONAI's ``RetinaNetClassificationHead`` and ``RetinaNetRegressionHead`` shared over the levels
  (one class: lesion). It returns MONAI's list form, the classification maps of every level then
  the regression maps, ``(B, A, h, w, d)`` and ``(B, 6 A, h, w, d)`` per level.
- :class:`LesionDetector`: MONAI's ``RetinaNetDetector`` around the head, configured as MONAI's
  LUNA16 detection recipe (``AnchorGeneratorWithAnchorShape``, the ATSS matcher, the hard-negative
  sampler, binary cross-entropy for the anchors' classes, smooth L1 on the encoded box deltas, the
  box selector with non-maximum suppression) with anchor sizes given in millimetres. It computes the
  loss of head outputs against boxes (:meth:`loss`) and decodes head outputs into scored boxes
  (:meth:`decode`). The encoder runs once for every head: the detector never calls the network
  itself, so it is given the head's outputs (``RetinaNetDetector.forward`` would run its own).
- :func:`mask_box_targets`: the training targets, one box per connected lesion of a mask patch above a
  minimum volume (the evaluation's definition, :func:`pipeline.data.boxes.lesion_boxes`).

Boxes are voxel indices of the network's input, ``[x0, y0, z0, x1, y1, z1]`` (MONAI's ``StandardMode``
``xyzxyz``), upper corner exclusive, as the evaluation writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.layers import Conv
from torch import nn

from pipeline.io.errors import InputError

__all__ = ["LesionDetectionHead", "LesionDetector", "mask_box_targets"]


class LesionDetectionHead(nn.Module):
    """RetinaNet heads (MONAI) on several encoder levels of the shared encoder.

    Args:
        spatial_dims: 3 (2 works too).
        in_channels: channels of each encoder level the head reads, shallow to deep.
        channels: the common width the levels are projected to (a multiple of 8: the heads' group norm).
        num_anchors: anchors per location (the detector's anchor shapes).

    Forward:
        ``features``: the chosen levels' maps, shallow to deep. Returns ``2 N`` tensors: the ``N``
        classification maps ``(B, num_anchors, h_i, w_i, d_i)``, then the ``N`` regression maps
        ``(B, 2 spatial_dims num_anchors, h_i, w_i, d_i)``.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], channels: int = 32, num_anchors: int = 2) -> None:
        super().__init__()
        if channels % 8:
            raise InputError(None, f"det_channels must be a multiple of 8 (the heads' group norm), got {channels}")
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.num_anchors = num_anchors
        self.lateral = nn.ModuleList([conv(c, channels, kernel_size=1) for c in in_channels])
        self.cls_head = RetinaNetClassificationHead(channels, num_anchors, 1, spatial_dims)
        self.box_head = RetinaNetRegressionHead(channels, num_anchors, spatial_dims)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        for i, lat in enumerate(self.lateral):  # TorchScript: a module list is iterated, not zipped
            maps.append(lat(features[i]))
        return self.cls_head(maps) + self.box_head(maps)


class LesionDetector(nn.Module):
    """Loss and decoding of :class:`LesionDetectionHead` outputs with MONAI's ``RetinaNetDetector``.

    Anchors: at every location of encoder level ``l`` (stride ``2**l`` voxels), a cube of each size
    in ``anchor_sizes_mm`` times ``2**(l - l_0)`` (MONAI's ``feature_map_scales``, ``l_0`` the
    shallowest level read): the deeper level proposes the larger lesions. ATSS picks each lesion's anchors by the statistics of their IoU with
    it (robust to the anchor sizes); the hard-negative sampler keeps the lesion-free anchors that
    score highest. At inference the box selector keeps boxes scoring at least ``score_thresh``,
    removes those overlapping a better one by more than ``nms_iou`` and keeps the ``max_boxes`` best.

    Args:
        spatial_dims: 3 (2 works too).
        levels: the encoder levels the head reads, shallow to deep (the network's ``det_levels``).
        spacing_mm: the voxel size of the grid the network sees (the atlas spacing).
        anchor_sizes_mm: edge lengths of the anchor cubes on the shallowest level.
        score_thresh / nms_iou / max_boxes: the box selector's settings.
        negatives_per_image / positive_fraction: the hard-negative sampler's settings (MONAI's LUNA16
            recipe: 64 anchors per image of which at most 30 % positive).
    """

    def __init__(self, spatial_dims: int = 3, levels: Sequence[int] = (2, 3), spacing_mm: float = 2.0,
                 anchor_sizes_mm: Sequence[float] = (12.0, 20.0), score_thresh: float = 0.05,
                 nms_iou: float = 0.22, max_boxes: int = 20, negatives_per_image: int = 64,
                 positive_fraction: float = 0.3) -> None:
        super().__init__()
        scales = [2.0 ** (int(lv) - int(levels[0])) for lv in levels]
        shapes = [[float(a) / float(spacing_mm)] * spatial_dims for a in anchor_sizes_mm]
        self.num_anchors = len(shapes)
        self.spatial_dims = spatial_dims
        self.spacing_mm = float(spacing_mm)
        anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=shapes)
        self.detector = RetinaNetDetector(network=nn.Identity(), anchor_generator=anchors, spatial_dims=spatial_dims,
                                          num_classes=1, size_divisible=1)
        self.detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
        self.detector.set_hard_negative_sampler(batch_size_per_image=negatives_per_image,
                                                positive_fraction=positive_fraction, pool_size=20, min_neg=16)
        self.detector.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=1000,
                                                  nms_thresh=nms_iou, detections_per_img=max_boxes,
                                                  apply_sigmoid=True)

    def _flat(self, head_outputs: Sequence[torch.Tensor], image_shape: Sequence[int]
              ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[int]]:
        """The head's maps as MONAI's detector reads them: ``(B, sum(h w d A), channels)`` per key,
        the anchors of every image, and the locations per level."""
        n = len(head_outputs) // 2
        cls_maps, box_maps = list(head_outputs[:n]), list(head_outputs[n:])
        images = cls_maps[0].new_zeros((cls_maps[0].shape[0], 1, *image_shape))  # only its shape is read
        d = self.detector
        d.generate_anchors(images, {d.cls_key: cls_maps})
        locations = [m.shape[2:].numel() for m in cls_maps]
        flat = {d.cls_key: _flatten(cls_maps, self.num_anchors, self.spatial_dims),
                d.box_reg_key: _flatten(box_maps, self.num_anchors, self.spatial_dims)}
        return flat, d.anchors, locations

    def loss(self, head_outputs: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
             image_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anchor classification loss, box regression loss)`` of a batch.

        Args:
            head_outputs: :class:`LesionDetectionHead`'s output for the samples that have a mask.
            boxes: per sample, its lesions' boxes ``(M, 6)`` in voxel indices (``M = 0``: every anchor
                is background).
            image_shape: the spatial shape of the network's input.
        """
        flat, anchors, locations = self._flat(head_outputs, image_shape)
        dev = flat[self.detector.cls_key].device
        targets = [{"boxes": b.to(dev).float(), "labels": torch.zeros(len(b), dtype=torch.long, device=dev)}
                   for b in boxes]
        d = self.detector
        matched = self._match(anchors, targets, locations)
        cls = d.compute_cls_loss(flat[d.cls_key], targets, matched)
        box = d.compute_box_loss(flat[d.box_reg_key], targets, anchors, matched)
        # MONAI returns a constant 0 when no anchor matched a lesion; tie it to the graph
        box = box.to(dev) + 0.0 * flat[d.box_reg_key].sum()
        return cls, box

    def _match(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               locations: list[int]) -> list[torch.Tensor]:
        """Each anchor's lesion index (``-1``: background) by the ATSS matcher. MONAI's
        ``compute_anchor_matched_idxs`` does the same but imports torchvision for a type check."""
        out = []
        for a, t in zip(anchors, targets):  # noqa: B905 - one target per image by construction
            if t["boxes"].numel() == 0:
                out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
                continue
            _, idx = self.detector.proposal_matcher(t["boxes"], a, locations, self.num_anchors)
            out.append(idx)
        return out

    @torch.no_grad()
    def decode(self, head_outputs: Sequence[torch.Tensor], image_shape: Sequence[int]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sample, ``(boxes (N, 6), scores (N,))`` after the box selector, best first."""
        flat, anchors, locations = self._flat(head_outputs, image_shape)
        sizes = [list(image_shape)] * flat[self.detector.cls_key].shape[0]
        found = self.detector.postprocess_detections(flat, anchors, sizes, locations)
        out = []
        for f in found:
            order = torch.argsort(f[self.detector.pred_score_key], descending=True)
            out.append((f["boxes"][order].float().cpu().numpy(), f[self.detector.pred_score_key][order].float().cpu().numpy()))
        return out


def _flatten(maps: Sequence[torch.Tensor], num_anchors: int, spatial_dims: int) -> torch.Tensor:
    """``(B, A C, h, w, d)`` maps to ``(B, sum(h w d A), C)``, anchors fastest (the order of MONAI's
    anchor generator; MONAI's own version is a private method of its detector)."""
    out = []
    for m in maps:
        b, ac = m.shape[:2]
        c = ac // num_anchors
        x = m.view(b, num_anchors, c, *m.shape[2:])
        x = x.permute(0, *range(3, 3 + spatial_dims), 1, 2)
        out.append(x.reshape(b, -1, c))
    return torch.cat(out, dim=1)


def mask_box_targets(masks: torch.Tensor, spacing_mm: float, min_volume_mm3: float) -> list[torch.Tensor]:
    """One box per connected lesion of each mask patch ``(B, 1, H, W, D)`` above ``min_volume_mm3``
    (lesions cut by the patch's border count by the part inside it): the detection head's targets."""
    from pipeline.data.boxes import lesion_boxes

    spacing = (float(spacing_mm),) * (masks.dim() - 2)
    arr = (masks[:, 0] > 0).cpu().numpy()
    return [torch.as_tensor(lesion_boxes(m, spacing, min_volume_mm3), dtype=torch.float32) for m in arr]
