"""Decisions made on validation cases after training and stored with the checkpoint.

After a training run, :func:`decide_on_validation` lets the best checkpoint (``model.pt``) predict
the run's validation cases once and decides

- the connected-component rule (:func:`pipeline.inference.postprocess.choose_rule`: a rule other than
  ``none`` only when it raises the mean validation Dice, as nnU-Net decides its post-processing);
- the classifier's temperature (:func:`pipeline.inference.calibration.fit_temperature`: validation NLL).

Both go to ``postprocessing.json`` beside the checkpoint, with the checkpoint's SHA-256 so a
decision is never applied to weights it was not made for. Evaluation and inference read it when
their ``postprocess`` / ``temperature`` settings are ``"auto"`` (:func:`resolve_postprocess`,
:func:`resolve_temperature`). A TorchScript export (``model.ts``) finds the decision of the
``model.pt`` it was exported from when ``postprocessing.json`` is copied beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.calibration import expected_calibration_error, fit_temperature, nll
from pipeline.inference.postprocess import RULES, choose_rule, dice_by_rule
from pipeline.inference.predict import PredictConfig, predict_raw
from pipeline.runtime import distributed

__all__ = ["DECISION_FILE", "decision_path", "load_decisions", "resolve_postprocess", "resolve_temperature",
           "decide_on_validation"]

DECISION_FILE = "postprocessing.json"
logger = logging.getLogger(__name__)


def decision_path(ckpt: str | Path) -> Path:
    """Where the decisions of checkpoint ``ckpt`` live: ``postprocessing.json`` in its folder."""
    return Path(ckpt).parent / DECISION_FILE


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_decisions(ckpt: str | Path | None) -> dict[str, Any] | None:
    """The stored decisions of ``ckpt``, or ``None`` when there are none that belong to it.

    A decision file made for other weights (the run was retrained and not re-decided) is ignored
    with a warning; an export (TorchScript ``.ts``, ONNX ``.onnx``) in the checkpoint's folder is
    accepted with the decision of its source checkpoint.
    """
    if not ckpt:
        return None
    path = decision_path(ckpt)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s): post-processing and temperature decisions ignored", path, exc)
        return None
    if Path(ckpt).suffix not in (".ts", ".onnx") and Path(ckpt).is_file() and doc.get("checkpoint_sha256") != _sha256(ckpt):
        logger.warning("%s was decided for other weights than %s: ignored (train again to re-decide)", path, ckpt)
        return None
    return doc


def resolve_postprocess(value: str, ckpt: str | Path | None, fallback: str = "none") -> str:
    """``value`` itself unless it is ``"auto"``: then the rule decided for ``ckpt``, else ``fallback``."""
    if value != "auto":
        if value not in RULES:
            raise ValueError(f"postprocess must be 'auto' or one of {RULES}, got {value!r}")
        return value
    doc = load_decisions(ckpt)
    return str(doc["postprocess"]) if doc and doc.get("postprocess") in RULES else fallback


def resolve_temperature(value: float | str, ckpt: str | Path | None) -> float:
    """``value`` as a float unless it is ``"auto"``: then the temperature fitted for ``ckpt``, else 1."""
    if value != "auto":
        return float(value)
    doc = load_decisions(ckpt)
    return float(doc["temperature"]) if doc and doc.get("temperature") else 1.0


@torch.no_grad()
def decide_on_validation(network: torch.nn.Module, ckpt: str | Path, dataloader: Any, cfg: PredictConfig,
                         device: str | torch.device, prepare_batch: Callable, calibrate: bool = True,
                         min_gain: float = 1e-4) -> dict[str, Any] | None:
    """Predict the validation cases with the weights of ``ckpt`` and write ``postprocessing.json``.

    Args:
        network: the run's network (its weights are replaced by those of ``ckpt``).
        ckpt: the checkpoint to decide for (``model.pt``).
        dataloader: the validation cases (whole volumes, as the evaluator sees them).
        cfg: how volumes are predicted (its own ``postprocess`` / ``temperature`` are not used).
        device: where the network runs.
        prepare_batch: batch -> ``(image, target dict)`` (:class:`pipeline.training.engines.MultiTaskPrepareBatch`).
        calibrate: fit the temperature (else 1).
        min_gain: the mean Dice gain a rule must bring over ``none``.

    Returns:
        the decision document, or ``None`` when ``ckpt`` does not exist (no validation ever ran).
    """
    from pipeline.io.imageio import write_text_atomic
    from pipeline.models.weights import load_weights

    path = Path(ckpt)
    # several processes: rank 0 may still be writing model.pt; wait for it, and let rank 0's view
    # decide for all (the same answer everywhere, or the gathering below would wait for ever)
    distributed.barrier()
    if not distributed.from_main(path.is_file()):
        logger.warning("no %s: post-processing and calibration not decided", path)
        return None
    network = distributed.unwrap(network)  # predicts its own share of the cases: no DDP collectives
    load_weights(network, path)
    per_iteration: list[tuple[list[dict[str, float]], list[torch.Tensor], list[int]]] = []
    for batch in dataloader:
        prepared = prepare_batch(batch, device)
        image, target = prepared[0], prepared[1]
        seg_raw, logits = predict_raw(network, image, cfg, **(prepared[3] if len(prepared) > 2 else {}))
        scores_b, logits_b, classes_b = [], [], []
        for b in range(image.shape[0]):
            if seg_raw is not None and int(target["has_label"][b]):
                scores_b.append(dice_by_rule(seg_raw[b:b + 1], target["label"][b:b + 1], cfg.threshold,
                                             cfg.min_mass_fraction))
            c = int(target["class"][b])
            if logits is not None and c >= 0 and int(target["has_class"][b]):
                logits_b.append(logits[b].float().cpu())
                classes_b.append(c)
        per_iteration.append((scores_b, logits_b, classes_b))
    # under a process group each rank predicted its share of the cases (the validation sampler):
    # all of them, in the single-process order, decide; rank 0 writes
    gathered = distributed.gather_in_sampler_order(per_iteration)
    dice: dict[str, list[float]] = {r: [s[r] for scores, _, _ in gathered for s in scores if r in s] for r in RULES}
    logits_all = [t for _, logits, _ in gathered for t in logits]
    classes = [torch.tensor(c) for _, _, cs in gathered for c in cs]
    rule = choose_rule(dice, min_gain)
    doc: dict[str, Any] = {
        "checkpoint": path.name,
        "checkpoint_sha256": _sha256(path),
        "postprocess": rule,
        "min_mass_fraction": cfg.min_mass_fraction,
        "val_dice_by_rule": {r: (sum(v) / len(v) if v else None) for r, v in dice.items()},
        "n_val_with_mask": len(dice["none"]),
        "temperature": 1.0,
        "n_val_with_class": len(classes),
    }
    if logits_all:
        logits_t, target_t = torch.stack(logits_all), torch.stack(classes)
        temperature = fit_temperature(logits_t, target_t) if calibrate else 1.0
        doc.update({
            "temperature": temperature,
            "val_nll": {"before": nll(logits_t, target_t), "after": nll(logits_t, target_t, temperature)},
            "val_ece": {"before": expected_calibration_error(torch.softmax(logits_t, 1).numpy(), target_t.numpy()),
                        "after": expected_calibration_error(torch.softmax(logits_t / temperature, 1).numpy(),
                                                            target_t.numpy())},
        })
    text = json.dumps(doc, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    if not distributed.is_main():
        distributed.barrier()  # the file exists once this returns, on every rank
        return doc
    write_text_atomic(decision_path(path), text)
    distributed.barrier()
    means = ", ".join(f"{r} {v:.3f}" for r, v in doc["val_dice_by_rule"].items() if v is not None)
    print(f"[decide] on {doc['n_val_with_mask']} validation case(s): mean Dice {means or 'n/a'} -> post-processing "
          f"{rule!r}; classifier temperature {doc['temperature']:.2f} ({doc['n_val_with_class']} case(s) with class); "
          f"written to {decision_path(path)}", flush=True)
    return doc
