"""The record of a model's input sequences beside its weights, and what inference reads from it."""

from __future__ import annotations

import json

import pytest

from pipeline.io.errors import InputError
from pipeline.models.weights import describe_inputs, record_inputs, trained_sequences


def test_record_and_read_back(tmp_path):
    base = {"network_data_format": {"inputs": {"image": {"num_channels": 4, "channel_def": {"0": "FLAIR"}}}}}
    record_inputs(tmp_path / "models", ["flair", "t1ce"], None, coord_channels=3, metadata=base)
    saved = json.loads((tmp_path / "models" / "inputs.json").read_text(encoding="utf-8"))
    assert saved == {"sequences": ["flair", "t1ce"], "reference_sequence": "flair", "coord_channels": 3}
    image = json.loads((tmp_path / "models" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 5 and image["sequences"] == ["flair", "t1ce"]
    assert image["channel_def"]["1"].startswith("t1ce") and "coordinate" in image["channel_def"]["4"]
    assert base["network_data_format"]["inputs"]["image"]["num_channels"] == 4  # the bundle's own left alone
    ckpt = tmp_path / "models" / "model.pt"
    assert trained_sequences(ckpt) == ["flair", "t1ce"]
    assert trained_sequences(ckpt, ["FLAIR", "T1CE"]) == ["flair", "t1ce"]
    with pytest.raises(InputError, match=r"trained on the sequences \['flair', 't1ce'\], in this order"):
        trained_sequences(ckpt, ["t1ce", "flair"])


def test_models_without_a_record_and_one_image(tmp_path):
    assert trained_sequences(tmp_path / "old" / "model.pt") == ["image"]  # trained before the record existed
    assert trained_sequences(tmp_path / "old" / "model.pt", ["flair"]) == ["flair"]
    record_inputs(tmp_path / "one", ["image"])
    assert trained_sequences(tmp_path / "one" / "model.pt") == ["image"]
    assert trained_sequences(tmp_path / "one" / "model.pt", ["flair"]) == ["flair"]  # the config names the one image
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "inputs.json").write_text("{", encoding="utf-8")
    with pytest.raises(InputError, match="cannot be read as the model's input record"):
        trained_sequences(tmp_path / "bad" / "model.pt")


def test_describe_inputs_without_coordinates():
    out = describe_inputs({}, ["flair"], 0)
    assert out["network_data_format"]["inputs"]["image"] == {
        "num_channels": 1, "channel_def": {"0": "FLAIR (z-scored inside the brain)"}, "sequences": ["flair"]}
