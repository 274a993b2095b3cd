"""Bad input as a hostile folder would give it: every file gets its true reason, one bad
file never costs the others, nothing is skipped silently, inputs are never modified.

The catalogue (:mod:`tests.bad_inputs`) goes through ``pipeline validate`` (in-process, per kind),
folder inference (in-process, per kind, next to a good case; and once through the CLI with every
kind in one folder), training (CLI) and checkpoint loading. Tiny: 6 mm atlas-space phantoms and an
untrained 8-filter network, so no training is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.io.errors import InputError
from tests.bad_inputs import IMAGE_KINDS, snapshot
from tests.helpers import ROOT, write_dicom_series
from tests.helpers import TINY as BASE

CONFIGS = "bundles/plgg_mtl/configs"
TRAIN, INFER, EVALUATE, DEMO = (f"{CONFIGS}/train.json", f"{CONFIGS}/inference.json", f"{CONFIGS}/evaluate.json",
                                "configs/demo.json")
TINY = {**BASE, "batch_size": 2}


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PIPELINE_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=env, timeout=timeout)


def bundle_args(command: list[str], configs: list, **kw) -> list[str]:
    args = ["-m", "monai.bundle", *command, "--config_file", repr([str(ROOT / c) for c in configs])]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return args


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    """Four atlas-space phantoms at 6 mm, the tiny overlay and an untrained network's model.pt."""
    from monai.bundle import ConfigParser

    from pipeline.data.phantom.build import make_cohort

    root = tmp_path_factory.mktemp("bad_inputs")
    cohort = make_cohort(root / "cohort", cases=4, seed=0, spacing=6.0, space="atlas").datalist
    overlay = root / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs' %file macros are relative to the repository root
    try:
        parser = ConfigParser()
        parser.read_config([str(ROOT / INFER), str(ROOT / DEMO), str(overlay)])
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "model.pt")
    finally:
        os.chdir(cwd)
    return {"root": root, "cohort": cohort.parent, "overlay": overlay, "ckpt": root / "model.pt"}


def good_copy(kit: dict[str, Path], dest: Path, cid: str = "c000", what: str = "image") -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kit["cohort"] / cid / f"{what}.nii.gz", dest)
    return dest


def make_bad(kit: dict[str, Path], folder: Path, kind: str) -> tuple[Path, str]:
    build, words = IMAGE_KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    return build(folder / f"bad_{kind}.nii.gz", kit["cohort"] / "c001" / "image.nii.gz"), words


def runner(kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch, **overrides):
    from pipeline.inference.folder import runner_from_config

    monkeypatch.chdir(ROOT)
    return runner_from_config([ROOT / INFER, ROOT / DEMO, kit["overlay"]], **{"ckpt": str(kit["ckpt"]), **overrides})


def assert_complete(out: Path, cid: str, source: Path) -> None:
    """The case's outputs are all there, whole, and overlay their input."""
    seg, src = nib.load(out / cid / "seg.nii.gz"), nib.load(source)
    assert seg.shape == src.shape[:3] and np.allclose(seg.affine, src.affine)
    assert np.asarray(seg.dataobj).dtype == np.uint8
    assert json.loads((out / cid / "result.json").read_text(encoding="utf-8"))["status"] == "ok"
    assert (out / cid / "qc.png").stat().st_size > 0


