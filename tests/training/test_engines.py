"""Engine plumbing: classification metrics against scikit-learn, output transforms, batch
preparation with missing labels, checkpoint discovery, the missing-mask transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from pipeline.data.missing_labels import FillMissingMaskd
from pipeline.io.errors import InputError
from pipeline.training.checkpoints import (
    AtomicCheckpointSaver,
    attach_resumer,
    checkpoint_objects,
    latest_checkpoint,
    resumable,
    resume_point,
)
from pipeline.training.engines import (
    ClassificationMetrics,
    MultiTaskPrepareBatch,
    cosine_schedule,
    labelled_cls,
    labelled_seg,
)


def run_metric(probs: torch.Tensor, target: torch.Tensor, has_class: torch.Tensor, batch: int = 5) -> dict:
    """Feed (probs, target) through an Ignite engine in batches, as the evaluator does."""
    def step(engine, i):
        sl = slice(i, i + batch)
        return {"pred": {"seg": None, "cls": probs[sl]}, "label": {"class": target[sl], "has_class": has_class[sl]}}

    engine = Engine(step)
    ClassificationMetrics(num_classes=3, prefix="val_").attach(engine, "cls")
    engine.run(list(range(0, len(target), batch)), max_epochs=1)
    return engine.state.metrics


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    n = 40
    target = torch.as_tensor(rng.integers(0, 3, n))
    logits = torch.as_tensor(rng.normal(size=(n, 3))) + 1.5 * torch.nn.functional.one_hot(target, 3)
    probs = torch.softmax(logits, 1)
    has_class = torch.ones(n, dtype=torch.long)
    has_class[:4] = 0  # unknown classes are left out
    m = run_metric(probs, target, has_class)
    keep = slice(4, None)
    y, p = target[keep].numpy(), probs[keep].numpy()
    assert m["val_accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m["val_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-6)


def test_auc_nan_with_one_class():
    probs = torch.softmax(torch.randn(6, 3), 1)
    m = run_metric(probs, torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long))
    assert math.isnan(m["val_auc"]) and 0 <= m["val_accuracy"] <= 1


def test_single_metric_mode_and_no_labelled_case():
    probs = torch.softmax(torch.randn(8, 3), 1)
    target = torch.randint(0, 3, (8,))
    engine = Engine(lambda e, i: {"pred": {"seg": None, "cls": probs}, "label": {"class": target,
                                                                                  "has_class": torch.ones(8)}})
    ClassificationMetrics(3, metric="balanced_accuracy").attach(engine, "val_balanced_accuracy")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["val_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(target.numpy(), probs.argmax(1).numpy()))
    m = run_metric(probs, target, torch.zeros(8, dtype=torch.long))  # a split where no case has a class
    assert all(math.isnan(m[k]) for k in ("val_accuracy", "val_balanced_accuracy", "val_auc"))
    with pytest.raises(ValueError, match="metric must be one of"):
        ClassificationMetrics(3, metric="f1")


def test_cosine_schedule_follows_the_current_epoch_count_after_a_resume():
    def lr_at(epochs: int, start_state=None, steps: int = 0) -> tuple[float, dict]:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cosine_schedule(opt, epochs, final_fraction=0.1)
        if start_state is not None:
            sched.load_state_dict(start_state)
        for _ in range(steps):
            opt.step()
            sched.step()
        return opt.param_groups[0]["lr"], sched.state_dict()

    lr, state = lr_at(10, steps=5)
    assert lr == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))  # half-way: 0.55
    assert lr_at(10, steps=10)[0] == pytest.approx(0.1) and lr_at(10, steps=15)[0] == pytest.approx(0.1)
    resumed, _ = lr_at(20, start_state=state, steps=1)  # the run continued with --epochs 20: epoch 6 of 20
    assert resumed == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 20)))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = cosine_schedule(opt, 4, final_fraction=1.0)  # the study: constant
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_resumable_keeps_what_the_checkpoint_holds(tmp_path):
    net, engine = torch.nn.Linear(2, 1), Engine(lambda e, b: None)
    torch.save({"network": net.state_dict(), "trainer": engine.state_dict()}, tmp_path / "old.pt")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    objs = {"network": net, "trainer": engine, "scaler": scaler}
    assert resumable(tmp_path / "old.pt", objs) == {"network": net, "trainer": engine}
    assert resumable(None, objs) is objs
    torch.save({"w": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a resumable training checkpoint"):
        resumable(tmp_path / "other.pt", objs)


def test_grad_scaler_state_is_saved_and_restored_through_the_trainer(tmp_path):
    """MONAI creates ``trainer.scaler`` in ``run()``, after the checkpoint objects are built: the
    checkpoint still carries the scaler the trainer holds when it saves, and loads into the one it
    holds when it resumes."""
    from ignite.handlers import Checkpoint

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    engine.amp, engine.scaler = True, None  # as built from the config: no scaler yet
    objs = checkpoint_objects(engine, net, opt)
    assert "scaler" in objs
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # what run() creates
    engine.scaler.scale(net(torch.ones(1, 2)).sum()).backward()
    engine.scaler.step(opt)
    engine.scaler.update()  # a step without inf: the scale grows to 2048
    torch.save({k: v.state_dict() for k, v in objs.items()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert saved["scaler"]["scale"] == 2048.0

    resumed = Engine(lambda e, b: None)
    resumed.amp, resumed.scaler = True, None
    objs2 = checkpoint_objects(resumed, torch.nn.Linear(2, 1), torch.optim.SGD(net.parameters(), lr=0.1))
    resumed.scaler = torch.amp.GradScaler("cpu")  # run() makes a fresh one at 65536
    Checkpoint.load_objects(to_load=resumable(tmp_path / "ckpt.pt", objs2), checkpoint=saved)
    assert resumed.scaler.get_scale() == 2048.0

    no_amp = Engine(lambda e, b: None)
    no_amp.amp, no_amp.scaler = False, None
    assert "scaler" not in checkpoint_objects(no_amp, net, opt)


def test_output_transforms_drop_unlabelled():
    seg = torch.tensor([0.9, 0.2, 0.7]).view(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2)
    out = {
        "pred": {"seg": seg, "cls": torch.eye(3)},
        "label": {"label": torch.ones(3, 1, 2, 2, 2), "class": torch.tensor([0, -1, 2]),
                  "has_label": torch.tensor([1, 0, 1]), "has_class": torch.tensor([1, 0, 1])},
    }
    pred, truth = labelled_seg(0.5)(out)
    assert pred.shape[0] == 2 and pred.sum() == 16 and truth.sum() == 16
    probs, cls = labelled_cls(out)
    assert cls.tolist() == [0, 2] and probs.shape == (2, 3)


def test_prepare_batch_defaults_and_plain_tensors():
    from monai.data import MetaTensor

    batch = {"image": MetaTensor(torch.randn(2, 1, 4, 4, 4)), "label": MetaTensor(torch.zeros(2, 1, 4, 4, 4)),
             "class": torch.tensor([1, -1]), "has_label": torch.tensor([1, 0])}
    x, y = MultiTaskPrepareBatch()(batch, "cpu")
    assert type(x) is torch.Tensor and type(y["label"]) is torch.Tensor
    assert y["class"].tolist() == [1, -1] and y["has_label"].tolist() == [1, 0] and y["has_class"].tolist() == [1, 1]


def test_latest_checkpoint_takes_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for n in (2, 10, 9):
        torch.save({"epoch": n, "w": torch.zeros(1000)}, tmp_path / f"checkpoint_epoch={n}.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    # a run killed while writing epoch 11 left a truncated file: resume from 10, not from it
    whole = (tmp_path / "checkpoint_epoch=10.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes(whole[: len(whole) // 2])
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    assert resume_point(tmp_path, resume=True).endswith("checkpoint_epoch=10.pt")
    assert resume_point(tmp_path, resume=False) is None  # a fresh start ignores what is there


def test_attach_resumer_only_when_there_is_one():
    from ignite.engine import Engine

    trainer = Engine(lambda e, b: None)
    attach_resumer(None, trainer)  # a fresh start: nothing to attach
    attached = []

    class Loader:
        def attach(self, engine):
            attached.append(engine)

    attach_resumer(Loader(), trainer)
    assert attached == [trainer]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # stands for a save interrupted half-way


class _State:
    def __init__(self, payload):
        self.payload = payload

    def state_dict(self):
        return {"w": torch.zeros(100_000), "tail": self.payload}

    def load_state_dict(self, state):
        self.payload = state["tail"]


def test_checkpoint_saver_is_atomic(tmp_path):
    engine = Engine(lambda e, b: None)
    obj = _State(payload=1)
    saver = AtomicCheckpointSaver(str(tmp_path), {"obj": obj, "trainer": engine}, file_prefix="", save_interval=1,
                                  n_saved=1)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=1.pt")
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=False)["obj"]["tail"] == 1
    engine.run([0], max_epochs=2)  # n_saved=1: epoch 2 replaces epoch 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    obj.payload = _Unpicklable()
    with pytest.raises(RuntimeError, match="disk full"):
        engine.run([0], max_epochs=3)
    # the failed save of epoch 3 left no truncated or temporary file, and epoch 2 is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=2.pt")


def test_prepare_batch_drops_the_class_of_patches_without_tumour():
    label = torch.zeros(3, 1, 4, 4, 4)
    label[0, 0, 1, 1, 1] = 1  # patch 0 shows tumour, patch 1 does not, case 2 has no mask at all
    batch = {"image": torch.randn(3, 1, 4, 4, 4), "label": label, "class": torch.tensor([0, 1, 2]),
             "has_label": torch.tensor([1, 1, 0]), "has_class": torch.tensor([1, 1, 1])}
    _, y = MultiTaskPrepareBatch(cls_needs_tumour=True)(batch, "cpu")
    assert y["has_class"].tolist() == [1, 0, 1]
    _, y = MultiTaskPrepareBatch()(batch, "cpu")
    assert y["has_class"].tolist() == [1, 1, 1]


def test_fill_missing_mask():
    img = torch.rand(1, 4, 4, 4)
    out = FillMissingMaskd("label")({"image": img, "label": img.clone(), "has_label": 0})
    assert out["label"].shape == img.shape and out["label"].sum() == 0
    kept = FillMissingMaskd("label")({"image": img, "label": img.clone(), "has_label": 1})
    assert torch.equal(kept["label"], img)
    absent = FillMissingMaskd("label")({"image": img})
    assert absent["label"].sum() == 0 and absent["has_label"] == 0


def _validation_run(saver: AtomicCheckpointSaver, net: torch.nn.Linear, scores: list[float]) -> None:
    """Epochs of a stand-in evaluator whose key metric is ``scores[epoch - 1]``; the network's
    bias is set to the score so the saved ``model.pt`` tells which epoch it came from."""
    from ignite.engine import Events

    ev = Engine(lambda e, b: None)

    @ev.on(Events.EPOCH_COMPLETED)
    def _score(engine):
        s = scores[engine.state.epoch - 1]
        net.bias.data.fill_(s)
        engine.state.metrics["val_mean_dice"] = s

    saver.attach(ev)  # after the metric: handlers run in the order attached
    ev.run([0], max_epochs=len(scores))


def test_best_model_tracking_survives_a_resume(tmp_path):
    net = torch.nn.Linear(2, 1)

    def saver():
        return AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True,
                                     key_metric_filename="model.pt", key_metric_name="val_mean_dice")

    first = saver()
    _validation_run(first, net, [0.5, 0.9, 0.6])
    best = lambda: float(torch.load(tmp_path / "model.pt")["bias"])  # noqa: E731
    assert best() == pytest.approx(0.9)
    state = first.state_dict()
    assert state["_saved"][0][0] == pytest.approx(0.9)

    resumed = saver()
    resumed.load_state_dict(state)
    _validation_run(resumed, net, [0.7])
    assert best() == pytest.approx(0.9)  # 0.7 < 0.9 from before the interruption: kept
    _validation_run(resumed, net, [0.95])
    assert best() == pytest.approx(0.95)

    _validation_run(resumed, net, [float("nan")])  # no case could be scored: not a new best
    assert best() == pytest.approx(0.95)

    fresh = saver()  # without the state a worse epoch would overwrite the best model
    _validation_run(fresh, net, [0.3])
    assert best() == pytest.approx(0.3)
    assert AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1).state_dict() == {}
    nan_first = saver()  # a NaN first epoch is replaced by the first real score
    _validation_run(nan_first, net, [float("nan"), 0.2])
    assert best() == pytest.approx(0.2)


def test_validation_metrics_and_their_split_into_key_and_others():
    from pipeline.training.engines import pick_metrics, validation_metrics

    seg, cls = {"val_mean_dice": "dice"}, {"val_auc": "auc", "val_accuracy": "acc"}
    assert validation_metrics(seg, cls, multitask=False) == seg
    both = validation_metrics(seg, cls, multitask=True)
    assert list(both) == ["val_mean_dice", "val_auc", "val_accuracy"]
    assert pick_metrics(both, ["val_auc"]) == {"val_auc": "auc"}
    assert pick_metrics(both, exclude=["val_auc"]) == {"val_mean_dice": "dice", "val_accuracy": "acc"}
    with pytest.raises(KeyError, match=r"\['val_balanced_accuracy'\] not among"):
        pick_metrics(seg, ["val_balanced_accuracy"])
