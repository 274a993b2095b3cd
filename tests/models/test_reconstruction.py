"""The reconstruction branch, its loss term, and staged training (init_from + frozen branches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.losses import MultiTaskLoss
from pipeline.models.networks import MultiTaskSegResNet
from pipeline.training.staging import branch_of, load_matching, prepare_for_training


def test_reconstruction_output_and_no_skip_connections():
    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_hidden=(8,), reconstruct=True).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    seg, logits, emb, recon = net(x)
    assert seg.shape == recon.shape == (2, 1, 16, 16, 16) and logits.shape == (2, 3) and emb.shape == (2, 64)
    # the reconstruction depends on the input only through the bottleneck: no skip connection
    bottleneck, _ = net.encode(x)
    torch.testing.assert_close(recon, net._reconstruct(bottleneck))
    # the segmentation path is the network without the branch
    plain = MultiTaskSegResNet(init_filters=8, cls_hidden=(8,)).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if branch_of(k) != "recon"})
    torch.testing.assert_close(plain(x)[0], seg)
    scripted = torch.jit.script(net)
    for a, b in zip(net(x), scripted(x), strict=True):
        torch.testing.assert_close(a, b)


def test_reconstruction_term_is_the_weighted_mse_and_ignores_missing_labels():
    g = torch.Generator().manual_seed(0)
    seg = torch.randn(3, 1, 4, 4, 4, generator=g)
    mask = (torch.rand(3, 1, 4, 4, 4, generator=g) > 0.6).float()
    logits = torch.randn(3, 3, generator=g)
    image = torch.randn(3, 4, 4, 4, 4, generator=g)  # image + 3 coordinate channels
    recon = torch.randn(3, 1, 4, 4, 4, generator=g)
    cls = torch.tensor([-1, -1, -1])
    has_label = torch.zeros(3)  # no mask, no class: only the reconstruction trains
    out = MultiTaskLoss(cls_weight=0.3, recon_weight=0.5).compute(seg, logits, mask, cls, has_label, None, recon, image)
    expected = float(((recon.numpy() - image[:, :1].numpy()) ** 2).mean())
    assert float(out["recon"]) == pytest.approx(expected, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(0.5 * expected, rel=1e-6)
    assert np.isnan(float(out["seg"])) and np.isnan(float(out["cls"]))
    # weight 0: no term, and a zero segmentation weight drops the Dice
    off = MultiTaskLoss(cls_weight=0.0, seg_weight=0.0, recon_weight=0.0).compute(
        seg, logits, mask, torch.tensor([0, 1, 2]), None, None, recon, image)
    assert float(off["loss"]) == 0.0 and np.isnan(float(off["recon"])) and np.isnan(float(off["seg"]))
    # through the engine adapter: the 4th output and target["image"]
    loss = MultiTaskLoss(cls_weight=0.3, recon_weight=0.5)
    total = loss((seg, logits, None, recon), {"label": mask, "class": cls, "has_label": has_label,
                                              "has_class": torch.zeros(3), "image": image})
    assert float(total) == pytest.approx(0.5 * expected, rel=1e-6) and "recon" in loss.last_terms


def test_init_from_loads_matching_weights_and_reports_the_rest(tmp_path, capsys):
    torch.manual_seed(0)
    stage1 = MultiTaskSegResNet(init_filters=8, cls_hidden=(8,), reconstruct=True, decoder=False)
    torch.save(stage1.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    stage2 = MultiTaskSegResNet(init_filters=8, cls_hidden=(8,), reconstruct=True, coord_channels=0)
    before = {k: v.clone() for k, v in stage2.state_dict().items()}
    report = load_matching(stage2, tmp_path / "model.pt")
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert set(report["loaded"]) == set(s1) and report["unused"] == [] and report["mismatched"] == []
    for k in report["loaded"]:
        torch.testing.assert_close(s2[k], s1[k])
    assert report["random"] and all(branch_of(k) == "seg" for k in report["random"])
    for k in report["random"]:
        torch.testing.assert_close(s2[k], before[k])  # untouched
    prepare_for_training(stage2, str(tmp_path / "model.pt"), {"seg_weight": 1.0, "cls_weight": 0.0, "recon_weight": 0.5})
    printed = capsys.readouterr().out
    assert f"loaded {len(report['loaded'])} tensors" in printed and f"left at random {len(report['random'])}" in printed
    assert "frozen (loss weight 0): cls" in printed


def test_frozen_branch_does_not_move_in_a_training_step():
    from pipeline.training.engines import param_groups

    torch.manual_seed(0)
    net = MultiTaskSegResNet(init_filters=8, cls_hidden=(8,), reconstruct=True, cls_pooling="mean", coord_channels=0)
    prepare_for_training(net, None, {"seg_weight": 1.0, "cls_weight": 0.0, "recon_weight": 0.5})
    groups = param_groups(net, 1e-2, head_lr_factor=10.0)
    assert all(p.requires_grad for g in groups for p in g["params"])
    opt = torch.optim.Adam(groups)
    head = {k: v.clone() for k, v in net.classifier.state_dict().items() if "running" not in k and "num_batches" not in k}
    enc = net.convInit.conv.weight.clone()
    x = torch.randn(2, 1, 16, 16, 16)
    target = {"label": (x > 1).float(), "class": torch.tensor([0, 1]), "has_label": torch.ones(2),
              "has_class": torch.ones(2), "image": x}
    loss = MultiTaskLoss(cls_weight=0.0, recon_weight=0.5)(net(x), target)
    loss.backward()
    opt.step()
    assert all(torch.equal(net.classifier.state_dict()[k], v) for k, v in head.items())
    assert not torch.equal(net.convInit.conv.weight, enc)  # the encoder trains


@pytest.mark.slow
def test_two_stage_recipe_through_the_bundle(tmp_path):
    """Stage 1 (class + reconstruction, no decoder) then stage 2 (segmentation + reconstruction)
    from stage 1's weights: stage 2 logs what it loaded, trains the reconstruction as its own loss
    term, and its frozen classifier keeps stage 1's weights."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.data.phantom.build import make_cohort
    from pipeline.models.weights import read_weights

    root = Path(__file__).resolve().parents[2]
    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=2, spacing=6.0, space="atlas", missing_mask=0.25).datalist
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"already_registered": True, "atlas_spacing": 6.0, "init_filters": 8, "cls_hidden": [8],
                                "batch_size": 3, "num_workers": 0, "val_interval": 1, "sw_batch_size": 4}), encoding="utf-8")
    patch = tmp_path / "patch.json"
    patch.write_text(json.dumps({"patch_size": [16, 16, 16]}), encoding="utf-8")

    def train(stage: str, out: Path, *extra: str, overlays: tuple = ()) -> str:
        files = [str(root / "bundles/plgg_mtl/configs/train.json"), str(root / "configs/demo.json"), str(tiny),
                 str(root / stage), *map(str, overlays)]
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(files),
                               "--datalist", str(datalist), "--output_dir", str(out), "--epochs", "1", *extra],
                              cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout + proc.stderr

    out1 = train("configs/stage1_cls_recon.json", tmp_path / "s1")
    assert "loss_recon" in out1 and "loss_seg" not in out1.split("Epoch: 1/1")[-1].splitlines()[0]
    s1 = read_weights(tmp_path / "s1" / "models" / "model.pt")
    assert not any(k.startswith("up_layers") for k in s1) and any(k.startswith("recon_final") for k in s1)
    out2 = train("configs/stage2_seg_recon.json", tmp_path / "s2", "--init_from", str(tmp_path / "s1/models/model.pt"),
                 overlays=(patch,))
    loaded = [line for line in out2.splitlines() if line.startswith("[init_from]")]
    assert loaded and f"loaded {len(s1)} tensors" in loaded[0] and "left at random" in loaded[0] and "seg " in loaded[0]
    assert "frozen (loss weight 0): cls" in out2
    s2 = read_weights(tmp_path / "s2" / "models" / "checkpoint_epoch=1.pt")
    for k in s1:
        if k.startswith("classifier") and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(s2[k], s1[k])
    assert not torch.equal(s2["convInit.conv.weight"], s1["convInit.conv.weight"])  # the encoder trained on
    assert any(k.startswith("up_layers") for k in s2)


