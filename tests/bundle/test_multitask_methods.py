"""The multi-task methods through the bundle: ``mtl_method`` reaches the loss, the optimizer, the
checkpoint and the gradient rule of a real (tiny) training."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.helpers import DEMO, train_and_evaluate


def test_uncertainty_weights_train_and_are_checkpointed(tmp_path: Path):
    _, run, _, log = train_and_evaluate(tmp_path, [DEMO, "TINY"], seed=5, extra={"mtl_method": "uncertainty"})
    saved = [p for p in (run / "models").glob("*.pt") if p.name != "model.pt"]
    assert saved, sorted(p.name for p in (run / "models").iterdir())
    state = torch.load(saved[0], map_location="cpu", weights_only=False)
    log_vars = state["loss"]["log_vars"]
    assert log_vars.shape == (2,)
    # they start at -log(1) and -log(0.3) and the optimizer moved them
    assert not torch.allclose(log_vars, torch.tensor([0.0, -math.log(0.3)]))
    assert "w_cls" in log and "w_seg" in log


def test_pcgrad_runs_in_the_bundle_and_logs_conflicts(tmp_path: Path):
    _, run, _, log = train_and_evaluate(tmp_path, [DEMO, "TINY"], seed=6,
                                        extra={"mtl_method": "pcgrad", "grad_stats_interval": 1})
    assert "grad_conflict" in log and (run / "metrics.json").exists()
