"""Every overlay in ``configs/`` composes with both ``train.json`` and ``inference.json`` (MONAI's
parser refuses an overlay that sets a key only one of them has), and both build the same network, so
a checkpoint the training writes is one the inference bundle can load."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import ROOT

BUNDLE = ROOT / "bundles" / "plgg_mtl" / "configs"
OVERLAYS = sorted(p.name for p in (ROOT / "configs").glob("*.json"))


def network(base: str, overlay: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / base), str(ROOT / "configs" / "demo.json"), str(ROOT / "configs" / overlay)])
    return parser.get_parsed_content("network_def")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_the_same_network_for_training_and_inference(overlay):
    trained, inferred = network("train.json", overlay), network("inference.json", overlay)
    assert type(trained) is type(inferred)
    shapes = {k: tuple(v.shape) for k, v in trained.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in inferred.state_dict().items()}
    inferred.load_state_dict(trained.state_dict())  # strict: the checkpoint loads as is


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_of_the_overlay_resolves_with_train_json(overlay):
    """Each key an overlay sets evaluates on top of ``train.json`` (its expressions see only what the
    bundle imports)."""
    import json

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "train.json"), str(ROOT / "configs" / overlay)])
    keys = [k for k in json.loads((ROOT / "configs" / overlay).read_text(encoding="utf-8")) if not k.startswith("_")]
    for key in keys:
        parser.get_parsed_content(key)