def test_whole_batch_form_of_the_loss_equals_the_one_process_loss_with_reconstruction():
    """The form several processes use (sums all-reduced; here one process) gives the same total and
    gradients as the plain loss, reconstruction term included."""
    g = torch.Generator().manual_seed(3)
    seg = torch.randn(3, 1, 4, 4, 4, generator=g, requires_grad=True)
    logits = torch.randn(3, 3, generator=g, requires_grad=True)
    recon = torch.randn(3, 1, 4, 4, 4, generator=g, requires_grad=True)
    mask = (torch.rand(3, 1, 4, 4, 4, generator=g) > 0.6).float()
    image = torch.randn(3, 2, 4, 4, 4, generator=g)
    cls, has_label, has_class = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1]).bool(), torch.tensor([1, 1, 0]).bool()
    loss = MultiTaskLoss(cls_weight=0.3, class_weights=[1.0, 2.0, 0.5], recon_weight=0.5)
    a = loss.compute(seg, logits, mask, cls, has_label, has_class, recon, image)
    grads_a = torch.autograd.grad(a["loss"], [seg, logits, recon])
    b = loss._whole_batch(seg, logits, mask, cls, has_label, has_class & (cls >= 0), recon, image)
    grads_b = torch.autograd.grad(b["loss"], [seg, logits, recon])
    assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    assert float(b["recon"]) == pytest.approx(float(a["recon"]), rel=1e-6)
    for x, y in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
