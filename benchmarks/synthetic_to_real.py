"""How far the built-in synthetic cohort carries to real scans: a model trained on phantoms only,
run by folder inference on real expert-labelled FLAIRs and scored in each scan's native space.

    python benchmarks/synthetic_to_real.py [--real ../shared/data/real/brats2018/datalist.json]
        [--overlays configs/demo.json] [--seed 0] [--cases 60] [--space native] [--profile study|realistic] [--iso-cores F] [--epochs N]
        [--ckpt MODEL.pt] [--work work/synth2real] [--tag TAG] [--baseline WORK/TAG] [--set key=value ...]

Steps (each resumes or is reused when its output exists): build the phantom cohort
(``python -m pipeline phantom``), train ``train.json`` + the overlays on it (or take ``--ckpt``),
run ``inference.json`` + the same overlays on the real datalist (``--datalist``: every case's
FLAIR, masks only for scoring), then ``python -m pipeline score``. Prints the native-space Dice,
HD95 and lesion-wise Dice per case with predicted and true volumes (mL) and their mean; writes
``WORK/<tag>/summary.json``. The tag names the run's folder: by default the settings that make the
model (profile, high-grade cores, cohort seed, epochs, ``--set``), so a run with other settings never
reuses another's model; give ``--tag`` when the overlays differ. Re-run it after every change to the generator: the figure to beat is
the one before the change, on the same real cases; ``--baseline`` names that run's folder and
prints the difference paired by case (95 % t-interval, cases better / worse, Wilcoxon p), also
written to the summary under ``against``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import paired_text  # noqa: E402
from pipeline.evaluation.paired_stats import paired_comparison  # noqa: E402

TRAIN = "bundles/plgg_mtl/configs/train.json"
INFER = "bundles/plgg_mtl/configs/inference.json"


def _configs(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode not in (0, 1):  # 1: folder inference with a failed case, still reported
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def _true_volumes(datalist: Path) -> dict[str, float]:
    """Each labelled case's true tumour volume in mL (its mask in native space)."""
    import SimpleITK as sitk

    from pipeline.data.datalist import load_datalist

    out = {}
    for case in load_datalist(datalist).cases:
        if case.label is not None:
            mask = sitk.ReadImage(str(case.label))
            voxels = int((sitk.GetArrayViewFromImage(mask) > 0).sum())
            spacing = mask.GetSpacing()
            out[case.id] = voxels * spacing[0] * spacing[1] * spacing[2] / 1000.0
    return out


def _against(baseline: Path, dice: dict[str, float]) -> dict:
    """This run's Dice minus ``baseline``'s (its ``real/score.json``), paired by case id."""
    score = baseline / "real" / "score.json"
    if not score.is_file():
        sys.exit(f"{score}: no scores of the baseline run (run it first, or name its folder WORK/TAG)")
    before = {c["id"]: c["dice"] for c in json.loads(score.read_text(encoding="utf-8"))["cases"]
              if c.get("status") == "ok"}
    ids = sorted(set(before) & set(dice))
    out = paired_comparison([before[i] for i in ids], [dice[i] for i in ids])
    return {"baseline": str(baseline), **{k: v for k, v in out.items() if k != "differences"},
            "by_case": {i: round(dice[i] - before[i], 4) for i in ids}}


