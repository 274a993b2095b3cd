"""MultiTaskSegResNet: MONAI's SegResNet with a classification head on its bottleneck.

The encoder and decoder are MONAI's own (``SegResNet.encode`` / ``SegResNet.decode``); this
module only adds the fully connected branch of the reference study (shared encoder,
multi-task learning) and returns all outputs in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SegResNet
from torch import nn

from pipeline.io.errors import InputError

__all__ = ["MultiTaskSegResNet", "TumourHeadMixin", "SegmentationOutput", "BatchNorm1dOrRunning", "PositionAwareHead",
           "CLS_INPUTS"]

#: What the class head reads (``cls_inputs``): ``"both"``, the pooled bottleneck and the tumour's atlas
#: position; ``"position"``, the position alone (see :class:`MultiTaskSegResNet`).
CLS_INPUTS: tuple[str, ...] = ("both", "position")


class TumourHeadMixin:
    """The classification head shared by every backbone (:class:`MultiTaskSegResNet`,
    :class:`pipeline.models.backbones.MultiTaskBackboneNet`): pooling of the bottleneck (mean, or weighted
    by the detached tumour probability) [+ the tumour's atlas position] -> MLP. See
    :class:`MultiTaskSegResNet` for the options. The host module calls :meth:`_init_head` in its
    ``__init__`` and :meth:`_classify` in its ``forward``."""

    def _init_head(self, embedding_dim: int, spatial_dims: int, in_channels: int, num_classes: int,
                   cls_hidden: Sequence[int], cls_dropout: float, cls_pooling: str, coord_channels: int,
                   tumour_floor: float, coord_mirror_axes: Sequence[int], cls_inputs: str = "both") -> None:
        if cls_pooling not in ("mean", "tumour"):
            raise InputError(None, f"cls_pooling must be 'mean' or 'tumour', got {cls_pooling!r}")
        if cls_inputs not in CLS_INPUTS:
            raise InputError(None, f"cls_inputs must be one of {CLS_INPUTS}, got {cls_inputs!r}")
        if cls_inputs == "position" and int(num_classes) > 0 and int(coord_channels) <= 0:
            raise InputError(None, "cls_inputs 'position' classifies from the predicted tumour's atlas position: it "
                                   "needs coord_channels > 0 (got 0); set cls_inputs 'both' or give coordinates")
        self.cls_inputs = cls_inputs
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.image_channels = int(in_channels)
        self.coord_channels = int(coord_channels)
        self.cls_pooling = cls_pooling
        self.tumour_floor = float(tumour_floor)
        # True: the head reads a detached bottleneck, so the class loss trains the head and never the
        # encoder (mtl_method 'stop' with cls_grad_levels 0 sets it, pipeline.training.gradients)
        self.cls_detach = False
        mirror = torch.zeros(max(self.coord_channels, 1), dtype=torch.bool)
        for a in coord_mirror_axes:
            if self.coord_channels and not 0 <= int(a) < self.coord_channels:
                raise InputError(None, f"coord_mirror_axes {list(coord_mirror_axes)} outside the {coord_channels} coordinates")
            if self.coord_channels:
                mirror[int(a)] = True
        self.register_buffer("coord_mirror", mirror, persistent=False)
        # the head's initial weights come from a forked generator: every other draw (the detection and
        # reconstruction branches built after it, the data order and crops) is the same as without a head,
        # so a head that no class gradient leaves (cls_detach) trains the segmentation path bit for bit as
        # single-task training does
        with torch.random.fork_rng(devices=[]):
            self.classifier = self._make_classifier(list(cls_hidden), cls_dropout) if self.num_classes > 0 else None

    def _make_classifier(self, hidden: list[int], dropout: float) -> nn.Module:
        # The pooled bottleneck has large per-feature offsets shared by every sample and small
        # between-sample differences; fed raw to Linear+ReLU, the hidden units died within a few
        # hundred steps (95 % inactive, constant logits, measured on the demo). Standardising
        # each feature first (batch norm) keeps them alive.
        n_features = 0 if self.cls_inputs == "position" else self.embedding_dim
        width = n_features + self.coord_channels
        layers: list[nn.Module] = [] if self.coord_channels else [BatchNorm1dOrRunning(width)]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, self.num_classes))
        if self.coord_channels:
            return PositionAwareHead(n_features, nn.Sequential(*layers))
        return nn.Sequential(*layers)

    def _classify(self, x: torch.Tensor, bottleneck: torch.Tensor, seg: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(class logits | None, embedding)`` from the bottleneck ``(B, C, h, w, d)``, the input
        ``x`` (its coordinate channels) and the segmentation logits (``None``: no decoder)."""
        if self.cls_detach:
            # a zero gradient rather than a cut graph: the class term's backward pass still reaches the
            # encoder's nodes (adding exact zeros), so it runs in the same order on every process and the
            # head's synchronised batch norm keeps in step with DDP's gradient buckets (a plain detach
            # let the two collectives interleave differently across processes)
            bottleneck = bottleneck.detach() + 0.0 * bottleneck
        if seg is None:
            embedding = torch.flatten(self.pool(bottleneck), 1)
            return (self.classifier(embedding) if self.classifier is not None else None), embedding
        if self.cls_pooling == "mean" and self.coord_channels == 0:
            embedding = torch.flatten(self.pool(bottleneck), 1)
            return (self.classifier(embedding) if self.classifier is not None else None), embedding
        # the class loss must not move the mask: the weights are the detached tumour probability
        weight = torch.sigmoid(seg.detach()[:, :1].float()) + self.tumour_floor
        if self.cls_pooling == "tumour":
            w = _area_downsample(weight, list(bottleneck.shape[2:]))
            embedding = (bottleneck.float() * w).flatten(2).sum(-1) / w.flatten(2).sum(-1)
        else:
            embedding = torch.flatten(self.pool(bottleneck), 1).float()
        features = embedding
        if self.coord_channels > 0:
            coords = x[:, self.image_channels : self.image_channels + self.coord_channels].float()
            centre = (coords * weight).flatten(2).sum(-1) / weight.flatten(2).sum(-1)
            centre = torch.where(self.coord_mirror[: self.coord_channels], centre.abs(), centre)
            features = centre if self.cls_inputs == "position" else torch.cat([embedding, centre], dim=1)
        return (self.classifier(features) if self.classifier is not None else None), embedding


class MultiTaskSegResNet(TumourHeadMixin, SegResNet):
    """3-D U-Net with ResNet blocks (Myronenko 2018) + a bottleneck classifier.

    Segmentation path: exactly :class:`monai.networks.nets.SegResNet` (``init_filters`` at the
    top level, each of the ``len(blocks_down)`` levels halves the size and doubles the filters).
    Classification path: pooling of the bottleneck (``init_filters * 2**(L-1)`` channels)
    [+ the tumour's atlas position] -> batch norm -> ``Linear -> ReLU -> Dropout`` per hidden
    layer -> ``Linear(num_classes)``. Pooling:

    - ``cls_pooling="mean"``: global average over the patch (the study's head);
    - ``cls_pooling="tumour"``: average weighted by the network's own tumour probability
      (``sigmoid(seg)``, detached, area-resampled to the bottleneck grid, plus a floor of
      ``tumour_floor`` so a patch without tumour falls back to the plain mean): a soft RoI pooling
      of the tumour's features, as in tumour retrieval (Pisov et al.).

    With ``coord_channels = n > 0`` the input carries ``n`` extra channels after the image: the
    voxel's atlas coordinates (MONAI ``AddCoordinateChannelsd`` on the atlas grid). They do not
    enter the encoder (the segmentation path stays the study's); the head receives their
    tumour-probability-weighted mean, i.e. where in the atlas the predicted tumour lies (the
    genetic class of pLGG follows the tumour's anatomical region), past the batch norm
    (:class:`PositionAwareHead`).

    Args:
        spatial_dims: 3 (2 works too).
        in_channels: image channels (1: FLAIR).
        out_channels: segmentation channels (1: whole tumour, sigmoid).
        num_classes: classes of the genetic marker; ``0`` switches the head off (single-task).
        init_filters: filters of the first level (study: 32).
        blocks_down / blocks_up: residual blocks per encoder / decoder level.
        cls_hidden: sizes of the hidden fully connected layers of the head.
        cls_dropout: dropout before each hidden layer's output.
        dropout_prob: SegResNet's dropout after the first convolution.
        norm: SegResNet normalisation (group norm by default).
        cls_pooling: ``"mean"`` (study) or ``"tumour"`` (tumour-weighted pooling).
        coord_channels: atlas coordinate channels appended to the input (0: none).
        tumour_floor: weight added to every voxel's tumour probability in the pooling.
        coord_mirror_axes: coordinates whose sign the head does not see (``|c|``: the distance
            from the grid's mid-plane): the axes training flips (``flip_axes``, left-right), so
            the head reads a position and its mirror image alike, as the flips already assume.
        cls_inputs: what the head reads: ``"both"`` (the pooled bottleneck and, with coordinate
            channels, the position) or ``"position"`` (the predicted tumour's atlas position alone;
            needs coordinate channels). With few training cases the pooled bottleneck's many
            features let the head learn the training cases by heart: on the synthetic cohort a
            probe on the position alone classified held-out cases better than one on both (the
            figures in ``docs/explanation/multitask.md``). The embedding output is the same either way.
        decoder: ``False`` = the classifier alone on the shared encoder (the single-task
            classification arm of the experiment, ``configs/classify_only.json``): the decoder is
            neither built nor computed and the segmentation output is ``None``. It needs
            ``cls_pooling="mean"`` and no coordinate channels (both read the predicted tumour).
        reconstruct: add the auxiliary reconstruction branch (``configs/recon.json``): a second
            decoder with SegResNet's up-sampling stages but **no skip connections**, from the
            bottleneck to a linear ``in_channels`` image (an auto-encoder: with U-Net skips the
            top level would copy the input and teach the encoder nothing). It is hand-written rather
            than MONAI's ``SegResNetVAE`` because that branch needs a fixed ``input_image_size``
            (its dense layers) while this network trains on patches and infers on whole volumes.
        detect: add the lesion detection head (:class:`pipeline.models.detection.LesionDetectionHead`,
            MONAI's RetinaNet heads) on the encoder levels ``det_levels`` (0 = full resolution;
            level ``i`` has stride ``2**i``), projected to ``det_channels``, ``det_anchors`` anchors
            per location.
        det_detach: the detection head reads detached encoder maps: the detection loss trains the
            head and never the shared encoder, so the segmentation learns what it would without
            the head (the lesion boxes at no cost to the mask, like ``mtl_method: stop`` for the class).

    Forward:
        ``x``: ``(B, in_channels + coord_channels, H, W, D)``, each spatial size divisible by
        ``2**(L-1)``.

        Returns ``(seg_logits, class_logits, embedding)``: ``(B, out_channels, H, W, D)`` or
        ``None`` without a decoder, ``(B, num_classes)`` or ``None`` when the head is off, and
        ``(B, C_bottleneck)`` (the pooled bottleneck). With ``reconstruct`` a fourth output, the
        reconstructed image ``(B, in_channels, H, W, D)``, computed in every mode (TorchScript
        and ONNX need one output signature). With ``detect`` a last output, the detection head's list
        of maps (:class:`pipeline.models.detection.LesionDetectionHead`).
    """

    __constants__ = ["reconstruct", "detect"]  # TorchScript then compiles only the branch this network takes

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 3,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        cls_hidden: Sequence[int] = (128,),
        cls_dropout: float = 0.3,
        dropout_prob: float | None = None,
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        cls_pooling: str = "mean",
        coord_channels: int = 0,
        tumour_floor: float = 1e-3,
        coord_mirror_axes: Sequence[int] = (),
        cls_inputs: str = "both",
        decoder: bool = True,
        reconstruct: bool = False,
        detect: bool = False,
        det_levels: Sequence[int] = (2, 3),
        det_channels: int = 32,
        det_anchors: int = 2,
        det_detach: bool = False,
    ) -> None:
        if not decoder and (cls_pooling != "mean" or coord_channels or num_classes <= 0):
            raise InputError(None, "a network without decoder is the classifier alone: it needs num_classes > 0, "
                             f"cls_pooling='mean' and coord_channels=0 (got {num_classes}, {cls_pooling!r}, "
                             f"{coord_channels})")
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            norm=norm,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
        )
        self.downsampling = 2 ** (len(blocks_down) - 1)
        self._init_head(init_filters * 2 ** (len(blocks_down) - 1), spatial_dims, in_channels, num_classes, cls_hidden,
                        cls_dropout, cls_pooling, coord_channels, tumour_floor, coord_mirror_axes, cls_inputs)
        self.has_decoder = bool(decoder)
        if not self.has_decoder:  # SegResNet builds them in __init__; drop them so no weight is unused
            self.up_layers, self.up_samples, self.conv_final = nn.ModuleList(), nn.ModuleList(), nn.Identity()
        self.reconstruct = bool(reconstruct)
        if self.reconstruct:
            self.recon_up_layers, self.recon_up_samples = self._make_up_layers()
            self.recon_final = self._make_final_conv(self.image_channels)
        self.detect = bool(detect)
        self.det_detach = bool(det_detach)
        self.det_levels = [int(i) for i in det_levels]
        if self.detect:
            if spatial_dims != 3:
                raise InputError(None, "detect: the detection head is 3-D (its boxes are lesions of a volume); "
                                       "set detect false with spatial_dims 2")
            if not self.det_levels or min(self.det_levels) < 0 or max(self.det_levels) >= len(blocks_down):
                raise InputError(None, f"det_levels must name encoder levels 0..{len(blocks_down) - 1}, got {list(det_levels)}")
            from pipeline.models.detection import LesionDetectionHead

            self.det_head = LesionDetectionHead(spatial_dims, [init_filters * 2**i for i in self.det_levels],
                                                det_channels, det_anchors)

    @torch.jit.unused
    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared encoder's output at every level, full resolution first, the bottleneck last:
        ``len(blocks_down)`` tensors ``(B, init_filters * 2**i, H / 2**i, W / 2**i, D / 2**i)``
        (MONAI ``SegResNet.encode``'s ``down_x``). Used by retrieval's RoI pooling."""
        _, down_x = self.encode(x[:, : self.image_channels])
        return down_x

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        bottleneck, down_x = self.encode(x[:, : self.image_channels])
        if self.detect:  # a TorchScript constant, as reconstruct
            det = self.det_head([down_x[i].detach() if self.det_detach else down_x[i] for i in self.det_levels])
            seg, logits, embedding = self._heads(x, bottleneck, down_x)
            if self.reconstruct:
                return seg, logits, embedding, self._reconstruct(bottleneck), det
            return seg, logits, embedding, det
        if self.reconstruct:  # a TorchScript constant: each network scripts one output signature
            seg, logits, embedding = self._heads(x, bottleneck, down_x)
            return seg, logits, embedding, self._reconstruct(bottleneck)
        return self._heads(x, bottleneck, down_x)

    def _reconstruct(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """The auxiliary decoder: up-sampling stages without skip connections, linear output."""
        y = bottleneck
        for up, upl in zip(self.recon_up_samples, self.recon_up_layers):  # noqa: B905 - TorchScript: no strict=
            y = upl(up(y))
        return self.recon_final(y)

    def _heads(self, x: torch.Tensor, bottleneck: torch.Tensor, down_x: list[torch.Tensor]
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Segmentation decoder and classifier on the encoder's output: ``(seg, logits, embedding)``."""
        if not self.has_decoder:
            logits, embedding = self._classify(x, bottleneck, None)
            return None, logits, embedding
        down_x.reverse()
        seg = self.decode(bottleneck, down_x)
        logits, embedding = self._classify(x, bottleneck, seg)
        return seg, logits, embedding


def _area_downsample(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``interpolate(x, size, mode="area")``, as an average pooling when the sizes divide (always,
    for the patches SegResNet takes): the same means (bitwise), and an operator ONNX has (area
    interpolation becomes adaptive average pooling, which the ONNX exporter cannot translate).
    Written out in loops so that TorchScript compiles it."""
    factors: list[int] = []
    exact = True
    for i in range(len(size)):
        full = int(x.shape[2 + i])
        factor = full // int(size[i])
        factors.append(factor)
        if factor * int(size[i]) != full:
            exact = False
    if not exact:
        return nn.functional.interpolate(x, size=size, mode="area")
    if x.dim() == 5:
        return nn.functional.avg_pool3d(x, kernel_size=factors, stride=factors)
    return nn.functional.avg_pool2d(x, kernel_size=factors, stride=factors)


class PositionAwareHead(nn.Module):
    """Classifier on ``[pooled features (n_features), tumour position (the rest)]``.

    Batch norm standardises the pooled features only. The position (atlas coordinates, already
    in -0.5 .. 0.5) bypasses it, scaled by 2: with training batches of 2-4 patches, batch
    statistics would turn each tumour's absolute atlas position into its position relative to
    the other tumours of the batch, and the class follows the absolute position.

    Input ``(B, n_features + n_position)``; output ``mlp``'s ``(B, num_classes)``.
    """

    def __init__(self, n_features: int, mlp: nn.Module) -> None:
        super().__init__()
        self.n_features = int(n_features)
        # no features (cls_inputs 'position'): nothing to standardise
        self.norm = BatchNorm1dOrRunning(self.n_features) if self.n_features else nn.Identity()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.norm(x[:, : self.n_features])
        return self.mlp(torch.cat([features, 2.0 * x[:, self.n_features :]], dim=1))


class BatchNorm1dOrRunning(nn.BatchNorm1d):
    """``BatchNorm1d`` that falls back to its running statistics for a training batch of one
    sample (plain batch norm cannot estimate a variance from one sample and raises)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training and x.shape[0] > 1
        if use_batch and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.1 if self.momentum is None else float(self.momentum)
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        use_batch, momentum, self.eps)


class SegmentationOutput(nn.Module):
    """Wraps a multi-task network so it returns only the segmentation logits.

    ``sliding_window_inference`` stitches spatial outputs only; the class logits are computed
    separately on a tumour-centred patch (see :mod:`pipeline.inference.predict`).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, tuple | list) else out
