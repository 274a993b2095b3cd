"""Classifier-alone baselines: MONAI's DenseNet121, ResNet-18 and ViT on the tumour-centred patch.

The model comparison's single-task classifiers (``configs/cls_densenet121.json``,
``cls_resnet18.json``, ``cls_vit.json``; experiment arms such as ``dn=configs/cls_densenet121.json``)
go through the same bundle as the multi-task network: same data chain, loss (its class term alone,
``segment: false``), engines and metrics. They read the patch the multi-task classifier reads: in
training the positive patches of the crop sampler (the class term only from patches that show the
tumour), at validation and evaluation one patch of the training size centred on the tumour's
bounding box (:func:`tumour_centred_crop`, from the case's mask: the baselines have no decoder to
find the tumour, so they are told where it is). A case without a mask is cropped at the volume's
centre; folder inference on new scans (no mask) reads the whole volume, which the CNNs accept and
the ViT (fixed input size) does not: the ViT baseline is for evaluation.

Each network returns ``(None, class_logits (B, K), embedding (B, C))``, the multi-task interface
without a mask; the embedding is the feature vector before the last linear layer (DenseNet121:
1024, ResNet-18: 512, ViT: the class token after the final norm, ``hidden_size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121, ViT, resnet18
from torch import nn

__all__ = ["validation_chain", "CLASSIFIERS", "ClassifierAlone", "tumour_centred_crop", "tumour_or_everything"]

CLASSIFIERS: tuple[str, ...] = ("densenet121", "resnet18", "vit")


class ClassifierAlone(nn.Module):
    """A MONAI classification network with the multi-task network's outputs.

    Args:
        backbone: ``densenet121``, ``resnet18`` or ``vit``.
        spatial_dims / in_channels / num_classes: as the multi-task network.
        patch_size: the input size (the ViT's ``img_size``; its ``patch_size`` is 16, or 8 when the
            input is smaller than 32 voxels along an axis).
        backbone_kwargs: more arguments of the MONAI network (the ViT defaults to a small one for
            the CPU demo: hidden 192, 4 layers, 3 heads, MLP 768).
    """

    def __init__(self, backbone: str = "densenet121", spatial_dims: int = 3, in_channels: int = 1,
                 num_classes: int = 3, patch_size: Sequence[int] = (48, 48, 48),
                 backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        kw = dict(backbone_kwargs or {})
        self.backbone_name = backbone
        self.spatial_dims = int(spatial_dims)
        self.num_classes = int(num_classes)
        self.image_channels = int(in_channels)
        self.has_decoder = False
        self.reconstruct = False
        if backbone == "densenet121":
            self.net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kw)
            self.embedding_dim = int(self.net.class_layers.out.in_features)
            self.downsampling = 32
        elif backbone == "resnet18":
            self.net = resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kw)
            self.embedding_dim = int(self.net.fc.in_features)
            self.downsampling = 32
        elif backbone == "vit":
            size = [int(s) for s in patch_size][:spatial_dims]
            patch = 16 if min(size) >= 32 else 8
            a = {"hidden_size": 192, "mlp_dim": 768, "num_layers": 4, "num_heads": 3, **kw}
            self.net = ViT(in_channels=in_channels, img_size=size, patch_size=patch, classification=True,
                           num_classes=num_classes, spatial_dims=spatial_dims, post_activation="none", **a)
            self.embedding_dim = int(a["hidden_size"])
            self.downsampling = 1
        else:
            raise ValueError(f"unknown classifier {backbone!r}: use one of {', '.join(CLASSIFIERS)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x = x[:, : self.image_channels]
        if self.backbone_name == "densenet121":
            c = self.net.class_layers  # relu, pool, flatten, out
            h = c.flatten(c.pool(c.relu(self.net.features(x))))
            return None, c.out(h), h
        if self.backbone_name == "resnet18":
            n = self.net
            h = n.maxpool(n.act(n.bn1(n.conv1(x))))
            h = n.layer4(n.layer3(n.layer2(n.layer1(h))))
            h = torch.flatten(n.avgpool(h), 1)
            return None, n.fc(h), h
        n = self.net
        h = n.patch_embedding(x)
        h = torch.cat((n.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        for blk in n.blocks:
            h = blk(h)
        h = n.norm(h)[:, 0]
        return None, n.classification_head(h), h


def tumour_or_everything(mask: torch.Tensor) -> torch.Tensor:
    """The tumour voxels, or every voxel for an empty mask (so the crop keeps the whole volume
    instead of MONAI's empty box)."""
    inside = mask > 0
    return inside if bool(inside.any()) else torch.ones_like(inside)


def validation_chain(loading: Sequence, patch_size: Sequence[int], on_tumour_patch: bool = False,
                     then: Sequence = ()) -> list:
    """The validation transforms: the loading chain, then (``on_tumour_patch``) the patch centred on
    the true tumour (:func:`tumour_centred_crop`) instead of the whole registered brain, then ``then``
    (the atlas coordinates, ``attach_coordinates``)."""
    return [*loading, *(tumour_centred_crop(patch_size) if on_tumour_patch else []), *then]


def tumour_centred_crop(patch_size: Sequence[int], keys: Sequence[str] = ("image", "label")) -> list:
    """Transforms that cut one ``patch_size`` patch centred on the mask's bounding box (real image
    around it: the box plus half a patch of margin, then MONAI's centre crop / pad), or at the
    volume's centre for an empty mask. Append them to the validation chain."""
    from monai.transforms import CropForegroundd, ResizeWithPadOrCropd

    margin = [int(s) // 2 for s in patch_size]
    return [CropForegroundd(keys=list(keys), source_key="label", select_fn=tumour_or_everything, margin=margin,
                            allow_smaller=True, allow_missing_keys=True),
            ResizeWithPadOrCropd(keys=list(keys), spatial_size=list(patch_size), allow_missing_keys=True)]
