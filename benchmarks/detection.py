"""Lesions as boxes: the detection head against the predicted mask's components, paired over cohort seeds.

Per seed it builds a synthetic cohort in atlas space with satellite lesions (``python -m pipeline
phantom --satellites 0.5``: half the cases get one or two lesions beside the tumour, so a case has one
to three) and runs the experiment runner (``python -m pipeline experiment``) with two arms on the same
split (48 cases, 50/15/35: 24 training, 7 validation, 17 test), no component rule
(``postprocess=none``: the rule decided on validation deletes satellites, see the model card):

- ``mtl``: the demo's multi-task network; its lesion boxes are the predicted mask's components;
- ``det``: the same plus the detection head (``configs/detect.json``); both its own boxes and its
  mask's components are scored;
- ``detached``: the head on detached encoder maps (``configs/detect_detached.json``): its loss never
  moves the encoder, so the mask should be ``mtl``'s.

Per arm and seed: test Dice, the mask components' AP at IoU 0.25 and lesion sensitivity at one false
positive per case (``test_box_*``), the head's (``test_head_box_*``), and the run's minutes; over
the seeds, for each arm with the head, the head minus the mask-derived boxes (same runs) and its Dice
minus ``mtl``'s, paired by seed (95 % t-interval) and by test case.

    python benchmarks/detection.py --work work/detection [--seeds 1 2 3] [--parallel 1] [--epochs N] [--summary-only]

Runs resume (the runner's). Writes ``WORK/summary.json`` and ``WORK/summary.md``. Seeds 1-3 are ones no
setting was tuned on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finite_mean, fixed, number, paired_text, seed_experiment  # noqa: E402
from pipeline.evaluation.paired_stats import paired_comparison  # noqa: E402

ARMS = "mtl,det=configs/detect.json,detached=configs/detect_detached.json"
HEAD_ARMS = ("det", "detached")
FIGURES = ("test_dice", "test_box_ap25", "test_box_sensitivity_fp1", "test_head_box_ap25",
           "test_head_box_sensitivity_fp1", "seconds")


def run_seed(seed: int, args: argparse.Namespace) -> None:
    """Build the cohort of ``seed`` (once) and run both arms on it; raise on failure."""
    seed_experiment(Path(args.work), seed, args.cases, ARMS, ["configs/demo.json"], [0.5, 0.15, 0.35], args.parallel,
                    overrides=["postprocess=none"], phantom=["--satellites", str(args.satellites)],
                    cohort_tag=f"_sat{args.satellites}",
                    extra=["--epochs", str(args.epochs)] if args.epochs else [])



def collect(work: Path, seeds: list[int]) -> tuple[dict, dict]:
    """``runs[arm][seed]`` (the figures of :data:`FIGURES`) and ``cases[arm][(seed, id)]`` (test Dice)."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    cases: dict[str, dict[tuple[int, str], float]] = {}
    for seed in seeds:
        exp = work / f"s{seed}"
        if not (exp / "results.csv").is_file():
            continue
        with (exp / "results.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("status") == "complete":
                    runs.setdefault(r["arm"], {})[seed] = {k: number(r.get(k)) for k in FIGURES}
        with (exp / "cases.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                cases.setdefault(r["arm"], {})[(seed, r["id"])] = number(r.get("dice"))
    return runs, cases



def summarise(runs: dict, cases: dict, seeds: list[int]) -> dict:
    """Means per arm; per arm with the head, its boxes against its mask-derived boxes and its Dice
    against ``mtl``'s (``out[arm]``)."""
    arms = {arm: {k: finite_mean([by_seed[s][k] for s in seeds if s in by_seed]) for k in FIGURES}
            | {"seeds": sum(s in by_seed for s in seeds)} for arm, by_seed in runs.items()}
    out: dict = {"arms": arms}
    mtl = runs.get("mtl", {})
    for arm in HEAD_ARMS:
        det = runs.get(arm, {})
        done = [s for s in seeds if s in det]
        if not done:
            continue
        row = out[arm] = {
            "head_minus_mask_ap25": paired_comparison([det[s]["test_box_ap25"] for s in done],
                                                      [det[s]["test_head_box_ap25"] for s in done]),
            "head_minus_mask_sensitivity_fp1": paired_comparison(
                [det[s]["test_box_sensitivity_fp1"] for s in done],
                [det[s]["test_head_box_sensitivity_fp1"] for s in done])}
        both = [s for s in done if s in mtl]
        if both:
            row["dice_minus_mtl_by_seed"] = paired_comparison([mtl[s]["test_dice"] for s in both],
                                                              [det[s]["test_dice"] for s in both])
            keys = [k for k in cases.get(arm, {}) if k in cases.get("mtl", {})]
            row["dice_minus_mtl_by_case"] = paired_comparison([cases["mtl"][k] for k in keys],
                                                              [cases[arm][k] for k in keys])
    return out


def markdown(summary: dict, runs: dict, seeds: list[int]) -> str:
    lines = ["| arm | seeds | test Dice | mask boxes AP25 | mask boxes sens. at 1 FP | head AP25 | head sens. at 1 FP "
             "| min/run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in summary["arms"].items():
        lines.append(f"| {arm} | {a['seeds']} | {fixed(a['test_dice'])} | {fixed(a['test_box_ap25'])} | "
                     f"{fixed(a['test_box_sensitivity_fp1'])} | {fixed(a['test_head_box_ap25'])} | "
                     f"{fixed(a['test_head_box_sensitivity_fp1'])} | {fixed(a['seconds'] / 60, 1)} |")
    lines.append("")
    for arm in HEAD_ARMS:
        row = summary.get(arm)
        if row:
            lines += [f"{arm}: head minus mask-derived boxes (same runs), AP25: {paired_text(row['head_minus_mask_ap25'])}; "
                      f"sensitivity at 1 FP: {paired_text(row['head_minus_mask_sensitivity_fp1'])}. Dice minus mtl, by "
                      f"seed: {paired_text(row.get('dice_minus_mtl_by_seed'))}; by case: "
                      f"{paired_text(row.get('dice_minus_mtl_by_case'))}."]
    lines += ["", "Per seed (test Dice, mask AP25, head AP25):", ""]
    for arm, by_seed in runs.items():
        cells = [f"s{s}: {fixed(by_seed[s]['test_dice'])}, {fixed(by_seed[s]['test_box_ap25'])}, "
                 f"{fixed(by_seed[s]['test_head_box_ap25'])}" for s in seeds if s in by_seed]
        lines.append(f"- {arm}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="work/detection")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--satellites", type=float, default=0.5)
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (cores shared)")
    p.add_argument("--epochs", type=int, default=0, help="override the demo's epochs (0: keep them)")
    p.add_argument("--summary-only", action="store_true", help="tabulate what is there, run nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    if not args.summary_only:
        for seed in args.seeds:
            print(f"[detection] seed {seed}", flush=True)
            run_seed(seed, args)
    runs, cases = collect(work, args.seeds)
    summary = summarise(runs, cases, args.seeds)
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    text = markdown(summary, runs, args.seeds)
    (work / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
