"""The inference bundle (``bundles/plgg_mtl/configs/inference.json``, :mod:`pipeline.inference.folder`):
case discovery, a corrupt case among good ones, re-runs, native geometry for LAS/RAS/LPS and DICOM
inputs, flip TTA, TorchScript export, and the four real FLAIRs. Tiny: 6 mm phantoms, 16-cubed
patches, 8 initial filters, a checkpoint trained for one epoch by ``train.json``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.inference.cases import find_cases, largest_component, tumour_measures
from pipeline.io.errors import InputError
from tests.helpers import CONFIGS, DEMO, INFER, ROOT, TINY, TRAIN, bundle, write_dicom_series


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """An atlas-space phantom cohort and a checkpoint trained for one epoch by train.json + demo.json."""
    from pipeline.data.phantom.build import make_cohort

    root = tmp_path_factory.mktemp("inference")
    cohort = make_cohort(root / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlay = root / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    run = root / "run"
    done = bundle(["run", "training"], [TRAIN, DEMO, overlay], datalist=cohort, output_dir=run, epochs=1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {"root": root, "cohort": cohort.parent, "ckpt": run / "models" / "model.pt", "overlay": overlay}


def build(trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch, **overrides):
    """The real inference.json (+ demo + tiny overlays) parsed in-process: ``(runner, cases)``."""
    from pipeline.inference.folder import runner_from_config

    monkeypatch.chdir(ROOT)  # the configs' %file macros are relative to the repository root
    files = [ROOT / INFER, ROOT / DEMO, trained["overlay"]]
    return runner_from_config(files, **{"ckpt": str(trained["ckpt"]), **overrides})


def read_report(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def copy_case(trained: dict[str, Path], cid: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((trained["cohort"] / cid / "image.nii.gz").read_bytes())
    return dest


class CountingNetwork(torch.nn.Module):
    """Counts forward calls of the wrapped network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        return self.net(x)


# ----------------------------------------------------------------------------- discovery and measures


def test_find_cases_rules(tmp_path):
    (tmp_path / "a.nii.gz").touch()
    (tmp_path / "b.nii").touch()
    (tmp_path / "notes.txt").touch()
    (tmp_path / ".hidden.nii.gz").touch()
    for sub, names in {"p1": ["P1_FLAIR.nii.gz", "p1_t1.nii.gz"], "p2": ["t2f.nii.gz", "t1n.nii.gz"],
                       "p3": ["x_flair.nii.gz", "y_flair.nii"], "empty": ["readme.md"], "out": ["q_flair.nii"]}.items():
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).touch()
    cases = {c.id: c for c in find_cases(tmp_path, exclude=[tmp_path / "out"])}
    assert sorted(cases) == ["a", "b", "empty", "p1", "p2", "p3"]  # "out" excluded, hidden ignored
    assert cases["p1"].path.name == "P1_FLAIR.nii.gz" and cases["p2"].path.name == "t2f.nii.gz"
    assert cases["p3"].problem and "2 entries match" in cases["p3"].problem
    assert "nothing in this folder matches" in cases["empty"].problem  # reported as failed, not dropped
    by_t1n = {c.id: c for c in find_cases(tmp_path, pattern="t1n*", exclude=[tmp_path / "out"])}
    assert by_t1n["p2"].path.name == "t1n.nii.gz" and by_t1n["p1"].problem
    (tmp_path / "a.nii").touch()  # two inputs with one id: both fail, the others still run
    clash = [c for c in find_cases(tmp_path, exclude=[tmp_path / "out"]) if c.id == "a"]
    assert sorted(c.path.name for c in clash) == ["a.nii", "a.nii.gz"]
    assert all("is also given by" in c.problem for c in clash)
    with pytest.raises(InputError, match="no input volumes"):
        find_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="input folder not found"):
        find_cases(tmp_path / "nowhere")
    with pytest.raises(InputError, match="either --input_dir"):
        find_cases(None, None)


