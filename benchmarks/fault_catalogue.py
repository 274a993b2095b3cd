"""The machine failing under every command, produced for real, in one markdown table.

Faults: a full disk (a tmpfs with about half the space the command writes left free), a read-only
output folder (the tmpfs remounted ``ro``), a registration / dataset cache entry or a datalist-check
memo entry with bytes flipped or cut, and a second process on the same output folder or cache.
Commands: training, evaluation, folder inference, ``python -m pipeline prepare`` and the experiment
runner, on an 8-case phantom cohort at 6 mm with the tests' tiny overlay (``tests/helpers.py``).

Each row: the fault, the command, the line it printed (``error: ...`` or the cache warning), its
exit status, whether its inputs are unchanged (SHA-256 of every input file before and after) and
whether every output file is whole (no temporary left; each JSON, CSV, NIfTI, PNG, checkpoint,
transform and cache entry reads back).

Needs root (``mount``); run from the repository root:
    python benchmarks/fault_catalogue.py [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import CONFIGS, DEMO, INFER, TINY, TRAIN  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
LOCKS = {".lock", ".cache.lock"}
ROWS: list[dict[str, str]] = []


# ----------------------------------------------------------------------------- running


def bundle_cmd(configs: list[str | Path], **kw: object) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr([str(ROOT / c) for c in configs])]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def run(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace", env=ENV, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w", encoding="utf-8"), stderr=subprocess.STDOUT, env=ENV)


def said(output: str) -> str:
    """The lines a user reads: ``error: ...``, the cache warnings, a traceback's last line."""
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ") or " is corrupt (" in ln]
    if "Traceback" in output:
        lines.append("TRACEBACK: " + [ln for ln in output.splitlines() if ln.strip()][-1])
    return "<br>".join(ln.split(" - WARNING - ")[-1] for ln in lines) or "(nothing)"


# ----------------------------------------------------------------------------- disks


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def leave_free(disk: Path, free: int) -> None:
    """Fill ``disk`` so that about ``free`` bytes stay free."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - free))


def remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def written_bytes(folder: Path, before: dict[str, str] | None = None) -> int:
    """Bytes (in 4 KiB pages, as tmpfs counts them) of the files under ``folder`` not in ``before``."""
    before = before or {}
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*")
               if p.is_file() and str(p) not in before)


# ----------------------------------------------------------------------------- checks


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders if f.exists()
            for p in sorted(f.rglob("*")) if p.is_file() and p.name not in LOCKS}


def _whole_file(p: Path) -> bool:
    name = p.name
    try:
        if name.endswith(".json"):
            json.loads(p.read_text(encoding="utf-8"))
        elif name.endswith(".csv"):
            list(csv.reader(p.open(encoding="utf-8")))
        elif name.endswith(".gz"):
            gzip.decompress(p.read_bytes())
        elif name.endswith(".png"):
            from PIL import Image

            Image.open(p).verify()
        elif name.endswith(".sha256"):
            target = p.with_name(name[: -len(".sha256")])
            return p.read_text(encoding="utf-8").strip() == hashlib.sha256(target.read_bytes()).hexdigest()
        elif name.endswith(".tfm"):
            import SimpleITK as sitk

            sitk.ReadTransform(str(p))
        elif name.endswith(".pt") and p.parent.name == "persistent":
            from pipeline.data.feed import TRAILER

            data = p.read_bytes()
            body, end = data[: -32 - len(TRAILER)], data[-32 - len(TRAILER):]
            return end == TRAILER + hashlib.sha256(body).digest()
        elif name.endswith(".pt"):
            import torch

            torch.load(p, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - anything that does not read back is not whole
        return False
    return True


def whole(*folders: Path) -> str:
    bad = [p for f in folders if f.exists() for p in f.rglob("*") if p.is_file() and p.name != "filler"
           and ((p.name.startswith(".") and p.name not in LOCKS) or not _whole_file(p))]
    return "yes" if not bad else "no: " + ", ".join(str(p) for p in bad[:3])


def record(fault: str, command: str, rc: int, output: str, inputs_before: dict, inputs_after: dict,
           outputs: str, note: str = "") -> None:
    ROWS.append({"fault": fault, "command": command, "printed": said(output) + (f" ({note})" if note else ""),
                 "exit": str(rc), "inputs intact": "yes" if inputs_before == inputs_after else "NO",
                 "outputs whole": outputs})
    print(f"[catalogue] {fault} / {command}: exit {rc}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the catalogue


def catalogue(work: Path) -> None:
    from pipeline.data.phantom.build import make_cohort

    cohort = make_cohort(work / "cohort", cases=8, seed=0, spacing=6.0, space="atlas").datalist
    tiny = work / "tiny.json"
    tiny.write_text(json.dumps(TINY), encoding="utf-8")
    doc = json.loads(Path(cohort).read_text(encoding="utf-8"))
    three = work / "cohort" / "three.json"  # prepare registers: 3 cases keep it short
    three.write_text(json.dumps({**doc, "training": doc["training"][:3]}), encoding="utf-8")
    many = work / "cohort" / "many.json"  # a folder inference long enough for a second one to meet it
    many.write_text(json.dumps({**doc, "training": [{**e, "id": f"{e['id']}_{k}"} for k in range(4)
                                                    for e in doc["training"]]}), encoding="utf-8")
    inputs = [work / "cohort"]

    def train(out: Path, epochs: int = 2) -> list[str]:
        return bundle_cmd([TRAIN, DEMO, tiny], datalist=cohort, output_dir=out, epochs=epochs)

    def evaluate(out: Path) -> list[str]:
        return bundle_cmd([TRAIN, f"{CONFIGS}/evaluate.json", DEMO, tiny], datalist=cohort, output_dir=out)

    def infer(out: Path, datalist: Path = cohort, **kw: object) -> list[str]:
        return bundle_cmd([INFER, DEMO, tiny], datalist=datalist, output_dir=out,
                          ckpt=work / "base" / "models" / "model.pt", **kw)

    def prepare(out: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline", "prepare", "--datalist", str(three), "--out", str(out),
                "--spacing", "6", "--skull-strip", "morphology"]

    def experiment(out: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline", "experiment", "--datalist", str(cohort), "--out", str(out),
                "--repeats", "1", "--epochs", "1", "--arms", "mtl", "--overlays", DEMO, str(tiny)]

    rc, out = run(train(work / "base", epochs=2))
    assert rc == 0, out[-3000:]
    rc, out = run(evaluate(work / "base"))
    assert rc == 0, out[-3000:]
    base_models = work / "base" / "models"

    # --- full disk and read-only folder, every command ---------------------------------------------
    commands = {"training": (train, None), "evaluation": (evaluate, "base"), "folder inference": (infer, None),
                "prepare": (prepare, None), "experiment runner": (experiment, None)}
    for name, (make, seed_from) in commands.items():
        # how much the command writes, on an ordinary disk
        out_dir = work / f"sizing_{name.replace(' ', '_')}"
        if seed_from:
            shutil.copytree(work / seed_from, out_dir)
            for p in ("metrics.json", "cases.csv", "reliability.png"):
                (out_dir / p).unlink(missing_ok=True)
        before = checksums(out_dir)
        rc, out = run(make(out_dir))
        assert rc == 0, (name, out[-3000:])
        need = written_bytes(out_dir, before)
        for fault in ("full disk", "read-only folder"):
            with tmpfs(work / f"disk_{name.replace(' ', '_')}_{fault[:4]}") as disk:
                target = disk / "out"
                if seed_from:
                    shutil.copytree(work / seed_from, target)
                    for p in ("metrics.json", "cases.csv", "reliability.png"):
                        (target / p).unlink(missing_ok=True)
                own = [target / "models"] if seed_from else []
                if fault == "full disk":
                    leave_free(disk, need // 2)
                else:
                    remount(disk, "ro")
                ins = checksums(*inputs, base_models, *own)
                rc, out = run(make(target))
                record(fault, name, rc, out, ins, checksums(*inputs, base_models, *own), whole(target))
                if fault == "full disk" and name == "training":  # space freed: the same command resumes
                    (disk / "filler").unlink()
                    rc, out = run(make(target))
                    ref = json.loads((out_dir / "validation.json").read_text(encoding="utf-8"))
                    got = json.loads((target / "validation.json").read_text(encoding="utf-8"))
                    same = "same validation metrics as an uninterrupted run" if ref == got else \
                        f"validation differs: {got} vs {ref}"
                    record("full disk, space freed, run again", name, rc, out, ins,
                           checksums(*inputs, base_models), whole(target), note=f"resumed; {same}")

    # --- corrupt cache entries ---------------------------------------------------------------------
    reg = work / "reg_inference"
    first = infer(reg, already_registered=False)
    rc, out = run(first)
    assert rc == 0, out[-3000:]
    segs = checksums(*(reg.glob("c00*/seg.nii.gz")))
    tfm = sorted((reg / ".cache" / "registration").glob("*.tfm"))[0]
    text = bytearray(tfm.read_bytes())
    pos = text.index(b"Parameters: ") + 14
    text[pos] = ord("7") if text[pos] != ord("7") else ord("3")  # one digit of the transform changed
    tfm.write_bytes(bytes(text))
    image = sorted((reg / ".cache" / "registration" / "registered").glob("*.nii.gz"))[1]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # cut in half
    ins = checksums(*inputs)
    rc, out = run(first + ["--overwrite", "True"])
    same = "masks identical to the first run" if checksums(*(reg.glob("c00*/seg.nii.gz"))) == segs else "masks differ"
    record("registration cache: a transform's digit changed, a registered image cut", "folder inference", rc, out,
           ins, checksums(*inputs), whole(reg), note=same)

    for fault, damage in (("dataset cache (PersistentDataset): bytes flipped in one entry, another cut", "persistent"),
                          ("datalist check memo: one entry cut, one changed", "checked")):
        # training reads every dataset cache entry (its own and the validation's), evaluation only the test cases'
        command = "training (one more epoch)" if damage == "persistent" else "evaluation"
        run_dir = work / f"cache_{damage}"
        if damage == "persistent":  # trained in place: the entries' names hash paths inside the run folder
            rc, out = run(train(run_dir, epochs=1))
            assert rc == 0, out[-3000:]
        else:
            shutil.copytree(work / "base", run_dir)
        entries = sorted((run_dir / "cache" / damage).iterdir())
        entries = [p for p in entries if not p.name.startswith(".")]
        data = bytearray(entries[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        entries[0].write_bytes(bytes(data))
        entries[1].write_bytes(entries[1].read_bytes()[: entries[1].stat().st_size // 2])
        ins = checksums(*inputs)
        if damage == "persistent":
            rc, out = run(train(run_dir, epochs=2))
            same = "the damaged entries rewritten whole"
        else:
            rc, out = run(evaluate(run_dir))
            ref = json.loads((work / "base" / "metrics.json").read_text(encoding="utf-8"))
            got = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            same = "metrics identical to the undamaged run" if _strip(ref) == _strip(got) else "metrics differ"
        record(fault, command, rc, out, ins, checksums(*inputs), whole(run_dir), note=same)

    # --- two processes on one folder or cache ------------------------------------------------------
    for name, first_cmd, second_cmd, marker in (
            ("training", train(work / "busy_train", epochs=40), train(work / "busy_train", epochs=40), None),
            ("folder inference", infer(work / "busy_infer", datalist=many), infer(work / "busy_infer"),
             "inference on ")):
        folder = Path(first_cmd[first_cmd.index("--output_dir") + 1])
        log = work / f"{folder.name}.log"
        ins = checksums(*inputs, base_models)
        proc = start(first_cmd, log)
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (folder / ".lock").is_file() and (folder / ".lock").read_text(encoding="utf-8").strip()
                and (marker is None or marker in log.read_text(errors="replace"))):
            time.sleep(0.2)
        rc, out = run(second_cmd)
        first_rc = proc.wait(timeout=600)
        record("a second run on the same output folder", name, rc, out, ins, checksums(*inputs, base_models),
               whole(folder), note=f"the first run went on and exited {first_rc}")

    shared = work / "shared_registration"
    ins = checksums(*inputs, base_models)
    logs = [work / f"shared_{k}.log" for k in range(2)]
    procs = [start(infer(work / f"shared_infer_{k}", already_registered=False, registration_cache=shared), logs[k])
             for k in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    outs = "\n".join(log.read_text(errors="replace") for log in logs)
    same = checksums(*(work / "shared_infer_0").glob("c00*/seg.nii.gz")).values()
    other = checksums(*(work / "shared_infer_1").glob("c00*/seg.nii.gz")).values()
    record("two inference runs registering the same 8 cases into one registration cache at once",
           "folder inference", max(codes), outs, ins, checksums(*inputs, base_models),
           whole(shared, work / "shared_infer_0", work / "shared_infer_1"),
           note=f"exit statuses {codes}; masks {'identical' if sorted(same) == sorted(other) else 'differ'}")


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "second" not in k and k not in ("checkpoint", "written", "date")}


def table() -> str:
    cols = ["fault", "command", "printed", "exit", "inputs intact", "outputs whole"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in ROWS:
        lines.append("| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (mounts a tmpfs)", file=sys.stderr)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="faults_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        catalogue(work)
    print(table())
    print(f"\n{len(ROWS)} faults in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
