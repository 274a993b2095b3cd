"""Swappable backbones: MONAI's U-Nets and SwinUNETR behind the multi-task network's interface.

:func:`multitask_network` (the configs' ``network_def``) builds, by ``backbone``:

- ``segresnet`` (default, the study): :class:`pipeline.models.networks.MultiTaskSegResNet`;
- ``basic_unet`` (:class:`monai.networks.nets.BasicUNet`), ``unet`` (the classic U-Net,
  :class:`monai.networks.nets.UNet` with residual units), ``attention_unet``
  (:class:`monai.networks.nets.AttentionUnet`) and ``swin_unetr``
  (:class:`monai.networks.nets.SwinUNETR`): :class:`MultiTaskBackboneNet`, the same classifier head
  (:class:`pipeline.models.networks.TumourHeadMixin`) on the backbone's deepest features.

Every network returns ``(seg_logits, class_logits | None, embedding)``. MONAI's networks return the
segmentation only, so each adapter below calls the network's own stages (its modules, its
weights) in MONAI's order and also returns the deepest features. How the bottleneck is reached:

- ``basic_unet``: ``conv_0``, ``down_1`` .. ``down_4``; ``down_4``'s output (``features[4]``
  channels, 1/16 of the size) is the bottleneck; then ``upcat_4`` .. ``upcat_1`` with the skips.
- ``unet``: ``UNet.model`` nests ``Sequential(down, SkipConnection(inner), up)``; unrolled, the
  innermost ``SkipConnection``'s submodule (the bottom residual unit, ``channels[-1]``, 1/16) gives
  the bottleneck, and each ``up`` takes ``cat([its down's output, what comes from below])``.
- ``attention_unet``: ``model = Sequential(head, AttentionLayer, reduce_channels)``; each
  ``AttentionLayer``'s submodule is ``Sequential(strided ConvBlock, next layer)``, the last one a
  strided ``ConvBlock`` whose output is the bottleneck (``channels[-1]``, 1/16); going up, each
  layer's ``upconv``, attention gate (``g`` from below, ``x`` the skip) and ``merge``.
- ``swin_unetr``: ``swinViT`` gives five hidden states; ``encoder10`` on the deepest
  (``16 x feature_size`` channels, 1/32) is the bottleneck (what ``decoder5`` starts from).

The adapters zero-pad the input at the end to a multiple of their total down-sampling (16, or 32
for SwinUNETR), and to at least twice it (their bottleneck's instance norm needs more than one
cell), then crop the segmentation back, so any patch size works, e.g. the demo's 48-cubed patches with
SwinUNETR. The width follows ``init_filters`` (``f``): BasicUNet ``(f, f, 2f, 4f, 8f, f)``,
UNet / AttentionUnet ``(f, 2f, 4f, 8f, 16f)`` with strides 2, SwinUNETR ``feature_size`` the
multiple of 12 nearest ``1.5 f`` (at least 12); ``backbone_kwargs`` overrides any argument.

TorchScript: BasicUNet, UNet and AttentionUnet script; SwinUNETR does not (MONAI's Swin
transformer uses constructs TorchScript rejects): export it with ONNX (``python -m pipeline onnx``).
ONNX with free spatial axes (``python -m pipeline onnx``): every U-Net backbone and the
reconstruction network; sizes are multiples of ``export_factor`` (16) and at least
``export_min_size`` (twice that), where the padding below is zero. SwinUNETR exports with a free
batch and the spatial size fixed to ``patch_size`` (the window attention mask is traced as a constant).
Not supported with these backbones: ``reconstruct``; ``segment: false`` (the classifier alone) only
on ``basic_unet`` (the 2-D study's classifier alone, ``configs/cls2d.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import AttentionUnet, BasicUNet, SwinUNETR, UNet
from torch import nn

from pipeline.models.networks import MultiTaskSegResNet, TumourHeadMixin

__all__ = ["head_classes", "BACKBONES", "multitask_network", "MultiTaskBackboneNet"]

BACKBONES: tuple[str, ...] = ("segresnet", "basic_unet", "unet", "attention_unet", "swin_unetr")


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(B, C, *spatial)`` at their end to a multiple of ``multiple``
    and at least ``2 * multiple``: the bottleneck's instance norm needs more than one cell."""
    pad: list[int] = []
    for i in range(x.dim() - 1, 1, -1):
        n = x.shape[i]  # not int(): under torch.export a symbolic size stays symbolic (ONNX export)
        pad += [0, max((multiple - n % multiple) % multiple, 2 * multiple - n)]
    return nn.functional.pad(x, pad)