def test_find_cases_of_several_sequences(tmp_path):
    brats18 = ["x_flair.nii.gz", "x_t1.nii.gz", "x_t1ce.nii.gz", "x_t2.nii.gz", "x_seg.nii.gz"]
    brats23 = ["X-t2f.nii.gz", "X-t1n.nii.gz", "X-t1c.nii.gz", "X-t2w.nii.gz", "X-seg.nii.gz"]
    layout = {"b18": brats18, "b23": brats23, "no_t1ce": [n for n in brats18 if "t1ce" not in n],
              "two_t2": [*brats18, "y_t2.nii.gz"]}
    for sub, names in layout.items():
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).touch()
    (tmp_path / "lone.nii.gz").touch()
    seqs = ["flair", "t1", "t1ce", "t2"]
    cases = {c.id: c for c in find_cases(tmp_path, sequences=seqs)}
    assert [p.name for p in cases["b18"].sequences] == brats18[:4] and cases["b18"].path.name == "x_flair.nii.gz"
    assert [p.name for p in cases["b23"].sequences] == brats23[:4]
    assert cases["no_t1ce"].problem.startswith("no t1ce sequence: nothing in this folder matches")
    assert "2 entries match the t2 patterns" in cases["two_t2"].problem
    assert "put each case's files in a sub-folder" in cases["lone"].problem
    assert all(cases[k].problem is None for k in ("b18", "b23"))
    # another order, another reference, patterns of one's own
    other = {c.id: c for c in find_cases(tmp_path, sequences=["t2", "flair"], reference_sequence="t2",
                                         sequence_patterns={"flair": "*-t2f*"})}
    assert [p.name for p in other["b23"].sequences] == ["X-t2w.nii.gz", "X-t2f.nii.gz"]
    assert other["b23"].path.name == "X-t2w.nii.gz" and "no flair sequence" in other["b18"].problem
    # one sequence: the folder rules as before
    assert find_cases(tmp_path, sequences=["flair"], exclude=[])[0].sequences == ()


def test_dicom_series_matched_by_series_description(tmp_path):
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, (4, 8, 8)).astype(np.float32))
    case = tmp_path / "in" / "p1"
    write_dicom_series(img, case / "series_a", number=1, description="AX T2 FLAIR")
    write_dicom_series(img, case / "series_b", number=2, description="AX T2 TSE")
    found = find_cases(tmp_path / "in", sequences=["flair", "t2"])
    assert found[0].problem is None
    assert [p.name for p in found[0].sequences] == ["series_a", "series_b"]


def test_datalist_input_takes_the_model_sequences(tmp_path):
    (tmp_path / "a").mkdir()
    for n in ("flair", "t1", "t2"):
        (tmp_path / "a" / f"{n}.nii.gz").touch()
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"sequences": ["flair", "t1", "t2"], "training": [
        {"id": "a", "image": ["a/flair.nii.gz", "a/t1.nii.gz", "a/t2.nii.gz"]}]}), encoding="utf-8")
    (case,) = find_cases(datalist=path, sequences=["t2", "flair"])
    assert [p.name for p in case.sequences] == ["t2.nii.gz", "flair.nii.gz"] and case.path.name == "flair.nii.gz"


