"""Staged training: start from another checkpoint's weights, train only the branches the loss uses.

The multi-task recipe of Hryniewska-Guzik et al. trains in stages, each from the previous stage's
weights (``configs/stage1_cls_recon.json``, then ``configs/stage2_seg_recon.json --init_from``).
:func:`prepare_for_training` is what ``train.json``'s ``network`` calls on the config's network:

- ``init_from``: every tensor of the checkpoint whose name and shape match a tensor of this network
  is copied; the rest stays at random. It prints what was loaded and what was not, by branch.
- Branches whose loss weight is 0 are frozen (``requires_grad = False``, so the optimizer and DDP
  leave them alone): the segmentation decoder when ``seg_weight = 0``, the classifier when
  ``cls_weight = 0``, the reconstruction decoder when ``recon_weight = 0``, the detection head when
  ``det_weight = 0``. The shared encoder
  always trains, unless ``freeze`` names it.
- ``freeze``: branches frozen whatever their loss weight, e.g. ``["encoder"]`` in stage 2 of the staged
  recipe, so that the features stage 1's classifier reads stay those it was trained on (the
  segmentation decoder then learns on a fixed encoder). SegResNet's encoder has group norm and no
  dropout, so a frozen encoder gives the same features in training and evaluation mode.

A frozen branch keeps its normalisation statistics too (:func:`hold_statistics`): the classifier's batch
norm would otherwise follow the batches of the later stage in training mode, and the class it gives in
evaluation mode would drift with frozen weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.io.errors import InputError
from pipeline.models.losses import MultiTaskLoss

__all__ = ["BRANCHES", "branch_of", "load_matching", "freeze_untrained", "freeze_named", "hold_statistics",
           "prepare_for_training", "active_loss_weights",
           "effective_mtl_method", "multitask_loss"]

#: Top-level module names of each branch of :class:`pipeline.models.networks.MultiTaskSegResNet`.
BRANCHES: dict[str, tuple[str, ...]] = {
    "encoder": ("convInit", "down_layers"),
    "seg": ("up_layers", "up_samples", "conv_final"),
    "cls": ("classifier",),
    "recon": ("recon_up_layers", "recon_up_samples", "recon_final"),
    "det": ("det_head",),
}


def branch_of(name: str) -> str:
    """The branch (:data:`BRANCHES`) a parameter or buffer name belongs to, ``other`` if none."""
    top = name.split(".", 1)[0]
    return next((b for b, tops in BRANCHES.items() if top in tops), "other")


def _summary(names: list[str]) -> str:
    counts = Counter(branch_of(n) for n in names)
    return ", ".join(f"{b} {n}" for b, n in sorted(counts.items())) or "none"


def load_matching(network: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy every tensor of checkpoint ``path`` whose name and shape match into ``network``.

    Returns ``{"loaded": [...], "random": [...], "mismatched": [...], "unused": [...]}`` (names):
    loaded, left at their random initialisation (absent from the file), present with another
    shape (left random too), and the file's tensors this network has no place for.

    Raises:
        InputError: not a checkpoint (:func:`pipeline.models.weights.read_weights`), or no tensor matches.
    """
    from pipeline.models.weights import read_weights
    from pipeline.runtime.distributed import unwrap

    state = read_weights(path)
    net = unwrap(network)
    own = net.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)]
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if not loaded:
        raise InputError(path, f"--init_from: none of its {len(state)} tensors fits this network (first: "
                               f"{next(iter(state))!r}); give a checkpoint of this bundle")
    net.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "random": [k for k in own if k not in state], "mismatched": mismatched,
            "unused": [k for k in state if k not in own]}


def hold_statistics(network: torch.nn.Module, branches: Sequence[str]) -> int:
    """Keep the running statistics of the named branches' norm layers (batch norm, instance norm
    with ``track_running_stats``) as they are: momentum 0, so training mode normalises with the batch
    as before but no longer moves the statistics that evaluation mode uses; ``network.train()``
    leaves this in place. Returns the number of layers held."""
    held = 0
    for name, m in network.named_modules():
        if name and branch_of(name) in branches and getattr(m, "running_mean", None) is not None:
            m.momentum = 0.0
            held += 1
    return held


def freeze_untrained(network: torch.nn.Module, seg_weight: float, cls_weight: float, recon_weight: float,
                     det_weight: float = 0.0) -> list[str]:
    """Set ``requires_grad = False`` on the branches whose loss weight is 0; returns their names."""
    off = {"seg": seg_weight == 0, "cls": cls_weight == 0, "recon": recon_weight == 0, "det": det_weight == 0}
    frozen = [b for b, is_off in off.items() if is_off]
    for name, p in network.named_parameters():
        if branch_of(name) in frozen:
            p.requires_grad_(False)
    hold_statistics(network, frozen)
    present = {branch_of(n) for n, _ in network.named_parameters()}
    return [b for b in frozen if b in present]


