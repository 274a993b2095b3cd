"""The multi-task methods through the bundle: ``mtl_method`` reaches the loss, the optimizer, the
checkpoint and the gradient rule of a real (tiny) training."""

from __future__ import annotations

import json
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
                                        extra={"mtl_method": "pcgrad", "grad_stats_interval": 1,
                                                               "cls_inputs": "both"})
    assert "grad_conflict" in log and (run / "metrics.json").exists()


def test_gradnorm_trains_in_the_bundle_and_its_weights_are_checkpointed_and_logged(tmp_path: Path):
    _, run, _, log = train_and_evaluate(tmp_path, [DEMO, "configs/mtl_gradnorm.json", "TINY"], seed=7)
    state = torch.load(run / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    w, first = state["loss"]["task_w"], state["loss"]["initial_terms"]
    assert math.isclose(float(w.sum()), 1.3, rel_tol=1e-5) and not torch.allclose(w, torch.tensor([1.0, 0.3]))
    assert bool(torch.isfinite(first).all()) and "w_cls" in log and (run / "metrics.json").exists()


def test_a_head_no_class_gradient_leaves_trains_the_mask_exactly_as_segmentation_alone(tmp_path: Path):
    """The demo's head (``stop`` at 0 levels, reading the position) next to single-task training on
    the same cohort and seed: every weight of the segmentation path equal to the bit after two
    epochs (same initial weights, batches, crops, updates), and the same test Dice. The study's
    fixed weight, whose class gradient reaches the encoder, moves them."""
    from pipeline.data.phantom.build import make_cohort

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=3, spacing=6.0, space="atlas").datalist
    runs = {}
    for name, configs, extra in [("mtl", [DEMO, "TINY"], {}), ("seg", [DEMO, "configs/single_task.json", "TINY"], {}),
                                 ("fixed", [DEMO, "TINY"], {"mtl_method": "fixed", "cls_inputs": "both"})]:
        _, run, _, _ = train_and_evaluate(tmp_path, configs, seed=3, extra=extra, name=name, datalist=datalist,
                                          epochs=2)
        runs[name] = (torch.load(run / "models" / "checkpoint_epoch=2.pt", map_location="cpu",
                                 weights_only=False)["network"], json.loads((run / "metrics.json").read_text()))
    seg, mtl, fixed = runs["seg"][0], runs["mtl"][0], runs["fixed"][0]
    assert set(seg) < set(mtl) and any(k.startswith("classifier") for k in set(mtl) - set(seg))
    assert [k for k in seg if not torch.equal(seg[k], mtl[k])] == []
    assert runs["mtl"][1]["dice"] == runs["seg"][1]["dice"]
    assert any(not torch.equal(seg[k], fixed[k]) for k in seg if k.startswith("convInit"))
