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

:class:`EncoderGradientRule` acts on the same two gradients (``mtl_method``,
:data:`pipeline.models.losses.MTL_METHODS`), between the backward pass and the optimiser step:

* ``pcgrad`` (Yu et al. 2020, two tasks): where the tasks' encoder gradients conflict
  (negative dot product), each is projected onto the normal plane of the other before they are
  added; where they agree, nothing changes;
* ``stop``: the class gradient reaches only the deepest ``cls_grad_levels`` levels of the encoder
  (SegResNet's ``down_layers``; ``0``: none, the head learns on features only the segmentation
  shapes), the shallower levels get the segmentation's gradient alone. With ``0`` levels the rule
  sets the network's ``cls_detach`` (its head then reads a detached bottleneck: the same update,
  without the extra backward pass, on every backbone) and does nothing else;
* ``gradnorm`` (Chen et al. 2018): after each loss, the weighted terms' gradient norms ``G_i`` at the
  encoder's deepest level (the last layer both tasks share) are compared with the common target
  ``mean(G) * r_i ** alpha``, ``r_i`` the term's loss relative to its first step's, over the mean of
  those ratios (a task that trains slower is given more pull); each weight moves against the sign of
  ``G_i - target_i`` (:func:`gradnorm_weights`) and the weights are rescaled to keep their sum. The
  loss (:class:`pipeline.models.losses.MultiTaskLoss`) holds them; they weigh the next step.