def freeze_named(network: torch.nn.Module, branches: Sequence[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter of the named branches (:data:`BRANCHES`);
    returns those of them the network has.

    Raises:
        InputError: a name that is not a branch, or nothing left to train.
    """
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        raise InputError(None, f"freeze: {', '.join(map(repr, unknown))} is not a branch; "
                               f"the branches are {', '.join(BRANCHES)}")
    for name, p in network.named_parameters():
        if branch_of(name) in branches:
            p.requires_grad_(False)
    hold_statistics(network, branches)
    if not any(p.requires_grad for p in network.parameters()):
        raise InputError(None, f"freeze {list(branches)} leaves no parameter to train")
    present = {branch_of(n) for n, _ in network.named_parameters()}
    return [b for b in BRANCHES if b in branches and b in present]


def prepare_for_training(network: torch.nn.Module, init_from: str | None = None,
                         loss_weights: Mapping[str, float] | None = None,
                         freeze: Sequence[str] = ()) -> torch.nn.Module:
    """``init_from`` (optional), then :func:`freeze_untrained` with ``loss_weights`` (those of
    :func:`active_loss_weights`; by default the study's 1.0 / 0.3 / 0.0) and :func:`freeze_named`
    with ``freeze``; prints what it did. Returns ``network``."""
    weights = {"seg_weight": 1.0, "cls_weight": 0.3, "recon_weight": 0.0, "det_weight": 0.0, **(loss_weights or {})}
    if init_from:
        r = load_matching(network, init_from)
        print(f"[init_from] {init_from}: loaded {len(r['loaded'])} tensors ({_summary(r['loaded'])}); "
              f"left at random {len(r['random'])} ({_summary(r['random'])})"
              + (f": {', '.join(r['random'][:8])}{' ...' if len(r['random']) > 8 else ''}" if r["random"] else "")
              + (f"; {len(r['mismatched'])} with another shape, left at random: {', '.join(r['mismatched'][:8])}"
                 if r["mismatched"] else "")
              + (f"; {len(r['unused'])} of the file's tensors unused ({_summary(r['unused'])})" if r["unused"] else ""),
              flush=True)
    frozen = freeze_untrained(network, weights["seg_weight"], weights["cls_weight"], weights["recon_weight"],
                              weights["det_weight"])
    if frozen:
        n = sum(p.numel() for p in network.parameters() if not p.requires_grad)
        print(f"[staging] frozen (loss weight 0): {', '.join(frozen)} ({n} parameters); training "
              f"{sum(p.numel() for p in network.parameters() if p.requires_grad)} parameters", flush=True)
    if freeze:
        named = freeze_named(network, list(freeze))
        n = sum(p.numel() for p in network.parameters() if not p.requires_grad)
        print(f"[staging] frozen (freeze): {', '.join(named) or 'none of them in this network'}; {n} parameters "
              f"frozen in all, training {sum(p.numel() for p in network.parameters() if p.requires_grad)}", flush=True)
    return network


def active_loss_weights(seg_weight: float, cls_weight: float, recon_weight: float, segment: bool = True,
                        multitask: bool = True, reconstruct: bool = False, det_weight: float = 0.0,
                        detect: bool = False) -> dict[str, float]:
    """The loss weights of the branches the network has: a branch the config switches off
    (``segment``, ``multitask``, ``reconstruct``, ``detect`` false) weighs 0, so its term is not
    computed and its parameters are frozen (:func:`prepare_for_training`).

    Returns:
        ``{"seg_weight", "cls_weight", "recon_weight", "det_weight"}``.
    """
    return {"seg_weight": float(seg_weight) if segment else 0.0, "cls_weight": float(cls_weight) if multitask else 0.0,
            "recon_weight": float(recon_weight) if reconstruct else 0.0,
            "det_weight": float(det_weight) if detect else 0.0}


def effective_mtl_method(mtl_method: str, loss_weights: Mapping[str, float]) -> str:
    """The multi-task method the run uses: ``mtl_method``, except that ``pcgrad``, ``stop`` and
    ``gradnorm`` (which act between the class term's and the segmentation's gradients at the shared
    encoder) become ``fixed`` in a run that does not train both terms: a classifier without decoder
    (``configs/classify_only.json``, the classifier-alone backbones, stage 1 of the staged recipe)
    or segmentation alone. There ``stop`` would leave the encoder to no task, and an overlay that
    sets a method for multi-task runs (``configs/demo.json``) must not break the other arms.

    Example:
        >>> effective_mtl_method("stop", {"seg_weight": 0.0, "cls_weight": 1.0, "recon_weight": 0.5})
        'fixed'
    """
    if mtl_method in ("pcgrad", "stop", "gradnorm") and not (loss_weights["seg_weight"] > 0 and loss_weights["cls_weight"] > 0):
        print(f"[mtl] mtl_method {mtl_method!r} acts between the segmentation and the class terms; this run "
              f"trains {'the class without segmentation' if loss_weights['cls_weight'] > 0 else 'no class term'}: "
              "'fixed'", flush=True)
        return "fixed"
    return mtl_method


def multitask_loss(loss_weights: Mapping[str, float], **kwargs: Any) -> MultiTaskLoss:
    """The run's loss: :class:`pipeline.models.losses.MultiTaskLoss` with ``loss_weights`` (those of
    :func:`active_loss_weights`) and the other arguments of ``MultiTaskLoss`` (``seg_loss``,
    ``class_weights``, ...)."""
    return MultiTaskLoss(**loss_weights, **kwargs)