# ----------------------------------------------------------------------------- validate, per kind


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_validate_names_file_and_reason(kit, tmp_path, capsys, kind):
    from pipeline.__main__ import main

    good = good_copy(kit, tmp_path / "good" / "image.nii.gz")
    good_copy(kit, tmp_path / "good" / "mask.nii.gz", what="mask")
    bad, words = make_bad(kit, tmp_path / "bad", kind)
    entries = [{"id": "good", "image": "good/image.nii.gz", "label": "good/mask.nii.gz", "class": 0},
               {"id": "bad", "image": str(bad.relative_to(tmp_path)), "class": 1}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    before = snapshot(tmp_path)
    rc = main(["validate", str(tmp_path / "datalist.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}: case 'bad': " in err and words in err, err
    assert "case 'good'" not in err and str(good) not in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def _mask_variant(kit: dict[str, Path], folder: Path, kind: str) -> Path:
    src = nib.load(kit["cohort"] / "c000" / "mask.nii.gz")
    data, affine = np.asarray(src.dataobj, dtype=np.float32), src.affine.copy()
    if kind == "mask_other_size":
        data = np.asarray(nib.load(kit["cohort"] / "c001" / "mask.nii.gz").dataobj, dtype=np.float32)[:-2]
    elif kind == "mask_spacing":
        affine[:3, :3] *= 1.5
    elif kind == "mask_negative":
        data[0, 0, 0] = -1
    elif kind == "mask_fraction":
        data[0, 0, 0] = 0.5
    elif kind == "mask_nan":
        data[0, 0, 0] = np.nan
    path = folder / f"{kind}.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


#: datalist kind -> (what the datalist holds, words the message must hold); the good case is always first
DATALIST_KINDS = {
    "mask_other_size": ("mask", "mask shape"), "mask_spacing": ("mask", "mask spacing"),
    "mask_negative": ("mask", "negative values"), "mask_fraction": ("mask", "non-integer values"),
    "mask_nan": ("mask", "NaN"), "unknown_class": ("entry", "unknown class name 'BRAF V601X'"),
    "duplicate_id": ("entry", "duplicate id 'good'"), "escaping_id": ("entry", "cannot contain '/'"),
    "missing_image": ("entry", "file not found"), "invalid_json": ("file", "not valid JSON"),
    "empty_datalist": ("file", "datalist has no cases"), "csv_without_image": ("file", "needs an 'image' column"),
}


@pytest.mark.parametrize("kind", sorted(DATALIST_KINDS))
def test_validate_datalist_catalogue(kit, tmp_path, capsys, kind):
    from pipeline.__main__ import main

    good_copy(kit, tmp_path / "good" / "image.nii.gz")
    good_copy(kit, tmp_path / "good" / "mask.nii.gz", what="mask")
    entries = [{"id": "good", "image": "good/image.nii.gz", "label": "good/mask.nii.gz", "class": 0}]
    where, words = DATALIST_KINDS[kind]
    bad_entry = {"id": "bad", "image": "good/image.nii.gz", "class": 1}
    culprit = tmp_path / "datalist.json"
    if where == "mask":
        culprit = _mask_variant(kit, tmp_path, kind)
        bad_entry["label"] = culprit.name
    elif kind == "unknown_class":
        bad_entry["class"] = "BRAF V601X"
    elif kind == "duplicate_id":
        bad_entry["id"] = "good"
    elif kind == "escaping_id":
        bad_entry["id"] = "../../etc"
    elif kind == "missing_image":
        bad_entry["image"] = "nowhere/flair.nii.gz"
        culprit = tmp_path / "nowhere" / "flair.nii.gz"
    datalist = tmp_path / ("datalist.csv" if kind == "csv_without_image" else "datalist.json")
    if kind == "invalid_json":
        datalist.write_text('{"training": [{"id": "good", "image": "good/image.nii.gz"},]}', encoding="utf-8")
    elif kind == "empty_datalist":
        datalist.write_text(json.dumps({"training": []}), encoding="utf-8")
    elif kind == "csv_without_image":
        datalist.write_text("id,class\ngood,0\n", encoding="utf-8")
        culprit = datalist
    else:
        datalist.write_text(json.dumps({"training": [*entries, bad_entry]}), encoding="utf-8")
    before = snapshot(tmp_path)
    rc = main(["validate", str(datalist)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{culprit}: " in err and words in err, err
    assert "Traceback" not in err and "case 'good': " not in err.replace("duplicate id 'good'", "")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- inference, per kind


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_inference_fails_the_bad_case_alone(kit, tmp_path, monkeypatch, kind):
    inputs, out = tmp_path / "in", tmp_path / "out"
    good = good_copy(kit, inputs / "good.nii.gz")
    bad, words = make_bad(kit, inputs, kind)
    before = snapshot(inputs)
    run, cases = runner(kit, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    rows = {r["id"]: r for r in run.run(cases)}
    bad_id = bad.name.split(".nii")[0]
    assert set(rows) == {"good", bad_id}, "every entry is a case or a failed row"
    assert rows["good"]["status"] == "ok"
    assert_complete(out, "good", good)
    assert rows[bad_id]["status"].startswith("failed: ") and words in rows[bad_id]["status"], rows[bad_id]
    assert rows[bad_id]["input"] == str(bad)
    assert not (out / bad_id).exists() or not any((out / bad_id).iterdir())
    assert snapshot(inputs) == before


def test_folder_level_problems(kit, tmp_path, monkeypatch):
    """Two inputs with one id, a DICOM folder with two series, a sub-folder where nothing matches,
    a dangling sub-folder link, other files: failed rows or logged, and the good cases (under a
    path with a space and non-ASCII letters) run."""
    inputs, out = tmp_path / "scans ü", tmp_path / "out"
    good_copy(kit, inputs / "Ångström case.nii.gz")
    good_copy(kit, inputs / "per case" / "t2_flair.nii.gz", cid="c002")
    good_copy(kit, inputs / "twin.nii.gz")
    data = nib.load(inputs / "twin.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(data.dataobj), data.affine), inputs / "twin.nii")
    image = sitk.ReadImage(str(kit["cohort"] / "c003" / "image.nii.gz"))
    write_dicom_series(image, inputs / "two_series", number=1)
    write_dicom_series(image, inputs / "two_series", number=2)
    (inputs / "nothing here").mkdir()
    (inputs / "nothing here" / "notes.txt").write_text("no scan", encoding="utf-8")
    os.symlink("gone_folder", inputs / "gone")
    (inputs / "README.txt").write_text("scans of the week", encoding="utf-8")
    before = snapshot(inputs)
    run, cases = runner(kit, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    rows = run.run(cases)
    by = {(r["id"], Path(r["input"]).name): r["status"] for r in rows}
    assert by[("Ångström case", "Ångström case.nii.gz")] == "ok"
    assert by[("per case", "t2_flair.nii.gz")] == "ok"
    assert "is also given by twin.nii" in by[("twin", "twin.nii.gz")]
    assert "is also given by twin.nii.gz" in by[("twin", "twin.nii")]
    assert "2 DICOM series" in by[("two_series", "two_series")]
    assert "matches the file pattern" in by[("nothing here", "nothing here")]
    assert "dangling symbolic link" in by[("gone", "gone")]
    assert len(rows) == 7 and not (out / "twin").exists()
    assert_complete(out, "Ångström case", inputs / "Ångström case.nii.gz")
    assert snapshot(inputs) == before


def test_non_utf8_file_name_fails_alone(kit, tmp_path, monkeypatch, caplog):
    """SimpleITK aborts the whole process (C++ std::logic_error) on a path that is not UTF-8."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    good = good_copy(kit, inputs / "good.nii.gz")
    odd = Path(os.fsdecode(os.fsencode(inputs) + b"/scan\xff.nii.gz"))
    good_copy(kit, odd, cid="c001")
    run, cases = runner(kit, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    rows = {r["id"]: r for r in run.run(cases)}
    assert rows["good"]["status"] == "ok"
    assert_complete(out, "good", good)
    assert "the path is not valid UTF-8" in rows["scan\udcff"]["status"]
    assert "scan\\udcff" in (out / "predictions.csv").read_text(encoding="utf-8")
    # the progress line names it with an escape: a raw surrogate would make a UTF-8 terminal's
    # encoder raise (logging then prints its own traceback)
    assert "[2/2] scan\\udcff: failed" in caplog.text
    caplog.text.encode("utf-8")


class RewritingNetwork(torch.nn.Module):
    """Rewrites (touches) the input file while the network runs: a scan still being copied."""

    def __init__(self, net: torch.nn.Module, path: Path) -> None:
        super().__init__()
        self.net, self.path = net, path

    def forward(self, x: torch.Tensor):
        self.path.write_bytes(self.path.read_bytes())
        os.utime(self.path, ns=(time.time_ns(), time.time_ns() + 10**9))
        return self.net(x)


def test_file_changed_while_processed_is_redone(kit, tmp_path, monkeypatch):
    inputs, out = tmp_path / "in", tmp_path / "out"
    scan = good_copy(kit, inputs / "moving.nii.gz")
    run, cases = runner(kit, monkeypatch, input_dir=str(inputs), output_dir=str(out))
    plain = run.network
    run.network = RewritingNetwork(plain, scan)
    [row] = run.run(cases)
    assert row["status"].startswith("failed: the file changed while it was processed"), row
    assert not (out / "moving").exists() or not any((out / "moving").iterdir())
    run.network = plain
    [row] = run.run(cases)
    assert row["status"] == "ok" and not row["reused"]
    assert_complete(out, "moving", scan)


def test_a_dicom_series_folder_is_one_case(kit, tmp_path):
    from pipeline.inference.cases import find_cases

    image = sitk.ReadImage(str(kit["cohort"] / "c003" / "image.nii.gz"))
    series = write_dicom_series(image, tmp_path / "MR_FLAIR")
    [case] = find_cases(series)
    assert case.id == "MR_FLAIR" and case.path == series and case.problem is None


def test_empty_and_missing_folders(kit, tmp_path):
    from pipeline.inference.cases import find_cases

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input volumes found"):
        find_cases(tmp_path / "empty")
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(InputError, match="symbolic link loop"):
        find_cases(tmp_path / "loop")
    done = run_cli(bundle_args(["run"], [INFER, DEMO, kit["overlay"]], input_dir=tmp_path / "nowhere",
                               output_dir=tmp_path / "out", ckpt=kit["ckpt"]))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'nowhere'}: input folder not found" in done.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the CLI, whole catalogue


def test_cli_runs_the_whole_catalogue(kit, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    good_copy(kit, inputs / "good.nii.gz")
    expected = {}
    for kind in IMAGE_KINDS:
        bad, words = make_bad(kit, inputs, kind)
        expected[bad.name.split(".nii")[0]] = words
    before = snapshot(inputs)
    done = run_cli(bundle_args(["run"], [INFER, DEMO, kit["overlay"]], input_dir=inputs, output_dir=out,
                               ckpt=kit["ckpt"]))
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "Traceback" not in log
    assert f"1 of {len(expected) + 1} case(s) ok" in done.stderr
    for cid, words in expected.items():
        line = next(ln for ln in log.splitlines() if f"] {cid}: failed: " in ln)
        assert words in line, line
    report = json.loads((out / "predictions.json").read_text(encoding="utf-8"))["cases"]
    assert {r["id"] for r in report} == {"good", *expected}
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["good"]
    assert snapshot(inputs) == before


# ----------------------------------------------------------------------------- training and permissions


def test_training_refuses_a_bad_datalist_before_it_starts(kit, tmp_path):
    entries = [{"id": c, "image": str(kit["cohort"] / c / "image.nii.gz"), "label": str(kit["cohort"] / c / "mask.nii.gz"),
                "class": i % 3} for i, c in enumerate(("c000", "c001", "c002"))]
    bad = {}
    for kind in ("symlink_loop", "degenerate_affine", "rgb", "huge_header"):
        path, words = make_bad(kit, tmp_path / "bad", kind)
        entries.append({"id": kind, "image": str(path), "class": 0})
        bad[kind] = (path, words)
    os.symlink("nowhere.nii.gz", tmp_path / "bad" / "mask_link.nii.gz")
    entries[0]["label"] = str(tmp_path / "bad" / "mask_link.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    done = run_cli(bundle_args(["run", "training"], [TRAIN, DEMO, kit["overlay"]],
                               datalist=tmp_path / "datalist.json", output_dir=tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "5 problem(s)" in done.stderr
    for kind, (path, words) in bad.items():
        assert any(str(path) in ln and words in ln for ln in done.stderr.splitlines()), (kind, done.stderr)
    assert "mask_link.nii.gz: case 'c000': mask: dangling symbolic link" in done.stderr
    assert not (tmp_path / "run" / "models").exists()


def test_unreadable_file_is_permission_denied(kit, tmp_path):
    """The reason is the permission, not 'corrupt'. Root reads anything, so as root the check runs
    as user nobody: the process imports what it needs, then drops its privileges."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="unreadable_"))  # outside pytest's 0700 temp root
    try:
        work.chmod(0o755)
        good = good_copy(kit, work / "a" / "image.nii.gz")
        locked = good_copy(kit, work / "b" / "image.nii.gz", cid="c001")
        entries = [{"id": "a", "image": str(good), "class": 0}, {"id": "b", "image": str(locked), "class": 1}]
        (work / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
        for p in (work / "a", work / "b"):
            p.chmod(0o755)
        good.chmod(0o644)
        locked.chmod(0)
        drop = "os.setgid(65534); os.setuid(65534); " if os.geteuid() == 0 else ""
        code = ("import gzip, os, sys, zlib; import numpy, nibabel, SimpleITK; "
                "from nibabel.filebasedimages import ImageFileError; import pipeline.io.filecheck, pipeline.io.imageio, pipeline.data.datalist; "
                "from pipeline.__main__ import main; " + drop + "sys.exit(main(['validate', sys.argv[1]]))")
        done = run_cli(["-c", code, str(work / "datalist.json")])
        assert done.returncode == 2, done.stderr
        assert f"{locked}: case 'b': permission denied" in done.stderr and "Traceback" not in done.stderr
        assert "case 'a'" not in done.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_kinds(kit: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    real = kit["ckpt"].read_bytes()
    out = {"text": folder / "notes.pt", "truncated": folder / "truncated.pt", "foreign_pickle": folder / "foreign.pt",
           "other_model": folder / "other.pt", "tensor_alone": folder / "tensor.pt", "no_weights": folder / "meta.pt"}
    out["text"].write_text("not a checkpoint", encoding="utf-8")
    out["truncated"].write_bytes(real[: len(real) // 2])
    torch.save({"network": torch.nn.Linear(2, 2)}, out["foreign_pickle"])  # a pickled module, not weights
    torch.save(torch.nn.Linear(3, 4).state_dict(), out["other_model"])
    torch.save(torch.zeros(3), out["tensor_alone"])
    torch.save({"epoch": 3, "note": "x"}, out["no_weights"])
    return out


def test_checkpoint_catalogue(kit, tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    from pipeline.models.weights import load_network

    monkeypatch.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config([str(ROOT / INFER), str(ROOT / DEMO), str(kit["overlay"])])
    net = parser.get_parsed_content("network_def")
    for kind, path in _checkpoint_kinds(kit, tmp_path).items():
        with pytest.raises(InputError) as err:
            load_network(net, path)
        assert err.value.path == str(path)
        assert "is not a checkpoint of this bundle" in err.value.problem, (kind, err.value.problem)
        assert "weights_only" not in err.value.problem
    assert load_network(net, kit["ckpt"]) is net  # the real one still loads


def test_cli_foreign_checkpoint_in_one_line(kit, tmp_path):
    ckpts = _checkpoint_kinds(kit, tmp_path / "ckpt")
    good_copy(kit, tmp_path / "in" / "good.nii.gz")
    done = run_cli(bundle_args(["run"], [INFER, DEMO, kit["overlay"]], input_dir=tmp_path / "in",
                               output_dir=tmp_path / "out", ckpt=ckpts["foreign_pickle"]))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{ckpts['foreign_pickle']}: is not a checkpoint of this bundle" in done.stderr
    split = tmp_path / "split.json"
    ids = ["c000", "c001", "c002", "c003"]
    split.write_text(json.dumps({"splits": [{"name": "r0", "train": ids[:2], "val": ids[2:3], "test": ids[3:]}]}), encoding="utf-8")
    done = run_cli(bundle_args(["run"], [TRAIN, EVALUATE, DEMO, kit["overlay"]], datalist=kit["cohort"] / "datalist.json",
                               split_file=split, output_dir=tmp_path / "eval", ckpt=ckpts["truncated"]))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{ckpts['truncated']}: is not a checkpoint of this bundle" in done.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ----------------------------------------------------------------------------- kill safety


def test_kill_while_writing_then_rerun_completes(kit, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for k in range(4):
        good_copy(kit, inputs / f"case{k}.nii.gz", cid=f"c00{k}")
    args = bundle_args(["run"], [INFER, DEMO, kit["overlay"]], input_dir=inputs, output_dir=out, ckpt=kit["ckpt"],
                       write_prob=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:  # kill as soon as a temporary output file is seen (mid-write), or after the first finished case
        while time.time() < deadline and proc.poll() is None:
            if any(out.glob("*/.*")) or len(list(out.glob("*/result.json"))) >= 2:
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "inference finished before it could be killed"
    finished = {p.parent.name for p in out.glob("*/result.json")}
    for seg in out.glob("*/seg.nii.gz"):  # whatever a killed run left is whole (atomic writes)
        assert np.asarray(nib.load(seg).dataobj).shape == nib.load(inputs / f"{seg.parent.name}.nii.gz").shape
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["id"]: r for r in json.loads((out / "predictions.json").read_text(encoding="utf-8"))["cases"]}
    assert set(rows) == {f"case{k}" for k in range(4)} and all(r["status"] == "ok" for r in rows.values())
    assert {cid for cid, r in rows.items() if r["reused"]} == finished
    for k in range(4):
        assert_complete(out, f"case{k}", inputs / f"case{k}.nii.gz")
        assert nib.load(out / f"case{k}" / "prob.nii.gz").get_fdata().max() <= 1.0
    assert not [p for p in out.rglob(".*") if ".cache" not in p.parts and p.name != ".lock"], "temporary files left behind"


def test_debug_adds_the_traceback(tmp_path):
    (tmp_path / "datalist.json").write_text("{not json", encoding="utf-8")
    quiet = run_cli(["-m", "pipeline", "validate", str(tmp_path / "datalist.json")])
    loud = run_cli(["-m", "pipeline", "--debug", "validate", str(tmp_path / "datalist.json")])
    for done in (quiet, loud):
        assert done.returncode == 2 and f"{tmp_path / 'datalist.json'}: not valid JSON" in done.stderr
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr


def test_score_refuses_a_report_of_other_cases(kit, tmp_path):
    from pipeline.evaluation.score import score_predictions

    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "predictions.csv").write_text("id,input,status\nzz1,/x/zz1.nii.gz,ok\n", encoding="utf-8")
    with pytest.raises(InputError, match="none of the 4 datalist case id"):
        score_predictions(tmp_path / "pred", kit["cohort"] / "datalist.json")


@pytest.mark.parametrize(("option", "value", "words"), [
    ("mtl_method", "bogus", "mtl_method must be one of fixed, uncertainty, pcgrad, stop, gradnorm, got 'bogus'"),
    ("det_levels", "[5]", "det_levels must name encoder levels 0..3, got [5]"),
])
def test_a_bad_option_value_ends_in_one_line(kit, tmp_path, option, value, words):
    from pipeline.data.phantom.build import make_cohort

    datalist = make_cohort(tmp_path / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    overlays = [TRAIN, DEMO, kit["overlay"], *(["configs/detect.json"] if option.startswith("det_") else [])]
    done = run_cli(bundle_args(["run", "training"], overlays, datalist=datalist, output_dir=tmp_path / "run",
                               **{option: value}))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and f"error: {words}" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "run" / "models").exists()