def _crop_to(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The first ``like.shape[2:]`` voxels of each spatial axis of ``y``."""
    if y.dim() == 5:
        return y[:, :, : like.shape[2], : like.shape[3], : like.shape[4]]
    return y[:, :, : like.shape[2], : like.shape[3]]


class BasicUNetStages(nn.Module):
    def __init__(self, net: BasicUNet) -> None:
        super().__init__()
        self.net = net
        self.multiple = 16
        self.strides = [1, 2, 4, 8, 16]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.net.conv_0(x)
        x1 = self.net.down_1(x0)
        x2 = self.net.down_2(x1)
        x3 = self.net.down_3(x2)
        return [x0, x1, x2, x3, self.net.down_4(x3)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = self.encode(_pad_to(x, self.multiple))
        u = self.net.upcat_4(xs[4], xs[3])
        u = self.net.upcat_3(u, xs[2])
        u = self.net.upcat_2(u, xs[1])
        u = self.net.upcat_1(u, xs[0])
        return _crop_to(self.net.final_conv(u), x), xs[4]


class UNetStages(nn.Module):
    def __init__(self, net: UNet) -> None:
        super().__init__()
        downs, ups = [], []
        m = net.model
        while True:
            downs.append(m[0])
            ups.append(m[2])
            inner = m[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                m = inner
            else:
                break
        self.downs, self.ups, self.bottom = nn.ModuleList(downs), nn.ModuleList(ups[::-1]), inner
        self.multiple = 2 ** len(downs)
        self.strides = [2 ** (i + 1) for i in range(len(downs))] + [self.multiple]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips: list[torch.Tensor] = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        return skips + [self.bottom(x)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.encode(_pad_to(x, self.multiple))
        bottleneck = levels[-1]
        y = bottleneck
        n = len(levels) - 1
        for i, up in enumerate(self.ups):
            y = up(torch.cat([levels[n - 1 - i], y], dim=1))
        return _crop_to(y, x), bottleneck


class AttentionUNetStages(nn.Module):
    def __init__(self, net: AttentionUnet) -> None:
        super().__init__()
        self.head, self.reduce = net.model[0], net.model[2]
        layers, convs = [], []
        layer = net.model[1]
        while True:
            layers.append(layer)
            sub = layer.submodule
            if isinstance(sub, nn.Sequential):
                convs.append(sub[0])
                layer = sub[1]
            else:
                convs.append(sub)
                break
        self.layers = nn.ModuleList(layers[::-1])  # deepest first, for the way up
        self.convs = nn.ModuleList(convs)
        self.multiple = 2 ** len(convs)
        self.strides = [2 ** i for i in range(len(convs) + 1)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.head(x)
        levels = [x]
        for conv in self.convs:
            x = conv(x)
            levels.append(x)
        return levels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.encode(_pad_to(x, self.multiple))
        bottleneck = levels[-1]
        y = bottleneck
        n = len(levels) - 1
        for i, layer in enumerate(self.layers):
            skip = levels[n - 1 - i]
            up = layer.upconv(y)
            att = layer.attention(g=up, x=skip)
            y = layer.merge(torch.cat((att, up), dim=1))
        return _crop_to(self.reduce(y), x), bottleneck


class SwinUNETRStages(nn.Module):
    def __init__(self, net: SwinUNETR) -> None:
        super().__init__()
        self.net = net
        self.multiple = 32
        self.strides = [1, 2, 4, 8, 32]

    def _hidden(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hidden = self.net.swinViT(x, self.net.normalize)
        enc = [self.net.encoder1(x), self.net.encoder2(hidden[0]), self.net.encoder3(hidden[1]),
               self.net.encoder4(hidden[2]), self.net.encoder10(hidden[4])]
        return enc, hidden

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._hidden(x)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, hidden = self._hidden(_pad_to(x, self.multiple))
        d = self.net.decoder5(enc[4], hidden[3])
        d = self.net.decoder4(d, enc[3])
        d = self.net.decoder3(d, enc[2])
        d = self.net.decoder2(d, enc[1])
        d = self.net.decoder1(d, enc[0])
        return _crop_to(self.net.out(d), x), enc[4]


def _build(backbone: str, spatial_dims: int, in_channels: int, out_channels: int, f: int,
           kwargs: dict[str, Any]) -> tuple[nn.Module, int]:
    """``(stages adapter, bottleneck channels)`` of a MONAI backbone."""
    if backbone == "basic_unet":
        a = {"features": (f, f, 2 * f, 4 * f, 8 * f, f), **kwargs}
        return BasicUNetStages(BasicUNet(spatial_dims, in_channels, out_channels, **a)), int(a["features"][4])
    if backbone == "unet":
        a = {"channels": tuple(f * 2 ** i for i in range(5)), "strides": (2, 2, 2, 2), "num_res_units": 2, **kwargs}
        return UNetStages(UNet(spatial_dims, in_channels, out_channels, **a)), int(a["channels"][-1])
    if backbone == "attention_unet":
        a = {"channels": tuple(f * 2 ** i for i in range(5)), "strides": (2, 2, 2, 2), **kwargs}
        return AttentionUNetStages(AttentionUnet(spatial_dims, in_channels, out_channels, **a)), int(a["channels"][-1])
    if backbone == "swin_unetr":
        a = {"feature_size": max(12, 12 * round(1.5 * f / 12)), **kwargs}
        net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, **a)
        return SwinUNETRStages(net), 16 * int(a["feature_size"])
    raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")


class MultiTaskBackboneNet(TumourHeadMixin, nn.Module):
    """A MONAI backbone (see the module's docstring) + the study's classifier head on its bottleneck.

    Args:
        backbone: ``basic_unet``, ``unet``, ``attention_unet`` or ``swin_unetr``.
        init_filters: width of the first level (see the module's docstring).
        backbone_kwargs: more arguments of the MONAI network (override the derived ones).
        the rest: as :class:`pipeline.models.networks.MultiTaskSegResNet`.

    Forward: ``x`` ``(B, in_channels + coord_channels, *spatial)``, any spatial size; returns
    ``(seg_logits (B, out_channels, *spatial), class_logits (B, K) | None, embedding (B, C))``.
    """

    def __init__(self, backbone: str = "basic_unet", spatial_dims: int = 3, in_channels: int = 1,
                 out_channels: int = 1, num_classes: int = 3, init_filters: int = 32,
                 cls_hidden: Sequence[int] = (128,), cls_dropout: float = 0.3, cls_pooling: str = "mean",
                 coord_channels: int = 0, tumour_floor: float = 1e-3, coord_mirror_axes: Sequence[int] = (),
                 cls_inputs: str = "both", backbone_kwargs: dict[str, Any] | None = None, decoder: bool = True) -> None:
        super().__init__()
        if not decoder and (backbone != "basic_unet" or cls_pooling != "mean" or coord_channels or num_classes <= 0):
            raise ValueError("a backbone without decoder (the classifier alone, e.g. configs/cls2d.json) is built on "
                             "basic_unet with cls_pooling 'mean', no coordinate channels and num_classes > 0")
        self.backbone_name = backbone
        self.spatial_dims = int(spatial_dims)
        self.backbone, width = _build(backbone, spatial_dims, in_channels, out_channels, int(init_filters),
                                      dict(backbone_kwargs or {}))
        self.has_decoder = bool(decoder)
        if not self.has_decoder:  # built by BasicUNet's __init__; dropped so that no weight is unused
            for name in ("upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv"):
                setattr(self.backbone.net, name, nn.Identity())
        self.reconstruct = False
        self.downsampling = 1  # the adapters pad internally: any size goes in
        # ONNX export (pipeline.models.onnx_export) traces sizes that are multiples of the backbone's own
        # down-sampling and at least twice it, where the padding is provably zero
        self.export_factor = int(self.backbone.multiple)
        self.export_min_size = 2 * int(self.backbone.multiple)
        # MONAI's SwinUNETR computes its shifted-window attention mask from the input size in Python:
        # a trace bakes it in, so its ONNX export has a fixed spatial size (measured: ONNX Runtime
        # fails to reshape at any other size)
        self.export_dynamic_spatial = backbone != "swin_unetr"
        self.encoder_strides = list(self.backbone.strides)
        self._init_head(width, spatial_dims, in_channels, num_classes, cls_hidden, cls_dropout, cls_pooling,
                        coord_channels, tumour_floor, coord_mirror_axes, cls_inputs)

    @torch.jit.unused
    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's encoder levels, finest first, the bottleneck last; level ``i`` is
        ``encoder_strides[i]`` times coarser than the input (used by retrieval's RoI pooling)."""
        return self.backbone.encode(_pad_to(x[:, : self.image_channels], self.backbone.multiple))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        if not self.has_decoder:
            bottleneck = self.backbone.encode(_pad_to(x[:, : self.image_channels], self.backbone.multiple))[-1]
            logits, embedding = self._classify(x, bottleneck, None)
            return None, logits, embedding
        seg, bottleneck = self.backbone(x[:, : self.image_channels])
        logits, embedding = self._classify(x, bottleneck, seg)
        return seg, logits, embedding


def multitask_network(backbone: str = "segresnet", backbone_kwargs: dict[str, Any] | None = None,
                      patch_size: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
    """The configs' ``network_def``: :class:`~pipeline.models.networks.MultiTaskSegResNet` for ``segresnet``,
    :class:`MultiTaskBackboneNet` for the other segmentation backbones, and for the classifier-alone
    baselines (``densenet121``, ``resnet18``, ``vit``, with ``decoder=False``)
    :class:`pipeline.models.classifiers.ClassifierAlone`. ``kwargs`` are MultiTaskSegResNet's arguments
    (the SegResNet-only ones, ``blocks_down`` / ``blocks_up`` / ``dropout_prob`` / ``norm``, are
    ignored by the others; ``decoder=False``, ``reconstruct=True`` and ``detect=True`` need SegResNet);
    ``patch_size`` is the ViT's input size."""
    from pipeline.models.classifiers import CLASSIFIERS, ClassifierAlone

    if backbone == "segresnet":
        return MultiTaskSegResNet(**kwargs)
    if backbone in CLASSIFIERS:
        if kwargs.get("decoder", True):
            raise ValueError(f"backbone {backbone!r} is a classifier alone: set segment: false "
                             f"(configs/cls_{backbone}.json does)")
        return ClassifierAlone(backbone, kwargs.get("spatial_dims", 3), kwargs.get("in_channels", 1),
                               kwargs.get("num_classes", 3), patch_size or (48, 48, 48), backbone_kwargs)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES + CLASSIFIERS)}")
    for branch in ("reconstruct", "detect"):
        if kwargs.pop(branch, False):
            raise ValueError(f"backbone {backbone!r}: the {branch} branch is built on SegResNet only; use "
                             "backbone 'segresnet'")
    for key in ("blocks_down", "blocks_up", "dropout_prob", "norm", "det_levels", "det_channels", "det_anchors",
                "det_detach"):
        kwargs.pop(key, None)
    return MultiTaskBackboneNet(backbone=backbone, backbone_kwargs=backbone_kwargs, **kwargs)


def head_classes(num_classes: int, multitask: bool) -> int:
    """Classes of the network's classifier head: ``num_classes`` when it classifies (``multitask``), 0 (no head) otherwise."""
    return int(num_classes) if multitask else 0
