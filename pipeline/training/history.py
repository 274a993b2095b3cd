"""Validation history of a training run: every validation's metrics, per epoch, in one JSON file.

MONAI's evaluator keeps the best metric and its epoch only in memory (lost on resume) and
TensorBoard's event files are awkward to read back; the experiment runner and a user comparing
runs need "which epoch was best, and what did validation say then". :class:`ValidationHistory`
(an evaluator handler) writes ``OUTPUT_DIR/validation.json`` atomically after each validation::

    {"key_metric": "val_mean_dice", "history": [{"epoch": 10, "val_mean_dice": 0.81, ...}, ...]}

A resumed run keeps the entries of the epochs before the resume and replaces later ones.
:func:`best_validation` reads it back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["ValidationHistory", "best_validation", "HISTORY_FILE"]

HISTORY_FILE = "validation.json"


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


class ValidationHistory:
    """Evaluator handler: append ``{epoch, <metric>: value, ...}`` to ``path`` after every validation.

    Args:
        path: the JSON file (``OUTPUT_DIR/validation.json``).
        key_metric: the metric that chooses the best checkpoint (recorded for :func:`best_validation`).

    The epoch is the trainer's (MONAI's ``ValidationHandler`` runs the evaluator with the global
    epoch, so ``evaluator.state.epoch`` equals it when the validation completes).
    """

    def __init__(self, path: str | Path, key_metric: str) -> None:
        self.path = Path(path)
        self.key_metric = key_metric

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from pipeline.io.imageio import write_text_atomic

        epoch = int(engine.state.epoch)
        history = []
        if self.path.is_file():
            try:
                history = json.loads(self.path.read_text(encoding="utf-8")).get("history", [])
            except (OSError, ValueError):
                history = []
        entry: dict[str, Any] = {"epoch": epoch}
        entry.update({k: _number(v) for k, v in engine.state.metrics.items() if _number(v) is not None
                      or isinstance(v, int | float)})
        history = [h for h in history if int(h.get("epoch", 0)) < epoch] + [entry]
        write_text_atomic(self.path, json.dumps({"key_metric": self.key_metric, "history": history}, indent=1))


def best_validation(path: str | Path) -> dict[str, Any] | None:
    """The history entry with the highest key metric (first one on ties; NaN counts as worst),
    plus ``n_validations``; ``None`` when the file is missing or holds no validation."""
    p = Path(path)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text(encoding="utf-8"))
    history, key = doc.get("history", []), doc.get("key_metric")
    if not history:
        return None
    best = max(history, key=lambda h: -math.inf if h.get(key) is None else float(h[key]))
    return {**best, "key_metric": key, "n_validations": len(history)}
