"""How the two tasks pull on the shared encoder: per-task gradient norms and their cosine.

Every ``interval`` iterations, after the loss is computed and before the optimiser's backward
pass, :class:`GradientConflictHandler` takes the gradient of each weighted loss term
(``w_seg * L_seg`` and ``w_cls * L_cls``, :class:`pipeline.models.losses.MultiTaskLoss`) with
respect to the encoder's parameters (:data:`pipeline.training.staging.BRANCHES`' ``encoder``) and
puts into ``engine.state.output``:

* ``grad_seg`` / ``grad_cls``: the L2 norm of each task's encoder gradient;
* ``grad_cos``: their cosine (1: the tasks agree, 0: orthogonal, < 0: the class task pulls
  against the segmentation: the conflict that gradient surgery methods remove).

They are logged with the losses (``loss_output``: console and TensorBoard ``train`` scalars).
Cost: one extra backward pass through the encoder per task at the iterations measured (the
graph is kept for the training step), nothing at the others; a batch without both a mask and a
class, a network without encoder parameters and several processes (DDP reduces gradients inside
backward) are skipped. Written here because neither MONAI nor Ignite measures gradient conflict.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from pipeline.runtime.distributed import is_distributed, unwrap
from pipeline.training.staging import branch_of

__all__ = ["GradientConflictHandler", "encoder_gradient_stats"]


def encoder_gradient_stats(seg_term: torch.Tensor, cls_term: torch.Tensor,
                           params: list[torch.nn.Parameter]) -> dict[str, float]:
    """``{"grad_seg", "grad_cls", "grad_cos"}`` of two loss terms over ``params`` (graphs kept)."""
    flat = []
    for term in (seg_term, cls_term):
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params, strict=True)]))
    a, b = flat
    na, nb = float(a.norm()), float(b.norm())
    cos = float(torch.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return {"grad_seg": na, "grad_cls": nb, "grad_cos": cos}


class GradientConflictHandler:
    """Measure the tasks' encoder gradients every ``interval`` iterations (0: never); see the module."""

    def __init__(self, interval: int = 20) -> None:
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and not is_distributed():
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if (engine.state.iteration - 1) % self.interval:
            return
        terms: dict[str, Any] = getattr(engine.loss_function, "last_terms", {})
        seg, cls = terms.get("seg_term"), terms.get("cls_term")
        if seg is None or cls is None or not (seg.requires_grad and cls.requires_grad):
            return
        params = [p for n, p in unwrap(engine.network).named_parameters()
                  if p.requires_grad and branch_of(n) == "encoder"]
        if params:
            engine.state.output.update(encoder_gradient_stats(seg, cls, params))