def test_second_inference_on_one_output_folder_is_refused(trained, tmp_path):
    from pipeline.runtime.locks import folder_lock

    out = tmp_path / "out"
    with folder_lock(out, "inference run"):  # another run writing this folder
        done = bundle(["run"], [INFER, DEMO, trained["overlay"]], datalist=trained["cohort"] / "datalist.json",
                      output_dir=out, ckpt=trained["ckpt"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{out}: is in use by another inference run (inference run, pid" in done.stderr
    assert not [p.name for p in out.iterdir() if not p.name.startswith(".")]  # no report, no case folder


def test_tumour_measures_volume_and_box():
    arr = np.zeros((10, 12, 14), np.uint8)  # z, y, x
    arr[2:5, 3:7, 4:9] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 1.0, 3.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    m = tumour_measures(img)
    assert m["volume_ml"] == pytest.approx(3 * 4 * 5 * 6.0 / 1000)
    assert m["bbox_voxel_min"] == "4 3 2" and m["bbox_voxel_max"] == "8 6 4"
    assert m["bbox_ras_min_mm"] == "-26.0 -26.0 36.0" and m["bbox_ras_max_mm"] == "-18.0 -23.0 42.0"  # LPS -> RAS
    assert tumour_measures(img * 0)["bbox_voxel_min"] == ""
    arr[7:9, 9:11, 1:3] = 1  # a second, smaller blob
    both = sitk.GetImageFromArray(arr)
    assert sitk.GetArrayFromImage(largest_component(both)).sum() == 60  # the QC picture centres on this one


# ----------------------------------------------------------------------------- the bundle, end to end


def test_bundle_run_corrupt_case_then_rerun(trained, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for cid in ("c000", "c001"):
        copy_case(trained, cid, inputs / f"{cid}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes((inputs / "c001.nii.gz").read_bytes()[:2000])
    configs = [INFER, DEMO, trained["overlay"]]
    first = bundle(["run"], configs, input_dir=inputs, output_dir=out, ckpt=trained["ckpt"])
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "2 of 3 case(s) ok" in first.stderr and "failed: broken" in first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    rows = {r["id"]: r for r in read_report(out)}
    assert set(rows) == {"c000", "c001", "broken"}
    assert rows["broken"]["status"].startswith("failed: ") and "corrupt" in rows["broken"]["status"]
    for cid in ("c000", "c001"):
        assert rows[cid]["status"] == "ok"
        probs = [float(rows[cid][f"p_{n}"]) for n in ("BRAF V600E", "BRAF fusion", "other")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and rows[cid]["predicted_class"]
        seg, src = nib.load(out / cid / "seg.nii.gz"), nib.load(inputs / f"{cid}.nii.gz")
        assert seg.shape == src.shape and np.array_equal(seg.affine, src.affine) and seg.get_data_dtype() == np.uint8
        assert (out / cid / "qc.png").stat().st_size > 0
    assert len(json.loads((out / "predictions.json").read_text(encoding="utf-8"))["cases"]) == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("c00*/*")}

    second = bundle(["run"], configs, input_dir=inputs, output_dir=out, ckpt=trained["ckpt"])
    assert second.returncode == 1 and "(2 from an earlier run)" in second.stderr
    assert second.stdout.count("finished by an earlier run, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("c00*/*")} == stamps
    again = {r["id"]: r for r in read_report(out)}
    assert set(again) == set(rows) and again["c000"]["reused"] == "True"
    assert again["c000"]["p_other"] == rows["c000"]["p_other"]


def test_bundle_reports_missing_checkpoint_in_one_line(trained, tmp_path):
    copy_case(trained, "c000", tmp_path / "in" / "c000.nii.gz")
    done = bundle(["run"], [INFER, DEMO, trained["overlay"]], input_dir=tmp_path / "in", output_dir=tmp_path / "out",
                  ckpt=tmp_path / "nowhere.pt")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nowhere.pt: checkpoint not found" in done.stderr


# ----------------------------------------------------------------------------- in-process runs


def test_rerun_skips_finished_cases_without_network_calls(trained, tmp_path, monkeypatch):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for cid in ("c002", "c003"):
        copy_case(trained, cid, inputs / cid / "flair.nii.gz")  # per-case sub-folders
    (inputs / "c004").mkdir()
    (inputs / "c004" / "flair.nii.gz").write_bytes(b"not an image")
    overrides = {"input_dir": str(inputs), "output_dir": str(out), "write_prob": True}
    runner, cases = build(trained, monkeypatch, **overrides)
    runner.network = counter = CountingNetwork(runner.network)
    rows = runner.run(cases)
    assert [r["status"] == "ok" for r in rows] == [True, True, False] and counter.calls > 0
    prob, seg = (nib.load(out / "c002" / n).get_fdata() for n in ("prob.nii.gz", "seg.nii.gz"))
    assert np.array_equal(prob >= 0.5, seg > 0)  # the mask is the native probability thresholded
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("c00[23]/*")}

    runner, cases = build(trained, monkeypatch, **overrides)
    runner.network = counter = CountingNetwork(runner.network)
    rows = runner.run(cases)
    assert counter.calls == 0 and [r.get("reused") for r in rows] == [True, True, False]
    assert {p: p.stat().st_mtime_ns for p in out.glob("c00[23]/*")} == stamps
    assert len(read_report(out)) == 3
    with pytest.raises(SystemExit) as exit_info:
        runner.exit_on_failure()
    assert exit_info.value.code == 1

    runner, cases = build(trained, monkeypatch, **overrides, overwrite=True)
    runner.network = counter = CountingNetwork(runner.network)
    runner.run(cases)
    assert counter.calls > 0 and not any(r.get("reused") for r in runner.rows)


def reoriented(image: sitk.Image, code: str) -> sitk.Image:
    """The same physical image with another orientation code (SimpleITK's codes are nibabel's:
    ``"LPS"`` = identity direction = a RAS affine with diagonal -1, -1, 1)."""
    return sitk.DICOMOrient(image, code)


def test_native_geometry_for_las_ras_lps_and_dicom_inputs(trained, tmp_path, monkeypatch):
    source = sitk.ReadImage(str(trained["cohort"] / "c005" / "image.nii.gz"))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for code in ("LAS", "RAS", "LPS"):
        sitk.WriteImage(reoriented(source, code), str(inputs / f"case_{code}.nii.gz"))
        assert "".join(nib.aff2axcodes(nib.load(inputs / f"case_{code}.nii.gz").affine)) == code
    series = write_dicom_series(source, inputs / "dicom_case")
    runner, cases = build(trained, monkeypatch, input_dir=str(inputs), output_dir=str(out), already_registered=False)
    rows = {r["id"]: r for r in runner.run(cases)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert set(rows) == {"case_LAS", "case_RAS", "case_LPS", "dicom_case"}
    segs = {}
    for code in ("LAS", "RAS", "LPS"):
        src, seg = nib.load(inputs / f"case_{code}.nii.gz"), nib.load(out / f"case_{code}" / "seg.nii.gz")
        assert seg.shape == src.shape and np.array_equal(seg.affine, src.affine)
        segs[code] = sitk.DICOMOrient(sitk.ReadImage(str(out / f"case_{code}" / "seg.nii.gz")), "LPS")
    # the same physical volume gives (nearly) the same physical mask whatever its voxel order
    ref = sitk.GetArrayFromImage(segs["RAS"]) > 0
    for code in ("LAS", "LPS"):
        other = sitk.GetArrayFromImage(segs[code]) > 0
        assert 2 * (ref & other).sum() / (ref.sum() + other.sum()) > 0.9
    native = sitk.ReadImage([str(p) for p in sorted(series.glob("*.dcm"))])
    seg = sitk.ReadImage(str(out / "dicom_case" / "seg.nii.gz"))
    assert seg.GetSize() == native.GetSize() and seg.GetPixelID() == sitk.sitkUInt8
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(seg, get)(), getattr(native, get)(), atol=1e-4), get
    check_dicom_seg(out / "dicom_case" / "seg.dcm", series, sitk.GetArrayFromImage(seg) > 0)
    assert not (out / "case_RAS" / "seg.dcm").exists()  # NIfTI inputs get no DICOM SEG


def check_dicom_seg(path, series, mask) -> None:
    """The DICOM SEG read back with pydicom / highdicom: one frame per source slice holding tumour,
    each referencing that slice's instance, at its position, with its pixels of ``mask``; the
    series, study and frame of reference of the source."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in series.glob("*.dcm"))}
    first = next(iter(sources.values()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "Tumour" and seg.SegmentationType == "BINARY"
    bundle = json.loads((ROOT / "bundles/plgg_mtl/configs/metadata.json").read_text(encoding="utf-8"))
    assert seg.SoftwareVersions == bundle["version"]
    order = [ds.SOPInstanceUID for ds in sorted(sources.values(), key=lambda d: int(d.InstanceNumber))]
    frames = seg.pixel_array.reshape(-1, *mask.shape[1:]).astype(bool)
    expected = [k for k in range(mask.shape[0]) if mask[k].any()]
    assert int(seg.NumberOfFrames) == len(expected) > 0
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = order.index(uid)
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
        assert np.array_equal(frame, mask[k]), k


def test_tta_is_mean_of_flipped_predictions(trained, tmp_path, monkeypatch):
    from monai.inferers import sliding_window_inference

    runner, _ = build(trained, monkeypatch, input_dir=str(trained["cohort"]), output_dir=str(tmp_path),
                      tta_flips=[[0], [1, 2]], sw_overlap=0.5, postprocess="none")
    net, cfg = runner.network, runner.inferer.cfg
    assert cfg.flips == [(), (0,), (1, 2)]
    channels = 1 + net.coord_channels  # FLAIR + the atlas coordinate channels of the default head
    x = torch.randn(1, channels, 20, 26, 18, generator=torch.Generator().manual_seed(0))
    pred = runner.inferer(x, net)

    def flip(t, axes):
        return torch.flip(t, [a + 2 for a in axes]) if axes else t

    with torch.no_grad():
        seg = torch.stack([flip(torch.sigmoid(sliding_window_inference(
            flip(x, f), [16, 16, 16], 4, lambda v: net(v)[0], overlap=0.5, mode="gaussian")), f)
            for f in ((), (0,), (1, 2))]).mean(0)
        # the classifier's patch: 16-cubed, centred on the centre of mass of the predicted tumour
        # component with the largest summed probability (most probable voxel if none), shifted to
        # stay inside the 20 x 26 x 18 volume
        from scipy import ndimage

        prob = seg[0, 0].numpy()
        labels, n = ndimage.label(prob >= 0.5, structure=np.ones((3, 3, 3)))
        if n:
            top = 1 + int(np.argmax(ndimage.sum(prob, labels, index=range(1, n + 1))))
            centre = np.argwhere(labels == top).mean(0)
        else:
            centre = np.array(np.unravel_index(prob.argmax(), prob.shape), float)
        lo = [int(np.clip(round(c) - 8, 0, n - 16)) for c, n in zip(centre, prob.shape, strict=True)]
        patch = x[:, :, lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 16]
        # the class follows the location: only the flips within training's flip_axes ([0]) are
        # averaged (their logits), then softmax at the decided temperature (1: no decision file)
        cls = torch.softmax(torch.stack([net(flip(patch, f))[1] for f in ((), (0,))]).mean(0), 1)
    assert torch.allclose(pred["seg"], seg, atol=1e-6)
    assert torch.allclose(pred["cls"], cls, atol=1e-6)
    single = runner.inferer.__class__([16, 16, 16], 4, 0.5, postprocess="none")(x, net)["seg"]
    assert not torch.allclose(single, seg, atol=1e-4)  # the flips do change the prediction


def test_torchscript_export_matches_checkpoint(trained, tmp_path, monkeypatch):
    from pipeline.models.weights import load_network

    ts = tmp_path / "model.ts"
    done = bundle(["ckpt_export", "network_def"], [INFER, DEMO, trained["overlay"]], filepath=ts,
                  ckpt_file=trained["ckpt"], meta_file=ROOT / CONFIGS / "metadata.json")
    assert done.returncode == 0 and ts.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    runner, _ = build(trained, monkeypatch, input_dir=str(trained["cohort"]), output_dir=str(tmp_path))
    scripted = load_network(None, ts)  # a .ts checkpoint is loaded as TorchScript
    assert isinstance(scripted, torch.jit.ScriptModule)
    x = torch.randn(2, 1 + runner.network.coord_channels, 16, 24, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(runner.network(x), scripted(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    extra = {"metadata.json": "", "inference.json": "", "demo.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] and json.loads(extra["inference.json"])["network_def"]


# ----------------------------------------------------------------------------- real scans


REAL_FLAIRS = {"tcga_native": "TCGA-FG-6692/native/flair.nii.gz", "tcga_sri24": "TCGA-FG-6692/sri24/flair_brain.nii.gz",
               "brats_gli": "BraTS-GLI-00001-000/t2f.nii.gz", "brats_met": "BraTS-MET-00110-000/t2f.nii.gz"}


@pytest.mark.slow
@pytest.mark.real
def test_real_flairs_in_one_run(trained, real_data, tmp_path, monkeypatch):
    datalist = tmp_path / "real.json"
    datalist.write_text(json.dumps({"training": [{"id": k, "image": str(real_data / v)} for k, v in REAL_FLAIRS.items()]}), encoding="utf-8")
    out = tmp_path / "out"
    runner, cases = build(trained, monkeypatch, datalist=str(datalist), output_dir=str(out), already_registered=False)
    rows = runner.run(cases)
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    report = read_report(out)
    assert len(report) == 4
    for row in report:
        assert sum(float(row[f"p_{n}"]) for n in ("BRAF V600E", "BRAF fusion", "other")) == pytest.approx(1, abs=1e-4)
        src, seg = nib.load(real_data / REAL_FLAIRS[row["id"]]), nib.load(out / row["id"] / "seg.nii.gz")
        assert seg.shape == src.shape and np.array_equal(seg.affine, src.affine)
        assert (out / row["id"] / "qc.png").is_file()


@pytest.mark.parametrize("kind", ["2-D", "NaN", "constant"])
def test_bad_case_fails_alone_and_leaves_no_stale_outputs(trained, tmp_path, monkeypatch, kind):
    inputs, out = tmp_path / "in", tmp_path / "out"
    copy_case(trained, "c002", inputs / "c002.nii.gz")
    copy_case(trained, "c003", inputs / "c003.nii.gz")
    runner, cases = build(trained, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    assert [r["status"] for r in runner.run(cases)] == ["ok", "ok"]
    assert (out / "c003" / "seg.nii.gz").exists()

    # c003 is replaced by a bad file: the re-run fails it and removes the earlier outputs
    src = nib.load(inputs / "c003.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)
    if kind == "2-D":
        bad = nib.Nifti1Image(data[:, :, data.shape[2] // 2], src.affine)
    elif kind == "NaN":
        data[3, 3, 3] = np.nan
        bad = nib.Nifti1Image(data, src.affine)
    else:
        bad = nib.Nifti1Image(np.full(data.shape, 7.0, np.float32), src.affine)
    nib.save(bad, inputs / "c003.nii.gz")
    runner, cases = build(trained, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    rows = {r["id"]: r for r in runner.run(cases)}
    assert rows["c002"]["status"] == "ok" and rows["c002"]["reused"]
    assert rows["c003"]["status"].startswith("failed: "), rows["c003"]
    assert str(inputs / "c003.nii.gz") in rows["c003"]["input"]
    assert not any((out / "c003").glob("*")), list((out / "c003").glob("*"))  # no mask beside 'failed'
    assert {r["id"]: r["status"][:6] for r in read_report(out)} == {"c002": "ok", "c003": "failed"}


def test_native_boxes_follow_the_registration_into_the_scan():
    """An atlas box through a known atlas -> native transform (2 mm atlas voxels, 1 mm native ones,
    shifted by 10 mm): its native voxel extent and RAS corners, computed here by hand."""
    from pipeline.inference.cases import box_mask, native_boxes, report_columns

    atlas = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    atlas.SetSpacing((2.0, 2.0, 2.0))
    native = sitk.Image(60, 60, 60, sitk.sitkUInt8)
    shift = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))  # atlas point p lies at p + (10, 0, 0) in the scan
    (box,) = native_boxes([[2, 3, 4, 5, 6, 7]], [0.9], atlas, shift, native)
    # voxel edges 1.5..4.5 (x) -> 3..9 mm -> 13..19 mm in the scan -> native voxel centres 13..19
    assert box["voxel_min"] == "13 5 7" and box["voxel_max"] == "19 11 13" and box["score"] == 0.9
    assert box["ras_min_mm"] == "-19.0 -11.0 7.0" and box["ras_max_mm"] == "-13.0 -5.0 13.0"  # LPS -> RAS
    mask = sitk.GetArrayFromImage(box_mask(native, [box]))
    assert mask.sum() == 7 * 7 * 7 and mask[7, 5, 13] == 1 and mask[7, 5, 12] == 0  # (z, y, x)
    assert "boxes" not in report_columns([], [{"id": "a", "boxes": [box], "lesions_detected": 1}])