def default_tag(a: argparse.Namespace) -> str:
    """The run folder's name from the settings that make the model (``--tag`` overrides it)."""
    parts = [a.profile, f"iso{a.iso_cores:g}" if a.iso_cores else "", f"s{a.seed}", f"n{a.cases}", a.space,
             f"{a.spacing:g}mm", f"e{a.epochs}" if a.epochs else "",
             *(kv.replace("=", "-").replace("/", "_") for kv in a.set)]
    return "_".join(x for x in parts if x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", default="../shared/data/real/brats2018/datalist.json")
    p.add_argument("--overlays", nargs="+", default=["configs/demo.json"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--space", default="native")
    p.add_argument("--profile", default="study", help="the phantom's profile: study or realistic")
    p.add_argument("--iso-cores", type=float, default=0.0, help="the phantom's --iso-cores (realistic profile)")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="a trained model.pt instead of training one")
    p.add_argument("--tag", default=None, help="the run folder's name (default: from the settings)")
    p.add_argument("--work", default="work/synth2real")
    p.add_argument("--baseline", default=None, help="an earlier run's folder (WORK/TAG): the Dice paired by case")
    p.add_argument("--set", nargs="*", default=[], help="extra bundle overrides key=value (training and inference)")
    a = p.parse_args()
    work = (ROOT / a.work).resolve()
    run = work / (a.tag or default_tag(a))
    extra = [x for kv in a.set for x in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    t0 = time.perf_counter()
    ckpt = Path(a.ckpt).resolve() if a.ckpt else run / "train" / "models" / "model.pt"
    if not a.ckpt and not ckpt.exists():
        profile = ("" if a.profile == "study" else f"_{a.profile}") + (f"_iso{a.iso_cores:g}" if a.iso_cores else "")
        cohort = work / "cohorts" / f"{a.space}_n{a.cases}_s{a.seed}_{a.spacing:g}mm{profile}"
        if not (cohort / "datalist.json").exists():
            _run([sys.executable, "-m", "pipeline", "phantom", "--out", str(cohort), "--cases", str(a.cases),
                  "--seed", str(a.seed), "--space", a.space, "--spacing", str(a.spacing), "--profile", a.profile,
                  "--iso-cores", str(a.iso_cores)],
                 run / "log.txt")
        _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", _configs([TRAIN, *a.overlays]),
              "--datalist", str(cohort / "datalist.json"), "--output_dir", str(run / "train"), "--seed", str(a.seed),
              "--registration_cache", str(work / "registration"),
              *(["--epochs", str(a.epochs)] if a.epochs else []), *extra], run / "log.txt")
    train_s = time.perf_counter() - t0
    real = Path(a.real).resolve()
    out = run / "real"
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs([INFER, *a.overlays]),
          "--datalist", str(real), "--output_dir", str(out), "--ckpt", str(ckpt),
          "--registration_cache", str(work / "registration"), *extra], run / "log.txt")
    _run([sys.executable, "-m", "pipeline", "score", "--predictions", str(out), "--datalist", str(real)],
         run / "log.txt")
    score = json.loads((out / "score.json").read_text(encoding="utf-8"))
    predicted = {r["id"]: r for r in json.loads((out / "predictions.json").read_text(encoding="utf-8"))["cases"]}
    truth = _true_volumes(real)
    print(f"{'case':<28} {'Dice':>6} {'HD95 mm':>8} {'lesion Dice':>11} {'pred mL':>8} {'true mL':>8}")
    rows = []
    for c in score["cases"]:
        if c.get("status") != "ok":
            print(f"{c['id']:<28} {c.get('status')}")
            continue
        ml = predicted.get(c["id"], {}).get("volume_ml")
        rows.append(c)
        print(f"{c['id']:<28} {c['dice']:6.3f} {c['hd95_mm']:8.1f} {c['lesion_dice']:11.3f} "
              f"{'' if ml is None else f'{float(ml):8.1f}'} {truth.get(c['id'], float('nan')):8.1f}")
    dice = [c["dice"] for c in rows]
    summary = {"model": str(ckpt), "overlays": a.overlays, "real": str(real), "n": len(rows),
               "dice_mean": statistics.mean(dice) if dice else None,
               "dice_sd": statistics.stdev(dice) if len(dice) > 1 else None,
               "dice_min": min(dice) if dice else None, "lesion_dice": score.get("lesion_dice"),
               "hd95_mm": score.get("hd95_mm"), "seconds_training": round(train_s, 1),
               "seconds_total": round(time.perf_counter() - t0, 1)}
    if a.baseline:
        summary["against"] = _against(Path(a.baseline), {c["id"]: c["dice"] for c in rows})
    (run / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if dice:
        print(f"synthetic -> real ({len(dice)} cases, native space): Dice {summary['dice_mean']:.3f} "
              f"(sd {summary['dice_sd'] or 0:.3f}, min {summary['dice_min']:.3f}), lesion-wise "
              f"{summary['lesion_dice']:.3f}; {summary['seconds_total'] / 60:.1f} min")
    if a.baseline:
        c = summary["against"]
        print(f"minus {a.baseline}, paired by case: {paired_text(c, count_better=True)}, {c['n_negative']} worse, "
              f"Wilcoxon p {c['wilcoxon_p']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
