"""Component post-processing decided on validation cases: hand-made probability maps where the
largest component is a false positive, the nnU-Net-style choice, and the decision file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.inference.postprocess import RULES, apply_rule, choose_rule, components

SHAPE = (24, 24, 24)


def cube(shape, start, size) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def case_false_blob_largest() -> tuple[np.ndarray, np.ndarray]:
    """True tumour 5^3 voxels at p=0.95; a larger (6^3) but unsure false blob at p=0.6."""
    truth = cube(SHAPE, (2, 2, 2), 5)
    prob = np.full(SHAPE, 0.01, dtype=np.float32)
    prob[truth] = 0.95
    prob[cube(SHAPE, (14, 14, 14), 6)] = 0.6
    return prob, truth


def case_small_blobs() -> tuple[np.ndarray, np.ndarray]:
    """True tumour 5^3 voxels at p=0.95 and three 2^3 false specks at p=0.6."""
    truth = cube(SHAPE, (8, 8, 8), 5)
    prob = np.full(SHAPE, 0.01, dtype=np.float32)
    prob[truth] = 0.95
    for start in ((0, 0, 0), (20, 0, 20), (0, 20, 20)):
        prob[cube(SHAPE, start, 2)] = 0.6
    return prob, truth


def as_batch(prob: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(prob)[None, None]


def test_components_sizes_and_masses():
    prob, _ = case_false_blob_largest()
    labels, sizes, masses = components(prob, 0.5)
    assert sorted(sizes.tolist()) == [125, 216]
    assert sorted(np.round(masses, 3).tolist()) == sorted([round(125 * 0.95, 3), round(216 * 0.6, 3)])
    assert labels.max() == 2


def test_largest_rule_deletes_a_smaller_true_tumour_but_confident_keeps_it():
    prob, truth = case_false_blob_largest()
    largest = apply_rule(as_batch(prob), "largest")[0, 0].numpy() >= 0.5
    confident = apply_rule(as_batch(prob), "confident")[0, 0].numpy() >= 0.5
    assert dice(largest, truth) == 0.0  # the tumour is gone: the false-positive blob was larger
    assert (confident & truth).sum() == truth.sum()  # the most confident component survives
    # the false blob holds 216 * 0.6 = 129.6 >= 0.2 * 118.75 of evidence: it is not dropped either
    assert confident.sum() == 125 + 216


def test_confident_rule_drops_small_unsure_specks():
    prob, truth = case_small_blobs()
    out = apply_rule(as_batch(prob), "confident")[0, 0].numpy()
    assert dice(out >= 0.5, truth) == 1.0
    below = out < 0.5  # dropped specks are zeroed, sub-threshold voxels keep their probability
    assert np.array_equal(out[below], np.where(prob[below] >= 0.5, 0.0, prob[below]))
    assert torch.equal(apply_rule(as_batch(prob), "none"), as_batch(prob))


def test_decision_on_validation_where_largest_is_false_keeps_the_tumour():
    cases = [case_false_blob_largest(), case_small_blobs()]
    scores = {r: [dice(apply_rule(as_batch(p), r)[0, 0].numpy() >= 0.5, t) for p, t in cases] for r in RULES}
    assert np.mean(scores["largest"]) < np.mean(scores["none"]) < np.mean(scores["confident"])
    rule = choose_rule(scores)
    assert rule == "confident"
    prob, truth = cases[0]
    kept = apply_rule(as_batch(prob), rule)[0, 0].numpy() >= 0.5
    assert (kept & truth).sum() == truth.sum()


def test_choose_rule_prefers_none_without_a_gain():
    assert choose_rule({"none": [0.8, 0.9], "largest": [0.8, 0.9], "confident": [0.8, 0.9]}) == "none"
    assert choose_rule({"none": [0.8, 0.9], "largest": [0.9, 0.95], "confident": [0.85, 0.9]}) == "largest"
    assert choose_rule({"none": [], "largest": [], "confident": []}) == "none"
    # equal gains: the rule that can drop less wins
    assert choose_rule({"none": [0.8, 0.9], "largest": [0.9, 0.95], "confident": [0.9, 0.95]}) == "confident"
    with pytest.raises(ValueError, match="unknown post-processing rule"):
        apply_rule(as_batch(case_small_blobs()[0]), "biggest")


class ProbabilityEcho(torch.nn.Module):
    """A 'network' whose segmentation logits are its input (so the test controls the probability
    map exactly) and whose class logits are a fixed learnable vector."""

    def __init__(self) -> None:
        super().__init__()
        self.class_logits = torch.nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))

    def forward(self, x: torch.Tensor):
        return x[:, :1], self.class_logits.expand(x.shape[0], 3), x.flatten(1)[:, :4]


def test_decide_on_validation_writes_the_decision_and_auto_reads_it(tmp_path, caplog):
    from pipeline.inference.predict import PredictConfig
    from pipeline.training.decisions import decide_on_validation, resolve_postprocess, resolve_temperature
    from pipeline.training.engines import MultiTaskPrepareBatch

    net = ProbabilityEcho()
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(net.state_dict(), ckpt)
    batches = []
    for (prob, truth), cls in zip([case_false_blob_largest(), case_small_blobs()], [0, 1], strict=True):
        logit = np.log(prob / (1 - prob)).astype(np.float32)
        batches.append({"image": torch.from_numpy(logit)[None, None], "label": torch.from_numpy(truth)[None, None].float(),
                        "class": torch.tensor([cls]), "has_label": torch.tensor([1]), "has_class": torch.tensor([1])})
    cfg = PredictConfig(roi_size=SHAPE, classify="whole")
    doc = decide_on_validation(net, ckpt, batches, cfg, "cpu", MultiTaskPrepareBatch())
    assert doc["postprocess"] == "confident" and doc["n_val_with_mask"] == 2
    stored = json.loads((ckpt.parent / "postprocessing.json").read_text(encoding="utf-8"))
    assert stored["postprocess"] == "confident" and stored["val_dice_by_rule"]["largest"] < stored["val_dice_by_rule"]["none"]
    # one case right at p=0.84, one wrong at p=0.84: the fitted temperature softens the classifier
    assert stored["temperature"] > 1.0 and stored["val_nll"]["after"] < stored["val_nll"]["before"]
    assert resolve_postprocess("auto", ckpt) == "confident"
    assert resolve_temperature("auto", ckpt) == pytest.approx(stored["temperature"])
    assert resolve_postprocess("largest", ckpt) == "largest"  # an explicit setting wins
    # other weights in model.pt (retrained, not re-decided): the decision no longer applies
    torch.save({k: v + 1 for k, v in net.state_dict().items()}, ckpt)
    assert resolve_postprocess("auto", ckpt) == "none" and resolve_temperature("auto", ckpt) == 1.0
    assert "decided for other weights" in caplog.text