``pcgrad`` and ``stop`` take the class term's encoder gradient with one extra backward pass through the
encoder (the segmentation's is the total's remainder); ``gradnorm`` takes both terms' gradients at the
deepest level (two extra backward passes, the segmentation's through the decoder). Written by hand because neither MONAI nor Ignite has
gradient surgery; single process only (DDP averages inside the backward pass, before a rule could
see the two tasks apart) and SegResNet only (the encoder is named by
:data:`pipeline.training.staging.BRANCHES`).
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from pipeline.models.losses import MTL_METHODS
from pipeline.runtime.distributed import is_distributed, unwrap
from pipeline.training.staging import branch_of

__all__ = ["GradientConflictHandler", "encoder_gradient_stats", "EncoderGradientRule", "pcgrad_combine",
           "encoder_level", "gradnorm_weights"]


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


def pcgrad_combine(g_seg: torch.Tensor, g_cls: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """PCGrad for two tasks: ``(g_seg' + g_cls', conflicted)``, where each gradient loses its
    component along the other when their dot product is negative (both projections use the
    original gradients, as in Yu et al.'s algorithm 1)."""
    dot = torch.dot(g_seg, g_cls)
    if dot >= 0:
        return g_seg + g_cls, False
    seg_p = g_seg - dot / g_cls.dot(g_cls).clamp_min(1e-20) * g_cls
    cls_p = g_cls - dot / g_seg.dot(g_seg).clamp_min(1e-20) * g_seg
    return seg_p + cls_p, True


def gradnorm_weights(weights: torch.Tensor, grad_norms: torch.Tensor, losses: torch.Tensor,
                     initial_losses: torch.Tensor, alpha: float, lr: float) -> torch.Tensor:
    """One GradNorm step on the task weights (Chen et al. 2018, any number of tasks).

    ``grad_norms``: each weighted term's gradient norm at the shared layer (``G_i``); ``losses`` and
    ``initial_losses``: the unweighted terms now and at the first step. The target is
    ``mean(G) * (L_i / L_i(0) / mean_j(L_j / L_j(0))) ** alpha``; the gradient of GradNorm's loss
    ``sum |G_i - target_i|`` with respect to ``w_i`` is ``sign(G_i - target_i) * |grad L_i|``, so
    the weight moves against that sign, by the factor ``exp(lr)`` (a step of fixed size, as Adam's
    steps are in the paper, without its state; multiplicative, so a weight stays positive), and the
    weights are rescaled to their former sum.
    """
    ratio = losses / initial_losses.clamp_min(1e-12)
    target = grad_norms.mean() * (ratio / ratio.mean()).pow(float(alpha))
    moved = weights * torch.exp(-float(lr) * torch.sign(grad_norms - target))
    return moved * (weights.sum() / moved.sum())


def encoder_level(name: str) -> int | None:
    """The SegResNet encoder level of a parameter name: ``convInit`` 0, ``down_layers.<i>`` ``i``;
    ``None`` outside the encoder."""
    parts = name.split(".")
    if parts[0] == "convInit":
        return 0
    if parts[0] == "down_layers" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None


class EncoderGradientRule:
    """``pcgrad``, ``stop`` or ``gradnorm`` on the shared encoder's gradients (see the module);
    nothing for ``fixed`` and ``uncertainty`` (the loss implements those).

    Args:
        method: one of :data:`pipeline.models.losses.MTL_METHODS`.
        cls_grad_levels: ``stop``: how many of the deepest encoder levels the class gradient
            reaches (0: none).
        gradnorm_alpha: ``gradnorm``: how strongly a term that trains slower is given more pull
            (0: equal gradient norms).
        gradnorm_lr: ``gradnorm``: the step of each weight per iteration, in log-weight.
    """

    def __init__(self, method: str = "fixed", cls_grad_levels: int = 0, gradnorm_alpha: float = 1.5,
                 gradnorm_lr: float = 0.025) -> None:
        if method not in MTL_METHODS:
            raise ValueError(f"mtl_method must be one of {', '.join(MTL_METHODS)}, got {method!r}")
        if int(cls_grad_levels) < 0:
            raise ValueError(f"cls_grad_levels must be 0 or more, got {cls_grad_levels}")
        if float(gradnorm_alpha) < 0 or float(gradnorm_lr) <= 0:
            raise ValueError(f"gradnorm_alpha must be 0 or more and gradnorm_lr above 0, got {gradnorm_alpha}, "
                             f"{gradnorm_lr}")
        self.method = method
        self.cls_grad_levels = int(cls_grad_levels)
        self.gradnorm_alpha = float(gradnorm_alpha)
        self.gradnorm_lr = float(gradnorm_lr)
        self.params: list[tuple[torch.nn.Parameter, int]] = []
        self.cls_grads: list[torch.Tensor] | None = None
        self.steps = 0
        self.conflicts = 0

    def attach(self, engine: Engine) -> None:
        if self.method not in ("pcgrad", "stop", "gradnorm"):
            return
        detach = self.method == "stop" and self.cls_grad_levels == 0  # the network does it: any process count
        if is_distributed() and not detach:
            raise ValueError(f"mtl_method {self.method!r} works in one process only (DDP averages the gradients "
                             "inside the backward pass); use 'fixed', 'uncertainty' or 'stop' with cls_grad_levels 0 with several GPUs")
        engine.add_event_handler(Events.STARTED, self.find_encoder)
        if self.method == "gradnorm":
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.balance)
            return
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.take_class_gradient)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.combine)

    def find_encoder(self, engine: Engine) -> None:
        net = unwrap(engine.network)
        if self.method == "stop" and self.cls_grad_levels == 0 and hasattr(net, "cls_detach"):
            net.cls_detach = True  # the head's input detached: no class gradient reaches the encoder
            self.params = []
            return
        encoder = [(n, p) for n, p in net.named_parameters() if branch_of(n) == "encoder"]
        named = [(p, encoder_level(n)) for n, p in encoder if p.requires_grad]
        self.params = [(p, lvl) for p, lvl in named if lvl is not None]
        if encoder and not named:
            return  # a frozen encoder (freeze: ["encoder"]): no class gradient reaches it to act on
        if not self.params:
            raise ValueError(f"mtl_method {self.method!r} needs the SegResNet backbone (its encoder is what the rule "
                             "acts on); use 'fixed' or 'uncertainty' with other backbones")
        if getattr(net, "cls_inputs", "both") == "position" and getattr(net, "num_classes", 0) > 0:
            raise ValueError(f"mtl_method {self.method!r} acts between the two terms' gradients at the encoder, and a "
                             "class head with cls_inputs 'position' reads no encoder feature; set cls_inputs 'both'")
        if self.method == "gradnorm":
            deepest = max(lvl for _, lvl in self.params)
            self.params = [(p, lvl) for p, lvl in self.params if lvl == deepest]

    def balance(self, engine: Engine) -> None:
        """``gradnorm``: move the loss's task weights by one :func:`gradnorm_weights` step."""
        loss = engine.loss_function
        terms: dict[str, Any] = getattr(loss, "last_terms", {})
        if not self.params or not getattr(loss, "balanced", False) or "seg_term" not in terms:
            return  # a frozen encoder, one task trained, or a batch without both a mask and a class
        params = [p for p, _ in self.params]
        norms = []
        for key in ("seg_term", "cls_term"):
            grads = torch.autograd.grad(terms[key], params, retain_graph=True, allow_unused=True)
            squares = [(g.float() ** 2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else torch.zeros(()))
        dev = loss.task_w.device
        losses = torch.stack([terms["seg"].float(), terms["cls"].float()]).to(dev)
        with torch.no_grad():
            if torch.isnan(loss.initial_terms).any():
                loss.initial_terms.copy_(losses)
            loss.task_w.copy_(gradnorm_weights(loss.task_w, torch.stack(norms).to(dev), losses, loss.initial_terms,
                                               self.gradnorm_alpha, self.gradnorm_lr))

    def take_class_gradient(self, engine: Engine) -> None:
        if not self.params:
            return
        terms: dict[str, Any] = getattr(engine.loss_function, "last_terms", {})
        cls = terms.get("cls_term")
        self.cls_grads = None
        if cls is None or not cls.requires_grad:
            return  # a batch without both tasks: nothing to combine
        grads = torch.autograd.grad(cls, [p for p, _ in self.params], retain_graph=True, allow_unused=True)
        scale = float(engine.scaler.get_scale()) if getattr(engine, "amp", False) and engine.scaler is not None else 1.0
        self.cls_grads = [(g if g is not None else torch.zeros_like(p)) * scale
                          for g, (p, _) in zip(grads, self.params, strict=True)]

    def combine(self, engine: Engine) -> None:
        if self.cls_grads is None:
            return
        self.steps += 1
        if self.method == "stop":
            deepest = max(lvl for _, lvl in self.params)
            for (p, lvl), g_cls in zip(self.params, self.cls_grads, strict=True):
                if lvl <= deepest - self.cls_grad_levels and p.grad is not None:
                    p.grad.sub_(g_cls.to(p.grad.dtype))
        else:
            totals = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _ in self.params]
            g_cls = torch.cat([g.reshape(-1).float() for g in self.cls_grads])
            g_all = torch.cat([g.reshape(-1).float() for g in totals])
            combined, conflicted = pcgrad_combine(g_all - g_cls, g_cls)
            self.conflicts += int(conflicted)
            offset = 0
            for p, _ in self.params:
                n = p.numel()
                p.grad = combined[offset:offset + n].view_as(p).to(p.dtype)
                offset += n
            engine.state.output["grad_conflict"] = float(conflicted)
        self.cls_grads = None
