"""ONNX: ``monai.bundle onnx_export`` with the bundle's args file writes a model
with a dynamic batch that ONNX Runtime runs; its outputs equal PyTorch's; the inference bundle
run with ``--ckpt model.onnx`` writes the same masks and probabilities as with ``model.pt``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.io.errors import InputError
from tests.helpers import ROOT
from tests.helpers import TINY as BASE

pytest.importorskip("onnxruntime")
CONFIGS = ROOT / "bundles" / "plgg_mtl" / "configs"
TINY = {**BASE, "sw_batch_size": 3}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def cli(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Random weights of the tiny network as model.pt and its ONNX export beside it."""
    from monai.bundle import ConfigParser

    base = tmp_path_factory.mktemp("onnx")
    overlay = base / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(overlay)])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (base / "models").mkdir()
    torch.save(network.state_dict(), base / "models" / "model.pt")
    onnx_file = base / "models" / "model.onnx"
    cli(["onnx_export", "network_def", "--filepath", str(onnx_file), "--ckpt_file", str(base / "models" / "model.pt"),
         "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", repr([str(CONFIGS / "inference.json"), str(overlay)]),
         "--input_shape", "[1, 4, 16, 16, 16]", "--args_file", str(CONFIGS / "onnx_export_args.json")])
    return {"base": base, "overlay": overlay, "pt": base / "models" / "model.pt", "onnx": onnx_file,
            "network": network.eval()}


def test_onnx_runtime_equals_pytorch_with_any_batch(exported):
    from pipeline.models.onnx_backend import OnnxNetwork

    ort_net = OnnxNetwork(exported["onnx"])
    x = torch.randn(3, 4, 16, 16, 16)  # a batch the export never saw (it was traced with 1)
    with torch.no_grad():
        ref = exported["network"](x)
    got = ort_net(x)
    assert len(got) == 3
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert torch.allclose(r, g, atol=1e-4, rtol=1e-4), float((r - g).abs().max())
    with pytest.raises(InputError, match="export it with --input_shape"):
        ort_net(torch.randn(1, 4, 24, 16, 16))


def test_backend_must_match_the_file(exported):
    from pipeline.models.weights import load_network

    with pytest.raises(InputError, match="backend onnx needs an ONNX file"):
        load_network(exported["network"], exported["pt"], backend="onnx")
    assert type(load_network(exported["network"], exported["onnx"])).__name__ == "OnnxNetwork"


def test_inference_bundle_through_onnx_runtime_writes_the_same_masks(exported, tmp_path):
    import shutil

    from pipeline.data.phantom.build import make_cohort

    datalist = Path(make_cohort(tmp_path / "cohort", cases=4, seed=4, spacing=6.0, space="atlas").datalist)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, entry in enumerate(json.loads(datalist.read_text(encoding="utf-8"))["training"][:2]):
        shutil.copy(datalist.parent / entry["image"], scans / f"case{i}.nii.gz")
    rows = {}
    for kind in ("pt", "onnx"):
        out = tmp_path / kind
        cli(["run", "--config_file", repr([str(CONFIGS / "inference.json"), str(exported["overlay"])]),
             "--input_dir", str(scans), "--output_dir", str(out), "--ckpt", str(exported[kind]), "--pattern", "['*']"])
        rows[kind] = {r["id"]: r for r in csv.DictReader((out / "predictions.csv").open(encoding="utf-8"))}
    for cid in ("case0", "case1"):
        a = nib.load(tmp_path / "pt" / cid / "seg.nii.gz").get_fdata()
        b = nib.load(tmp_path / "onnx" / cid / "seg.nii.gz").get_fdata()
        assert a.shape == b.shape and a.sum() > 0 and np.array_equal(a, b)
        for k in ("p_BRAF V600E", "p_BRAF fusion", "p_other"):
            assert float(rows["pt"][cid][k]) == pytest.approx(float(rows["onnx"][cid][k]), abs=1e-4)


def test_pipeline_onnx_has_dynamic_spatial_axes(exported, tmp_path):
    """``python -m pipeline onnx``: batch and spatial sizes free (multiples of 8); equal to PyTorch."""
    import onnx

    from pipeline.models.onnx_backend import OnnxNetwork

    out = tmp_path / "dynamic.onnx"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "onnx", "--ckpt", str(exported["pt"]), "--out", str(out),
                           "--config_file", str(CONFIGS / "inference.json"), str(exported["overlay"])],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "agrees with PyTorch" in proc.stdout
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["metadata.json"])["version"] == json.loads(
        (CONFIGS / "metadata.json").read_text(encoding="utf-8"))["version"]
    net = OnnxNetwork(out)
    for shape in ((1, 4, 24, 16, 32), (2, 4, 40, 8, 16)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = exported["network"](x)
        got = net(x)
        assert all(torch.allclose(r, g, atol=1e-4) for r, g in zip(ref, got, strict=True)), shape
        assert got[0].shape == (shape[0], 1, *shape[2:])


@pytest.mark.parametrize("kwargs", [{"backbone": "basic_unet"},
                                    {"backbone": "segresnet", "reconstruct": True, "detect": True, "det_channels": 8},
                                    {"backbone": "basic_unet", "cls_inputs": "position"}],
                         ids=["basic_unet", "segresnet_recon_detect", "basic_unet_position_head"])
def test_other_networks_export_with_dynamic_spatial_axes(kwargs, tmp_path):
    """A backbone adapter (which pads inside its forward; also with the head reading the position alone)
    and the network with the reconstruction and detection branches (four outputs, then the detection head's class and box maps per level) export
    with free spatial sizes; ONNX Runtime equals PyTorch at a size the trace never saw."""
    from pipeline.models.backbones import multitask_network
    from pipeline.models.onnx_backend import OnnxNetwork
    from pipeline.models.onnx_export import export_onnx

    torch.manual_seed(0)
    # the product's head: tumour-weighted pooling and 3 coordinate channels after the image
    network = multitask_network(in_channels=1, coord_channels=3, cls_pooling="tumour", init_filters=8,
                                cls_hidden=[8], **kwargs).eval()
    factor = int(getattr(network, "export_factor", 8))
    min_size = int(getattr(network, "export_min_size", 1))
    size = max(2 * factor, min_size)
    export_onnx(network, tmp_path / "net.onnx", 4, factor, [size] * 3, min_size=min_size)
    x = torch.randn(1, 4, size + factor, size, size + 2 * factor)
    with torch.no_grad():
        ref = network(x)
    onnx_net = OnnxNetwork(tmp_path / "net.onnx")
    got = onnx_net(x)
    if kwargs.get("detect"):
        assert onnx_net.output_names[3:] == ["reconstruction", "det_class_level2", "det_class_level3",
                                             "det_box_level2", "det_box_level3"]
        ref = (*ref[:4], *ref[4])
        assert got[-1].shape == (1, 12, *(s // 8 for s in x.shape[2:]))  # 2 anchors x 6 box deltas, stride 8
    else:
        assert len(got) == len(ref) == 3 and onnx_net.output_names[-1] == "embedding"
    assert got[0].shape == (1, 1, *x.shape[2:])
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(r, g, atol=1e-4), float((r - g).abs().max())
    assert onnx_net.downsampling == factor  # a whole-volume classification pads to what the file accepts
    with pytest.raises(InputError, match=f"multiples of {factor} from {min_size}"):
        onnx_net(torch.randn(1, 4, size + 1, size, size))
