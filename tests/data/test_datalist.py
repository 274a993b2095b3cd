"""Datalist reading and validation: every problem reported at once, naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.data.datalist import class_weights, load_datalist, to_monai_dicts, validate_datalist
from pipeline.io.errors import InputError, InputErrors
from tests.conftest import blob_case, write_volume


def _write(tmp_path: Path, entries: list, classes=("BRAF V600E", "BRAF fusion", "other")) -> Path:
    p = tmp_path / "datalist.json"
    p.write_text(json.dumps({"classes": list(classes), "training": entries}), encoding="utf-8")
    return p


def test_reads_json_with_optional_label_and_class(tiny_cohort):
    data = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    data["training"][0].pop("label")
    data["training"][1].pop("class")
    data["training"][2]["class"] = "braf FUSION"  # names are case-insensitive
    tiny_cohort.write_text(json.dumps(data), encoding="utf-8")
    dl = load_datalist(tiny_cohort)
    assert len(dl.cases) == 12
    assert dl.cases[0].label is None and dl.cases[1].cls is None and dl.cases[2].cls == 1
    assert dl.cases[3].image == (tiny_cohort.parent / "c003/image.nii.gz").resolve()
    items = to_monai_dicts(dl.cases)
    assert items[0]["has_label"] == 0 and "label" not in items[0]
    assert items[1]["class"] == -1 and items[1]["has_class"] == 0


def test_reads_csv(tiny_cohort):
    csv = tiny_cohort.parent / "datalist.csv"
    csv.write_text("id,image,label,class\nc000,c000/image.nii.gz,c000/mask.nii.gz,other\nc001,c001/image.nii.gz,,\n", encoding="utf-8")
    dl = load_datalist(csv)
    assert [c.id for c in dl.cases] == ["c000", "c001"]
    assert dl.cases[0].cls == 2 and dl.cases[1].label is None and dl.cases[1].cls is None


def test_all_entry_problems_reported_together(tiny_cohort):
    data = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    data["training"][0]["image"] = "nope/missing.nii.gz"
    data["training"][1]["class"] = "BRAF V601X"
    data["training"][2]["class"] = 7
    data["training"][3]["id"] = "c004"  # duplicate of the next case
    tiny_cohort.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputErrors) as err:
        load_datalist(tiny_cohort)
    msg = str(err.value)
    assert len(err.value.errors) == 4
    assert "missing.nii.gz" in msg and "image file not found" in msg
    assert "unknown class name 'BRAF V601X'" in msg
    assert "class index 7 out of range" in msg
    assert "duplicate id 'c004'" in msg


def test_missing_datalist_file(tmp_path):
    with pytest.raises(InputError, match="datalist not found"):
        load_datalist(tmp_path / "none.json")


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("nan", "NaN"),
        ("2d", "2-D"),
        ("corrupt", "corrupt or truncated gzip"),
        ("mask_shape", "mask shape"),
        ("mask_negative", "negative"),
        ("mask_fraction", "non-integer"),
        ("mask_nan", "NaN"),
    ],
)
def test_content_problems_name_the_file(tmp_path, problem, expected):
    rng = np.random.default_rng(1)
    img, mask = blob_case(rng, (20, 20, 20))
    img_path, mask_path = tmp_path / "a" / "image.nii.gz", tmp_path / "a" / "mask.nii.gz"
    if problem == "nan":
        img[3, 3, 3] = np.nan
    write_volume(img_path, img[:, :, :1] if problem == "2d" else img)
    if problem == "corrupt":
        img_path.write_bytes(b"\x1f\x8b this is not a nifti")
    m = mask.astype(np.float32)
    if problem == "mask_shape":
        m = m[:-2]
    elif problem == "mask_negative":
        m[0, 0, 0] = -1
    elif problem == "mask_fraction":
        m[0, 0, 0] = 0.5
    elif problem == "mask_nan":
        m[0, 0, 0] = np.nan
    write_volume(mask_path, m)
    dl = load_datalist(_write(tmp_path, [{"id": "a", "image": "a/image.nii.gz", "label": "a/mask.nii.gz", "class": 0}]))
    with pytest.raises(InputErrors) as err:
        validate_datalist(dl)
    msg = str(err.value)
    assert expected in msg
    bad = mask_path if problem.startswith("mask") else img_path
    assert str(bad.resolve()) in msg and "case 'a'" in msg


def test_multilabel_masks_are_fine(tmp_path):
    rng = np.random.default_rng(2)
    img, mask = blob_case(rng, (20, 20, 20))
    write_volume(tmp_path / "b/image.nii.gz", img)
    write_volume(tmp_path / "b/mask.nii.gz", (mask * 4).astype(np.uint8))  # BraTS-style label 4
    dl = load_datalist(_write(tmp_path, [{"id": "b", "image": "b/image.nii.gz", "label": "b/mask.nii.gz"}]))
    validate_datalist(dl)


def test_class_weights_inverse_frequency(tiny_cohort):
    dl = load_datalist(tiny_cohort)
    cases = [c for c in dl.cases if c.cls != 2] + [c for c in dl.cases if c.cls == 2][:1]  # 4, 4, 1
    w = class_weights(cases, 3)
    assert w[2] == pytest.approx(4 * w[0]) and w[0] == pytest.approx(w[1])
    assert np.mean(w) == pytest.approx(1.0)


def test_float_class_indices_and_unsafe_ids(tiny_cohort):
    csv = tiny_cohort.parent / "datalist.csv"
    csv.write_text("id,image,class\nc000,c000/image.nii.gz,1.0\nc001,c001/image.nii.gz,\n", encoding="utf-8")  # as pandas writes
    assert [c.cls for c in load_datalist(csv).cases] == [1, None]
    csv.write_text("id,image,class\nc000,c000/image.nii.gz,1.5\n../evil,c001/image.nii.gz,0\n", encoding="utf-8")
    with pytest.raises(InputErrors) as err:
        load_datalist(csv)
    msg = str(err.value)
    assert "unknown class name '1.5'" in msg and "case '../evil'" in msg and "cannot contain '/'" in msg


def test_classes_matched_to_the_model_by_name(tiny_cohort):
    data = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    data["classes"] = ["other", "BRAF V600E", "BRAF fusion"]  # another order
    data["training"][0]["class"] = "other"
    data["training"][1]["class"] = 2
    tiny_cohort.write_text(json.dumps(data), encoding="utf-8")
    dl = load_datalist(tiny_cohort).with_classes(["BRAF V600E", "BRAF fusion", "other"])
    assert dl.classes == ("BRAF V600E", "BRAF fusion", "other")
    assert dl.cases[0].cls == 2 and dl.cases[1].cls == 1  # 'other' and 'BRAF fusion' in the model's order
    with pytest.raises(InputError, match=r"classes \['other'\] of the datalist are not among"):
        load_datalist(tiny_cohort).with_classes(["BRAF V600E", "BRAF fusion"])


def test_check_cache_skips_only_unchanged_cases(tiny_cohort, tmp_path):
    """A case that passed is not opened again while its bytes are unchanged; a changed file is
    checked again (and its new problem found); failures are never remembered."""
    cache = tmp_path / "checked"
    dl = load_datalist(tiny_cohort, check_contents=True, check_cache=cache)
    assert len(list(cache.iterdir())) == len(dl.cases)
    case = dl.cases[0]
    img = sitk.ReadImage(str(case.image))
    arr = sitk.GetArrayFromImage(img)
    arr[1, 2, 3] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(case.image))
    for _ in range(2):
        with pytest.raises(InputErrors, match="NaN or infinite") as err:
            load_datalist(tiny_cohort, check_contents=True, check_cache=cache)
        assert str(case.image) in str(err.value) and len(err.value.errors) == 1
    assert len(list(cache.iterdir())) == len(dl.cases)  # the failure was not remembered
    # the same (passed) bytes under another name are checked again: gzip data named .nii is refused
    other = dl.cases[1]
    renamed = other.image.with_name("image.nii")
    renamed.write_bytes(other.image.read_bytes())
    entries = [{"id": "x", "image": str(renamed)}]
    (tmp_path / "renamed.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    with pytest.raises(InputErrors, match="gzip-compressed data named .nii"):
        load_datalist(tmp_path / "renamed.json", check_contents=True, check_cache=cache)


def test_fast_content_check_agrees_with_the_readers(tmp_path):
    """check_volume_file / check_mask_file (one nibabel read) give the readers' verdicts."""
    from pipeline.data.validation import check_mask_file, check_volume_file
    from pipeline.io.imageio import read_mask, read_volume

    rng = np.random.default_rng(3)
    img, mask = blob_case(rng, (20, 20, 20))
    variants = {"ok": (img, mask), "negative_pixdim": (img, mask),
                "nan": (np.where(mask > 0, np.nan, img).astype(np.float32), mask),
                "constant": (np.full_like(img, 3.0), mask), "mask_values": (img, mask * 0.5)}
    for name, (im, ma) in variants.items():
        ip, mp = write_volume(tmp_path / name / "i.nii.gz", im), write_volume(tmp_path / name / "m.nii.gz", ma)
        if name == "negative_pixdim":  # a flip written as a negative voxel size (seen in the wild)
            for f in (ip, mp):
                raw = bytearray(gzip.decompress(f.read_bytes()))
                raw[80:84] = np.float32(-1.0).tobytes()  # pixdim[1]
                f.write_bytes(gzip.compress(bytes(raw)))
        verdicts = []
        for image_check, mask_check in ((check_volume_file, check_mask_file), (read_volume, read_mask)):
            try:
                ref = image_check(ip)
                mask_check(mp, ref, ip)
                verdicts.append("ok")
            except InputError as exc:
                verdicts.append(exc.problem)
        assert verdicts[0] == verdicts[1], (name, verdicts)
        assert (verdicts[0] == "ok") == (name in ("ok", "negative_pixdim")), (name, verdicts)


