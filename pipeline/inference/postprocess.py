"""Connected-component post-processing of the tumour mask, chosen on validation cases.

Rules (``RULES``), applied to a ``(B, 1, H, W, D)`` probability map thresholded at ``threshold``
(26-connectivity):

- ``none``: the map as predicted.
- ``largest``: keep only the component with the most voxels. pLGG is one lesion, but when a
  false-positive blob is larger than the tumour this deletes the tumour (measured: two test cases at
  Dice 0 on an unseen cohort seed; docs/results-history.md).
- ``confident``: keep the component with the largest *summed probability* (the tumour the network
  is most sure of) and every other component whose summed probability is at least
  ``min_mass_fraction`` of it; drop only the small, unsure ones. It cannot delete the most
  confident tumour, and a real second focus of comparable evidence survives.

Which rule a model uses is decided from data, as nnU-Net does: after training, the best
checkpoint predicts the validation cases once, each rule is scored on them, and a rule other than
``none`` is kept only when it raises the mean validation Dice (:func:`choose_rule`). The decision
(and the classifier's temperature, :mod:`pipeline.inference.calibration`) is written next to the checkpoint
as ``postprocessing.json`` (:mod:`pipeline.training.decisions`) and read back by evaluation and
inference when ``postprocess`` is ``"auto"``.

Hand-written with ``scipy.ndimage.label`` because MONAI's ``KeepLargestConnectedComponent`` needs
scikit-image or cuCIM and knows only the by-size rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["RULES", "components", "apply_rule", "top_component_mask", "choose_rule", "dice_by_rule"]

RULES: tuple[str, ...] = ("none", "largest", "confident")
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def components(prob: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the components of ``prob >= threshold`` in one ``(H, W, D)`` map.

    Returns ``(labels, sizes, masses)``: the label image (0 = background, 1..n), and per component
    (index ``k-1`` for label ``k``) its voxel count and its summed probability.
    """
    mask = prob >= threshold
    structure = _STRUCTURE if prob.ndim == 3 else np.ones((3,) * prob.ndim, dtype=bool)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return labels, np.zeros(0, dtype=np.int64), np.zeros(0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    masses = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)[1:]
    return labels, sizes, masses


def _kept_labels(sizes: np.ndarray, masses: np.ndarray, rule: str, min_mass_fraction: float) -> np.ndarray:
    """Labels (1-based) a rule keeps, given the components' sizes and summed probabilities."""
    if rule == "largest":
        return np.array([int(np.argmax(sizes)) + 1])
    if rule == "confident":
        top = float(masses.max())
        return np.flatnonzero(masses >= min_mass_fraction * top) + 1
    raise ValueError(f"unknown post-processing rule {rule!r}; expected one of {RULES}")


def apply_rule(prob: torch.Tensor, rule: str, threshold: float = 0.5, min_mass_fraction: float = 0.2
               ) -> torch.Tensor:
    """Apply a component rule to a ``(B, 1, *spatial)`` probability map.

    Voxels of dropped components get probability 0; everything else (including sub-threshold
    voxels) is unchanged. ``rule="none"`` returns ``prob`` itself.
    """
    if rule == "none":
        return prob
    if rule not in RULES:
        raise ValueError(f"unknown post-processing rule {rule!r}; expected one of {RULES}")
    out = prob.clone()
    for b in range(prob.shape[0]):
        p = prob[b, 0].detach().float().cpu().numpy()
        labels, sizes, masses = components(p, threshold)
        if len(sizes) <= 1:
            continue
        keep = np.isin(labels, _kept_labels(sizes, masses, rule, min_mass_fraction))
        drop = torch.from_numpy((labels > 0) & ~keep).to(prob.device)
        out[b, 0] = torch.where(drop, torch.zeros_like(prob[b, 0]), prob[b, 0])
    return out


def top_component_mask(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor | None:
    """Boolean mask of the component with the largest summed probability in a ``(1, *spatial)``
    map, or ``None`` when nothing reaches ``threshold`` (used to centre the classification patch
    on the most confident tumour rather than between it and a false-positive blob)."""
    p = prob[0].detach().float().cpu().numpy()
    labels, sizes, masses = components(p, threshold)
    if len(sizes) == 0:
        return None
    return torch.from_numpy(labels == int(np.argmax(masses)) + 1)


def choose_rule(dice_by_rule: Mapping[str, Sequence[float]], min_gain: float = 1e-4) -> str:
    """The rule with the highest mean validation Dice; ``none`` unless another beats it by more
    than ``min_gain`` (nnU-Net's criterion: post-process only when it helps on validation).
    Ties go to the more conservative rule: ``none``, then ``confident``, then ``largest``.

    Args:
        dice_by_rule: rule -> per-case validation Dice (same cases, same order, for every rule).

    Returns:
        a rule name; ``none`` when no case was scored.
    """
    means = {r: float(np.mean(v)) for r, v in dice_by_rule.items() if len(v)}
    if not means:
        return "none"
    base = means.get("none", -np.inf)
    caution = {"none": 2, "confident": 1}
    best = max(means, key=lambda r: (means[r], caution.get(r, 0)))
    return best if best == "none" or means[best] > base + min_gain else "none"


def dice_by_rule(prob: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5, min_mass_fraction: float = 0.2
                 ) -> dict[str, float]:
    """Dice of each rule's mask against ``truth``, for one case.

    Args:
        prob: ``(1, 1, *spatial)`` tumour probability before any rule.
        truth: ``(1, 1, *spatial)`` ground-truth mask (> 0 is tumour).

    Returns:
        rule -> Dice (MONAI ``compute_dice``; 1 when both masks are empty).
    """
    from monai.metrics import compute_dice

    target = (truth > 0).float()
    return {rule: float(compute_dice((apply_rule(prob, rule, threshold, min_mass_fraction) >= threshold).float(),
                                     target, include_background=True, ignore_empty=False).item())
            for rule in RULES}
