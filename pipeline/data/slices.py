"""2-D mode (``spatial_dims: 2``, ``configs/mtl2d.json``): train on axial slices of the registered
volumes, predict a volume slice by slice.

Training: the 3-D chain's crop sampler takes ``patch_size = [H, W, 1]`` patches, i.e. whole axial
slices (padded to ``H x W``), a slice through the tumour with probability ``pos_fraction`` (the
sampled centre voxel is a tumour voxel) and a background slice inside the brain otherwise;
:func:`to_slices` then drops the unit axis. The coordinate channels travel with the slice, so the
tumour head still knows the slice's height in the atlas.

Prediction (:func:`predict_slicewise`): every axial slice of the volume goes through the 2-D
network (in chunks), the slices' tumour probabilities are stacked back in their place, and the
class probabilities are the mean of the slices' probabilities weighted by each slice's predicted
tumour area (summed probability); with no tumour predicted anywhere, the plain mean. The returned
"logits" are the log of that mean (a softmax of them gives it back), so calibration and metrics
treat them as any logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["to_slices", "predict_slicewise", "slice_weights", "crop_size", "training_chain"]


def to_slices(keys: Sequence[str] = ("image", "label", "coords")) -> list:
    """Transforms turning ``(C, H, W, 1)`` training patches into ``(C, H, W)`` slices."""
    from monai.transforms import SqueezeDimd

    return [SqueezeDimd(keys=list(keys), dim=3, allow_missing_keys=True)]


def crop_size(patch_size: Sequence[int], spatial_dims: int = 3, slice_size: Sequence[int] | None = None) -> list[int]:
    """The training crop: ``patch_size`` in 3-D; in 2-D one slice thick, ``slice_size + [1]``."""
    if int(spatial_dims) == 3:
        return [int(s) for s in patch_size]
    if slice_size is None or len(slice_size) != 2:
        raise ValueError(f"spatial_dims 2 needs slice_size of two sizes, got {slice_size!r}")
    return [int(s) for s in slice_size] + [1]


def training_chain(deterministic: Sequence, random: Sequence, augmentation: Sequence, spatial_dims: int,
                   attach_coordinates: Sequence) -> list:
    """The training transforms in order: loading and normalisation, crops and flips, the overlay's
    augmentation, the 2-D slicing when ``spatial_dims`` is 2, and the coordinate channels last."""
    return [*deterministic, *random, *augmentation, *(to_slices() if int(spatial_dims) == 2 else []),
            *attach_coordinates]


def slice_weights(seg_prob: torch.Tensor) -> torch.Tensor:
    """Per-slice weights ``(D,)`` from a ``(D, 1, H, W)`` tumour probability stack: each slice's
    summed probability over the total, or uniform when the total is 0."""
    area = seg_prob.float().flatten(1).sum(1)
    total = area.sum()
    return area / total if float(total) > 0 else torch.full_like(area, 1.0 / len(area))


@torch.no_grad()
def predict_slicewise(network: torch.nn.Module, image: torch.Tensor, chunk: int = 16,
                      weights_from: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A 2-D network over every axial slice of ``(B, C, H, W, D)`` volumes.

    Returns ``(seg_prob (B, 1, H, W, D) | None, class_logits (B, K) | None)``: the slices' tumour
    probabilities in place, and the log of the area-weighted mean class probability. A network
    without decoder weighs its slices by ``weights_from`` (``(B, 1, H, W, D)`` true masks) when
    given, else equally.
    """
    segs, logits = [], []
    for b in range(image.shape[0]):
        slices = image[b].permute(3, 0, 1, 2)  # (D, C, H, W): slice k of the volume is item k
        seg_parts, prob_parts = [], []
        for start in range(0, slices.shape[0], chunk):
            out = network(slices[start:start + chunk])
            if out[0] is not None:
                seg_parts.append(torch.sigmoid(out[0].float()))
            if out[1] is not None:
                prob_parts.append(torch.softmax(out[1].float(), dim=1))
        seg = torch.cat(seg_parts) if seg_parts else None  # (D, 1, H, W)
        if seg is not None:
            segs.append(seg.permute(1, 2, 3, 0))  # (1, H, W, D)
        if prob_parts:
            probs = torch.cat(prob_parts)  # (D, K)
            if seg is not None:
                w = slice_weights(seg)
            elif weights_from is not None:
                w = slice_weights(weights_from[b].permute(3, 0, 1, 2).to(probs.device))
            else:
                w = torch.full((len(probs),), 1.0 / len(probs), device=probs.device)
            logits.append(torch.log((w[:, None] * probs).sum(0).clamp_min(1e-12)))
    return (torch.stack(segs) if segs else None), (torch.stack(logits) if logits else None)