# ----------------------------------------------------------------------------- several sequences


def _two_sequence_case(folder: Path, rng: np.random.Generator, t2_spacing=(1.0, 1.0, 1.0)) -> None:
    img, mask = blob_case(rng)
    write_volume(folder / "flair.nii.gz", img)
    write_volume(folder / "t2.nii.gz", 2.0 * img + 10.0, spacing=t2_spacing)
    write_volume(folder / "mask.nii.gz", mask)


@pytest.mark.parametrize("form", ["list", "named", "csv"])
def test_three_forms_of_several_sequences(tmp_path, form):
    rng = np.random.default_rng(1)
    for cid in ("a", "b"):
        _two_sequence_case(tmp_path / cid, rng)
    if form == "csv":
        path = tmp_path / "datalist.csv"
        path.write_text("id,flair,t2,label,class\n" + "".join(
            f"{c},{c}/flair.nii.gz,{c}/t2.nii.gz,{c}/mask.nii.gz,1\n" for c in ("a", "b")), encoding="utf-8")
    else:
        rows = [{"id": c, **({"image": [f"{c}/flair.nii.gz", f"{c}/t2.nii.gz"]} if form == "list" else
                            {"flair": f"{c}/flair.nii.gz", "t2": f"{c}/t2.nii.gz"}),
                 "label": f"{c}/mask.nii.gz", "class": 1} for c in ("a", "b")]
        path = tmp_path / "datalist.json"
        path.write_text(json.dumps({"sequences": ["flair", "t2"], "training": rows}), encoding="utf-8")
    dl = load_datalist(path, check_contents=True)
    assert dl.sequences == ("flair", "t2")
    assert [p.name for p in dl.cases[1].paths] == ["flair.nii.gz", "t2.nii.gz"]
    assert dl.cases[1].image.name == "flair.nii.gz" and dl.cases[1].extra == {}
    item = to_monai_dicts(dl.cases)[0]
    assert [Path(p).name for p in item["image"]] == ["flair.nii.gz", "t2.nii.gz"]
    # the model's sequences, in the model's order; a one-sequence model takes just one
    swapped = dl.select(["T2", "flair"])
    assert [p.name for p in swapped.cases[0].paths] == ["t2.nii.gz", "flair.nii.gz"]
    assert to_monai_dicts(dl.select(["t2"]).cases)[0]["image"].endswith("t2.nii.gz")
    # a model of one unnamed image (trained on a FLAIR-only datalist) takes the FLAIR
    assert to_monai_dicts(dl.select(["image"]).cases)[0]["image"].endswith("flair.nii.gz")
    with pytest.raises(InputError, match=r"takes the sequences \['flair', 't1ce'\].*missing \['t1ce'\]"):
        dl.select(["flair", "t1ce"])


