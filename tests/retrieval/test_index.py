"""Retrieval: RoI pooling against a hand computation, box distortion, tumour properties, the
leave-one-out K-NN scores, the index file, and index / query / evaluate end to end on a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.io.errors import InputError
from pipeline.retrieval.evaluate import loo_neighbours, score_neighbours, vote
from pipeline.retrieval.index import (
    distort_box,
    feature_box,
    read_index,
    roi_max_pool,
    tumour_box,
    tumour_properties,
    write_index,
)
from tests.conftest import REAL_DATA
from tests.helpers import ROOT, TINY


def test_roi_max_pool_takes_the_box_cells_of_the_feature_grid():
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(5, 4, 4, 4, generator=g)
    feat[:, 3, 3, 3] = 9.0  # outside the box: must not win
    lo, hi = np.array([2.0, 0.0, 5.0]), np.array([6.0, 3.0, 9.0])  # voxels; stride 2 -> cells 1..2, 0..1, 2..4
    assert feature_box(lo, hi, 2, (4, 4, 4)) == ([1, 0, 2], [3, 2, 4])
    expected = feat[:, 1:3, 0:2, 2:4].reshape(5, -1).max(1).values.numpy()
    np.testing.assert_allclose(roi_max_pool(feat, lo, hi, 2), expected)
    # a box inside one cell, or off the grid, still pools at least one (clipped) cell
    assert feature_box(np.array([1.0, 1, 1]), np.array([1.5, 1.5, 1.5]), 8, (4, 4, 4)) == ([0, 0, 0], [1, 1, 1])
    assert feature_box(np.array([40.0, 0, 0]), np.array([50.0, 2, 2]), 8, (4, 4, 4))[0][0] == 3


def test_tumour_box_and_properties_on_a_known_grid():
    mask = np.zeros((20, 20, 20), bool)
    mask[12:16, 2:6, 10:14] = True  # 64 voxels of 2 mm = 512 mm3
    lo, hi = tumour_box(mask)
    np.testing.assert_array_equal(lo, [12, 2, 10]) and np.testing.assert_array_equal(hi, [16, 6, 14])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -60.0, -60.0]  # voxel (i, j, k) -> RAS mm
    p = tumour_properties(mask, affine, brain_centre=np.array([0.0, -20.0, -20.0]))
    assert p["volume_ml"] == pytest.approx(0.512)
    assert p["size_mm"] == pytest.approx((6 * 512 / np.pi) ** (1 / 3), rel=1e-3)
    assert p["centroid_mm"] == [7.0, -53.0, -37.0]
    assert (p["hemisphere"], p["front_rear"], p["upper_lower"]) == ("right", "rear", "lower")
    assert p["tentorium"] == "infratentorial" and p["region"] == "infratentorial"
    assert tumour_box(np.zeros((3, 3, 3))) is None


def test_box_distortion_has_the_stated_spread():
    rng = np.random.default_rng(0)
    lo, hi = np.array([10.0, 10, 10]), np.array([30.0, 20, 40])
    draws = [distort_box(lo, hi, rng) for _ in range(4000)]
    log2_scale = np.log2(np.array([(b - a) / (hi - lo) for a, b in draws]))
    shift = np.array([((a + b) / 2 - (lo + hi) / 2) / (hi - lo) for a, b in draws])
    np.testing.assert_allclose(log2_scale.std(0), 1 / 3, rtol=0.05)
    np.testing.assert_allclose(shift.std(0), 0.1, rtol=0.05)
    assert abs(log2_scale.mean()) < 0.02 and abs(shift.mean()) < 0.01


def test_vote_and_leave_one_out_scores_against_hand_counts():
    assert vote(["a", "b", "b"]) == "b" and vote(["a", "b"]) == "a" and vote(["b", "a", "a", "b"]) == "b"
    assert vote([None, "c"]) == "c" and vote([None]) is None
    # two tight clusters on a line: each case's nearest others are its own cluster
    emb = np.array([[0.0], [0.1], [0.25], [10.0], [10.2], [10.3]])
    nb = loo_neighbours(emb, emb, kmax=3)
    assert nb.shape == (6, 3) and all(i not in row for i, row in enumerate(nb))
    np.testing.assert_array_equal(nb[0, :2], [1, 2])
    truth = {"class": [0, 0, 1, 1, 1, 1], "region": ["a", "a", "a", "b", "b", None]}
    sizes = np.array([10.0, 12, 14, 30, 32, 34])
    s = score_neighbours(nb, truth, sizes)
    # K=1: nearest of case 2 (class 1) is case 1 (class 0): 5 of 6 right. Region: 5 cases known; case 4's
    # nearest (case 5) has no region, so nobody votes and it counts as a miss: 4 of 5
    assert s["class"][0] == pytest.approx(5 / 6) and s["region"][0] == pytest.approx(4 / 5)
    guess = sizes[nb[:, 0]]
    assert s["size_rmse_mm"][0] == pytest.approx(np.sqrt(np.mean((guess - sizes) ** 2)))


def test_index_round_trip_without_pickle_and_clear_errors(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_index(tmp_path / "idx", emb, [{"id": f"c{i}"} for i in range(3)], {"level": -1})
    got, doc, mean, sd = read_index(tmp_path / "idx")
    np.testing.assert_array_equal(got, emb)
    np.testing.assert_allclose(mean, emb.mean(0)) and np.testing.assert_allclose(sd, emb.std(0))
    assert doc["settings"]["level"] == -1 and [c["id"] for c in doc["cases"]] == ["c0", "c1", "c2"]
    assert path.name == "idx.json" and (tmp_path / "idx.npz").is_file()
    with pytest.raises(InputError, match="not found"):
        read_index(tmp_path / "nothing")
    (tmp_path / "idx.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable retrieval index"):
        read_index(tmp_path / "idx.json")




def _run(args: list[str], timeout: float = 400) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_index_query_evaluate_end_to_end(tmp_path):
    from pipeline.data.phantom.build import make_cohort

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=1, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    files = [str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / "configs/demo.json"), str(overlay)]
    run = tmp_path / "run"
    _run(["-m", "monai.bundle", "run", "training", "--config_file", repr(files), "--datalist", str(datalist),
          "--output_dir", str(run), "--epochs", "1"])
    ckpt = run / "models" / "model.pt"
    overlays = ["configs/demo.json", str(overlay)]
    out = _run(["-m", "pipeline", "retrieval", "index", "--datalist", str(datalist), "--ckpt", str(ckpt),
                "--overlays", *overlays, "--out", str(tmp_path / "index"), "--already_registered"])
    emb, doc, _, _ = read_index(tmp_path / "index")
    assert emb.shape == (8, 64) and np.isfinite(emb).all() and "8/8" in out
    cases = doc["cases"]
    assert {"id", "class", "volume_ml", "size_mm", "hemisphere", "front_rear", "upper_lower", "tentorium",
            "region"} <= set(cases[0])
    truth = json.loads((Path(datalist).parent / cases[0]["id"] / "truth.json").read_text(encoding="utf-8"))
    assert cases[0]["region"] == truth["region"]  # the generator's region, recovered from the mask
    # querying an indexed case with its own mask finds itself first, at distance 0
    first = Path(datalist).parent / cases[0]["id"]
    _run(["-m", "pipeline", "retrieval", "query", "--index", str(tmp_path / "index"), "--image",
          str(first / "image.nii.gz"), "--mask", str(first / "mask.nii.gz"), "--k", "3", "--out", str(tmp_path / "q"),
          "--already_registered"])
    result = json.loads((tmp_path / "q" / "neighbours.json").read_text(encoding="utf-8"))
    assert result["neighbours"][0]["id"] == cases[0]["id"] and result["neighbours"][0]["distance"] < 1e-3
    assert len(result["neighbours"]) == 3 and (tmp_path / "q" / "neighbours.png").stat().st_size > 1000
    assert (tmp_path / "q" / "neighbours.csv").read_text(encoding="utf-8").startswith("rank,distance,id")
    real = REAL_DATA / "TCGA-FG-6692" / "sri24"
    if real.is_dir():  # a real, differently shaped scan (240 x 240 x 155, 1 mm, LPS), registered the usual way
        _run(["-m", "pipeline", "retrieval", "query", "--index", str(tmp_path / "index"), "--image",
              str(real / "flair_brain.nii.gz"), "--mask", str(real / "seg_consensus.nii.gz"), "--k", "3",
              "--out", str(tmp_path / "qreal")])
        result = json.loads((tmp_path / "qreal" / "neighbours.json").read_text(encoding="utf-8"))
        assert len(result["neighbours"]) == 3 and result["query"]["box_source"] == "truth"
        assert (tmp_path / "qreal" / "neighbours.png").stat().st_size > 1000
        seg = nib.load(real / "seg_consensus.nii.gz")
        native_ml = float((np.asarray(seg.dataobj) > 0).sum() * np.prod(seg.header.get_zooms()[:3]) / 1000)
        # an affine registration rescales the volume by its determinant (brain size against the atlas'),
        # and the 6 mm grid is coarse: the same tumour, within a factor of two
        assert 0.5 * native_ml < result["query"]["volume_ml"] < 2.0 * native_ml
    _run(["-m", "pipeline", "retrieval", "evaluate", "--datalist", str(datalist), "--out", str(tmp_path / "ev"),
          "--model", "mtl", str(ckpt), *overlays, "--kmax", "4", "--report_k", "3", "--draws", "1",
          "--already_registered"])
    rep = json.loads((tmp_path / "ev" / "retrieval.json").read_text(encoding="utf-8"))
    for box in ("exact", "distorted"):
        for metric, values in rep["results"]["mtl"][box].items():
            assert len(values) == 4 and all(np.isfinite(values)), metric
    assert "| mtl | exact |" in (tmp_path / "ev" / "retrieval.md").read_text(encoding="utf-8")
    for png in ("retrieval_vs_k.png", "embeddings_tsne.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000
