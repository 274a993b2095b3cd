"""Classifier-alone baselines: outputs and embedding, the tumour-centred evaluation patch, and a
ViT baseline through training and evaluation of the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models.backbones import multitask_network
from pipeline.models.classifiers import ClassifierAlone, tumour_centred_crop


@pytest.mark.parametrize("backbone, width", [("densenet121", 1024), ("resnet18", 512), ("vit", 192)])
def test_outputs_and_embedding_feed_the_last_layer(backbone, width):
    torch.manual_seed(0)
    net = ClassifierAlone(backbone, patch_size=(32, 32, 32)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    seg, logits, emb = net(x)
    assert seg is None and logits.shape == (2, 3) and emb.shape == (2, width) and net.has_decoder is False
    last = {"densenet121": lambda: net.net.class_layers.out, "resnet18": lambda: net.net.fc,
            "vit": lambda: net.net.classification_head}[backbone]()
    torch.testing.assert_close(logits, last(emb))  # the embedding is what the last layer reads
    ref = net.net(x)  # the MONAI network's own forward gives the same logits
    torch.testing.assert_close(logits, ref[0] if isinstance(ref, tuple) else ref)


def test_factory_needs_segment_false_for_a_classifier():
    with pytest.raises(ValueError, match="segment: false"):
        multitask_network("resnet18")
    assert isinstance(multitask_network("vit", decoder=False, patch_size=(16, 16, 16)), ClassifierAlone)


def test_evaluation_patch_is_centred_on_the_tumour_with_real_context():
    img = torch.arange(40 * 40 * 40, dtype=torch.float32).reshape(1, 40, 40, 40)
    lab = torch.zeros(1, 40, 40, 40)
    lab[0, 25:29, 10:14, 20:24] = 1  # box centre (27, 12, 22), a half patch from every border
    out = {"image": img, "label": lab}
    for t in tumour_centred_crop([16, 16, 16]):
        out = t(out)
    assert out["image"].shape == (1, 16, 16, 16)
    centre = np.argwhere(np.asarray(out["label"][0]) > 0).mean(0)
    np.testing.assert_allclose(centre, [7.5, 7.5, 7.5], atol=0.51)  # the tumour in the middle
    # real voxels around it (no zero padding), the image moved with its tumour
    first = np.argwhere(np.asarray(out["label"][0]) > 0).min(0)
    assert float(out["image"].min()) > 0 and float(out["image"][0, first[0], first[1], first[2]]) == float(img[0, 25, 10, 20])
    # an empty mask: the volume's centre
    out = {"image": img, "label": torch.zeros(1, 40, 40, 40)}
    for t in tumour_centred_crop([16, 16, 16]):
        out = t(out)
    assert float(out["image"][0, 0, 0, 0]) == float(img[0, 12, 12, 12])


@pytest.mark.slow
def test_vit_baseline_trains_and_evaluates_through_the_bundle(tmp_path):
    from tests.helpers import DEMO, train_and_evaluate

    _, run, _, trained = train_and_evaluate(tmp_path, [DEMO, "TINY", "configs/cls_vit.json"], seed=4)
    assert (run / "models" / "model.pt").is_file() and "loss_seg" not in trained
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics.get("dice") is None


@pytest.mark.slow
def test_baseline_overlay_refused_by_folder_inference_in_one_line(tmp_path):
    """The inference bundle reads the baseline overlays (they once set a key only train.json has, and
    MONAI's parser then died in a KeyError traceback) and refuses a classifier-alone model in one
    line naming the checkpoint: folder inference writes masks, which it cannot give. Nothing is written."""
    from monai.bundle import ConfigParser

    from pipeline.data.phantom.build import make_cohort
    from tests.helpers import DEMO, INFER, ROOT, TINY, bundle

    datalist = make_cohort(tmp_path / "cohort", cases=2, seed=6, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    configs = [DEMO, overlay, "configs/cls_resnet18.json"]
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in [INFER, *configs]])
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "c000.nii.gz").write_bytes((datalist.parent / "c000" / "image.nii.gz").read_bytes())
    out = tmp_path / "pred"
    done = bundle(["run"], [INFER, *configs], input_dir=scans, output_dir=out, ckpt=ckpt)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: {ckpt}: this model is the classifier alone" in done.stderr
    assert "Traceback" not in done.stderr and not (out / "c000").exists()


def test_validation_chain_adds_the_tumour_patch_only_when_asked():
    from pipeline.models.classifiers import validation_chain

    assert validation_chain(["load"], [16, 16, 16]) == ["load"]
    chain = validation_chain(["load"], [16, 16, 16], on_tumour_patch=True)
    assert chain[0] == "load" and [type(t).__name__ for t in chain[1:]] == ["CropForegroundd", "ResizeWithPadOrCropd"]