def test_unnamed_sequence_list_is_taken_by_position(tmp_path):
    rng = np.random.default_rng(2)
    _two_sequence_case(tmp_path / "a", rng)
    path = _write(tmp_path, [{"id": "a", "image": ["a/flair.nii.gz", "a/t2.nii.gz"]}])
    dl = load_datalist(path)
    assert dl.sequences == ("image1", "image2")
    assert dl.select(["flair", "t2"]).sequences == ("flair", "t2")
    with pytest.raises(InputError, match="takes the sequences"):
        dl.select(["flair", "t2", "t1"])


def test_sequence_problems_are_named_with_case_and_file(tmp_path):
    rng = np.random.default_rng(3)
    for cid in ("a", "b", "c", "d"):
        _two_sequence_case(tmp_path / cid, rng, t2_spacing=(1.0, 1.0, 2.0) if cid == "d" else (1.0, 1.0, 1.0))
    (tmp_path / "b" / "t2.nii.gz").unlink()
    rows = [{"id": "a", "flair": "a/flair.nii.gz"},  # no t2 key
            {"id": "b", "flair": "b/flair.nii.gz", "t2": "b/t2.nii.gz"},  # t2 file missing
            {"id": "c", "image": ["c/flair.nii.gz"]},  # one image, two sequences declared
            {"id": "d", "flair": "d/flair.nii.gz", "t2": "d/t2.nii.gz", "label": "d/mask.nii.gz"}]  # other grid
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"sequences": ["flair", "t2"], "training": rows}), encoding="utf-8")
    with pytest.raises(InputErrors) as err:
        load_datalist(path, check_contents=True)
    text = str(err.value)
    assert "case 'a': no 't2' sequence" in text
    assert "case 'b': sequence 't2'" in text and "b/t2.nii.gz" in text
    assert "case 'c': 1 images but the datalist's 'sequences' names 2" in text
    assert "case 'd': sequence 't2' spacing" in text and "share one grid" in text
    # without a content check the missing file is still named, per sequence
    with pytest.raises(InputErrors, match=r"case 'b': sequence 't2' file not found"):
        load_datalist(path)


