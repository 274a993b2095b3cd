"""What the class task costs the mask: segmentation alone against multi-task methods, paired over cohort seeds.

Per seed it builds a synthetic cohort (``python -m pipeline phantom``, atlas space: no registration
time) and runs the experiment runner (``python -m pipeline experiment``) with every arm on the same
split, sized so that the test set holds at least 15 cases (48 cases, 50/15/35: 24 training, 7
validation, 17 test): with 7 test cases one case moves a seed's balanced accuracy by up to 0.17.
Then, per arm, over the seeds:

- test Dice (mean over the seed's test cases) and its difference to ``seg`` (segmentation alone),
  paired by seed: mean, 95 % t-interval (:func:`pipeline.evaluation.paired_stats.paired_comparison`),
  lowest seed; and over the pooled test cases (every seed's), the same difference paired by case;
- balanced accuracy (mean and lowest seed), macro AUC, expected calibration error;
- the training and evaluation time of one run (minutes; two runs share the cores with ``--parallel 2``);
- how the tasks pull on the shared encoder, from the runs' TensorBoard scalars
  (:class:`pipeline.training.gradients.GradientConflictHandler`, every 20 iterations): the median
  ratio of the class term's encoder gradient norm to the segmentation's, the mean cosine between
  them and the share of negative cosines (measured before any gradient rule acts).

    python benchmarks/multitask_cost.py --work work/mtl_cost [--seeds 1 2 3 4 5] [--parallel 2]
        [--arms seg,fixed=configs/mtl_fixed.json,stop=configs/mtl_stop.json,...] [--overlays configs/demo.json]
        [--also DIR ...] [--summary-only]

Runs resume (the runner's). ``--also DIR``: more experiment folders laid out as ``DIR/s<seed>`` (arms
run elsewhere on the same cohorts, seeds and ratios: the same splits) merged into the table by arm
name. Writes ``WORK/summary.json`` and ``WORK/summary.md``. The seeds 1-5 are ones no setting was
tuned on (the demo uses seed 0, development 1234 and 11).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finite_mean, number, seed_experiment  # noqa: E402
from pipeline.evaluation.paired_stats import paired_comparison  # noqa: E402

DEFAULT_ARMS = "seg,fixed=configs/mtl_fixed.json,stop=configs/mtl_stop.json,pcgrad=configs/mtl_pcgrad.json,uncertainty=configs/mtl_uncertainty.json"


def run_seed(seed: int, args: argparse.Namespace) -> None:
    """Build the cohort of ``seed`` (once) and run every arm on it; raise on failure."""
    seed_experiment(Path(args.work), seed, args.cases, args.arms, args.overlays, args.ratios, args.parallel,
                    overrides=args.set)



def collect(folders: list[Path], seeds: list[int]) -> tuple[dict, dict]:
    """``runs[arm][seed]`` (the row of the experiment's ``results.csv``) and ``cases[arm][(seed, id)]``
    (test Dice per case) from every ``FOLDER/s<seed>`` that exists."""
    runs: dict[str, dict[int, dict]] = {}
    cases: dict[str, dict[tuple[int, str], float]] = {}
    for folder in folders:
        for seed in seeds:
            exp = folder / f"s{seed}"
            if not (exp / "results.csv").is_file():
                continue
            with (exp / "results.csv").open(newline="") as fh:
                for r in csv.DictReader(fh):
                    if r.get("status") == "complete":
                        runs.setdefault(r["arm"], {})[seed] = {**r, **gradient_figures(exp / "runs" / r["arm"] / "split0")}
            with (exp / "cases.csv").open(newline="") as fh:
                for r in csv.DictReader(fh):
                    cases.setdefault(r["arm"], {})[(seed, r["id"])] = number(r.get("dice"))
    return runs, cases


def gradient_figures(run_dir: Path) -> dict[str, float]:
    """``grad_ratio`` (median ``|g_cls| / |g_seg|``), ``grad_cos`` (mean) and ``grad_cos_negative`` (share)
    from the TensorBoard event files of one run; empty when it logged none."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {"grad_seg": [], "grad_cls": [], "grad_cos": []}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in values:
            if tag in acc.Tags()["scalars"]:
                values[tag] += [e.value for e in acc.Scalars(tag)]
    if not values["grad_cos"] or len(values["grad_seg"]) != len(values["grad_cls"]):
        return {}
    seg, cls, cos = (np.asarray(values[k]) for k in ("grad_seg", "grad_cls", "grad_cos"))
    return {"grad_ratio": float(np.median(cls / np.maximum(seg, 1e-12))), "grad_cos": float(cos.mean()),
            "grad_cos_negative": float((cos < 0).mean())}



def summarise(runs: dict, cases: dict, seeds: list[int], reference: str = "seg") -> list[dict]:
    """One row per arm: the figures of the module's docstring."""
    rows = []
    ref_runs, ref_cases = runs.get(reference, {}), cases.get(reference, {})
    for arm, by_seed in runs.items():
        done = [s for s in seeds if s in by_seed]
        dice = [number(by_seed[s]["test_dice"]) for s in done]
        ba = [number(by_seed[s]["test_balanced_accuracy"]) for s in done]
        row = {"arm": arm, "seeds": len(done), "n_test": sum(int(number(by_seed[s]["n_test"]) or 0) for s in done),
               "dice": finite_mean(dice), "balanced_accuracy": finite_mean(ba),
               "balanced_accuracy_min": min((x for x in ba if math.isfinite(x)), default=math.nan),
               "auc": finite_mean([number(by_seed[s]["test_auc"]) for s in done]),
               "ece": finite_mean([number(by_seed[s]["test_ece"]) for s in done]),
               "minutes": finite_mean([number(by_seed[s]["seconds"]) / 60 for s in done]),
               **{k: finite_mean([by_seed[s].get(k, math.nan) for s in done])
                  for k in ("grad_ratio", "grad_cos", "grad_cos_negative")}}
        if arm != reference:
            paired = [s for s in done if s in ref_runs]
            by_seed_cmp = paired_comparison([number(ref_runs[s]["test_dice"]) for s in paired],
                                            [number(by_seed[s]["test_dice"]) for s in paired])
            keys = [k for k in cases.get(arm, {}) if k in ref_cases]
            by_case = paired_comparison([ref_cases[k] for k in keys], [cases[arm][k] for k in keys])
            row.update(dice_diff=by_seed_cmp["mean_difference"], dice_diff_ci95=by_seed_cmp["ci95_t"],
                       dice_diff_min=min(by_seed_cmp["differences"], default=math.nan), paired_seeds=by_seed_cmp["n"],
                       case_diff=by_case["mean_difference"], case_diff_ci95=by_case["ci95_t"],
                       cases_worse=by_case["n_negative"], cases_paired=by_case["n"], case_wilcoxon_p=by_case["wilcoxon_p"])
        rows.append(row)
    return rows


def _f(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rows: list[dict], runs: dict, seeds: list[int]) -> str:
    head = ("| arm | seeds | test Dice | Dice - seg (seeds) [95 % t] | lowest seed | Dice - seg (cases) [95 % t] | "
            "cases worse | bal. acc. (lowest) | AUC | ECE | min/run | |g_cls|/|g_seg| | cos (share < 0) |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        if "dice_diff" in r:
            lo, hi = r["dice_diff_ci95"]
            clo, chi = r["case_diff_ci95"]
            diff = f"{r['dice_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            case = f"{r['case_diff']:+.3f} [{clo:+.3f}, {chi:+.3f}]"
            low, worse = f"{r['dice_diff_min']:+.3f}", f"{r['cases_worse']} of {r['cases_paired']}"
        else:
            diff = case = low = worse = "reference"
        ba = "n/a" if not math.isfinite(r["balanced_accuracy"]) else \
            f"{r['balanced_accuracy']:.3f} ({r['balanced_accuracy_min']:.3f})"
        lines.append(f"| {r['arm']} | {r['seeds']} | {_f(r['dice'])} | {diff} | {low} | {case} | {worse} | {ba} | "
                     f"{_f(r['auc'])} | {_f(r['ece'])} | {_f(r['minutes'], 1)} | {_f(r['grad_ratio'], 2)} | "
                     f"{_f(r['grad_cos'])} ({_f(r['grad_cos_negative'], 2)}) |")
    per_seed = ["", "Per seed, test Dice / balanced accuracy:", "",
                "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    for arm, by_seed in runs.items():
        cells = [f"{number(by_seed[s]['test_dice']):.3f} / {number(by_seed[s]['test_balanced_accuracy']):.3f}"
                 if s in by_seed else "" for s in seeds]
        per_seed.append(f"| {arm} | " + " | ".join(c.replace("nan", "n/a") for c in cells) + " |")
    return "\n".join(lines + per_seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="work/mtl_cost")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--ratios", nargs=3, type=float, default=[0.5, 0.15, 0.35])
    p.add_argument("--arms", default=DEFAULT_ARMS, help="the runner's --arms (seg is the reference)")
    p.add_argument("--overlays", nargs="+", default=["configs/demo.json"])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (cores shared)")
    p.add_argument("--set", nargs="*", default=[], help="extra bundle overrides key=value")
    p.add_argument("--also", nargs="*", default=[], help="more experiment folders DIR/s<seed> to merge by arm")
    p.add_argument("--summary-only", action="store_true", help="tabulate what is there, run nothing")
    args = p.parse_args(argv)
    failed = 0
    if not args.summary_only:
        for seed in args.seeds:
            print(f"[multitask_cost] seed {seed} ...", flush=True)
            try:
                run_seed(seed, args)
            except RuntimeError as exc:
                failed += 1
                print(f"[multitask_cost] seed {seed} failed: {exc}", flush=True)
    work = Path(args.work)
    runs, cases = collect([work, *map(Path, args.also)], args.seeds)
    if "seg" not in runs:
        print("[multitask_cost] no finished 'seg' arm to compare with", flush=True)
        return 1
    rows = summarise(runs, cases, args.seeds)
    md = markdown(rows, runs, args.seeds)
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps({"seeds": args.seeds, "arms": args.arms, "rows": rows}, indent=1,
                                                  default=str), encoding="utf-8")
    (work / "summary.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