def test_every_case_needs_the_same_number_of_sequences(tmp_path):
    rng = np.random.default_rng(4)
    for cid in ("a", "b"):
        _two_sequence_case(tmp_path / cid, rng)
    path = _write(tmp_path, [{"id": "a", "image": ["a/flair.nii.gz", "a/t2.nii.gz"]},
                             {"id": "b", "image": "b/flair.nii.gz"}])
    with pytest.raises(InputErrors, match=r"case 'b': 1 sequence\(s\), but case 'a' has 2"):
        load_datalist(path)


@pytest.mark.parametrize("bad", [[], "flair", ["flair", "FLAIR"], ["flair", "label"]])
def test_bad_sequences_declaration(tmp_path, bad):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"sequences": bad, "training": [{"id": "a", "image": "a.nii.gz"}]}), encoding="utf-8")
    with pytest.raises(InputError, match="'sequences'"):
        load_datalist(path, check_files=False)


def test_model_sequences_and_reference(tmp_path):
    from pipeline.data.datalist import model_sequences, reference_index

    rng = np.random.default_rng(5)
    _two_sequence_case(tmp_path / "a", rng)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"sequences": ["t2", "flair"], "training": [{"id": "a", "image": [
        "a/t2.nii.gz", "a/flair.nii.gz"]}]}), encoding="utf-8")
    assert model_sequences(path) == ["t2", "flair"]
    assert model_sequences(path, ["flair"]) == ["flair"]
    assert model_sequences(None) == ["image"]
    with pytest.raises(InputError, match="non-empty list"):
        model_sequences(path, "flair")
    assert reference_index(["t2", "flair"]) == 1  # flair by default
    assert reference_index(["t1", "t2"]) == 0 and reference_index(["t1", "t2"], "T2") == 1
    with pytest.raises(InputError, match="not among the sequences"):
        reference_index(["t1", "t2"], "flair")


def test_dataset_dir_is_the_datalist_folder(tmp_path):
    from pipeline.data.datalist import dataset_dir

    assert dataset_dir(tmp_path / "sub" / "datalist.json") == str(tmp_path / "sub")
    assert dataset_dir(None) is None and dataset_dir("") is None
