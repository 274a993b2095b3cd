"""The staged recipe (class first, then the mask) against one-stage multi-task training, paired over cohort seeds.

Per seed it builds the synthetic cohort of ``benchmarks/multitask_cost.py`` (48 atlas-space cases,
50/15/35: 24 training, 7 validation, 17 test) and runs the experiment runner with four arms on the
same split, the later stages started from the earlier one's model of the split (``--chain``):

- ``mtl``: the demo's one-stage multi-task network (the reference for the mask);
- ``stage1``: classification + reconstruction, no decoder (``configs/stage1_cls_recon.json``; the
  reference for the class);
- ``stage2``: segmentation + reconstruction from ``stage1`` (``configs/stage2_seg_recon.json``) with a
  class term that trains the head on a detached bottleneck (``cls_weight`` 0.3, ``mtl_method`` stop,
  ``cls_grad_levels`` 0): the encoder moves, the head follows;
- ``stage2_frozen``: the same stage 2 with the encoder frozen (``freeze: ["encoder"]``) and the class
  term off: the classifier reads stage 1's features unchanged, only the decoders learn.

Per arm, over the seeds: test Dice and its difference to ``mtl`` (paired by seed and by test case,
95 % t-interval), balanced accuracy, AUC, ECE, minutes per run; for each stage 2, its balanced
accuracy minus ``stage1``'s, paired by seed (the class kept through stage 2: within 0.05 is the target).

    python benchmarks/staged.py --work work/staged [--seeds 1 2 3] [--parallel 1] [--epochs N] [--summary-only]

Runs resume (the runner's). Writes ``WORK/summary.json`` and ``WORK/summary.md``. Seeds 1-3 are ones no
setting was tuned on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.multitask_cost import collect, summarise  # noqa: E402
from benchmarks.runs import fixed, number, paired_text, seed_experiment  # noqa: E402
from pipeline.evaluation.paired_stats import paired_comparison  # noqa: E402

STAGE2 = ROOT / "configs" / "stage2_seg_recon.json"
STAGE2_ARMS = {
    "stage2": {"_comment": "staged benchmark: stage 2, the head trained on a detached bottleneck",
               "cls_weight": 0.3, "mtl_method": "stop", "cls_grad_levels": 0},
    "stage2_frozen": {"_comment": "staged benchmark: stage 2 with the encoder frozen", "freeze": ["encoder"]},
}


def arms(work: Path) -> str:
    """Write the stage-2 overlays into ``work`` (stage 2's settings and the arm's) and return ``--arms``."""
    work.mkdir(parents=True, exist_ok=True)
    base = json.loads(STAGE2.read_text(encoding="utf-8"))
    out = ["mtl", f"stage1={ROOT / 'configs' / 'stage1_cls_recon.json'}"]
    for name, extra in STAGE2_ARMS.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps({**base, **extra}, indent=1), encoding="utf-8")
        out.append(f"{name}={path.resolve()}")
    return ",".join(out)


def class_kept(runs: dict, seeds: list[int]) -> dict[str, dict]:
    """Per stage-2 arm, its test balanced accuracy minus ``stage1``'s, paired by seed."""
    out = {}
    first = runs.get("stage1", {})
    for arm in STAGE2_ARMS:
        done = [s for s in seeds if s in runs.get(arm, {}) and s in first]
        out[arm] = paired_comparison([number(first[s]["test_balanced_accuracy"]) for s in done],
                                     [number(runs[arm][s]["test_balanced_accuracy"]) for s in done])
    return out


def markdown(rows: list[dict], kept: dict[str, dict], runs: dict, seeds: list[int]) -> str:
    lines = ["| arm | seeds | test Dice | Dice - mtl (seeds) [95 % t] | Dice - mtl (cases) [95 % t] | bal. acc. (lowest) | "
             "bal. acc. - stage1 (seeds) [95 % t] | AUC | ECE | min/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        by_seed = "reference" if r["arm"] == "mtl" else paired_text(
            {"mean_difference": r.get("dice_diff"), "ci95_t": r.get("dice_diff_ci95"), "n": r.get("paired_seeds")})
        by_case = "reference" if r["arm"] == "mtl" else paired_text(
            {"mean_difference": r.get("case_diff"), "ci95_t": r.get("case_diff_ci95"), "n": r.get("cases_paired")})
        ba = "n/a" if not math.isfinite(r["balanced_accuracy"]) else \
            f"{r['balanced_accuracy']:.3f} ({r['balanced_accuracy_min']:.3f})"
        kept_text = paired_text(kept[r["arm"]]) if r["arm"] in kept else ("reference" if r["arm"] == "stage1" else "")
        lines.append(f"| {r['arm']} | {r['seeds']} | {fixed(r['dice'])} | {by_seed} | {by_case} | {ba} | {kept_text} | "
                     f"{fixed(r['auc'])} | {fixed(r['ece'])} | {fixed(r['minutes'], 1)} |")
    lines += ["", "Per seed, test Dice / balanced accuracy:", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    for arm, by_seed in runs.items():
        cells = [f"{fixed(number(by_seed[s]['test_dice']))} / {fixed(number(by_seed[s]['test_balanced_accuracy']))}"
                 if s in by_seed else "" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="work/staged")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--ratios", nargs=3, type=float, default=[0.5, 0.15, 0.35])
    p.add_argument("--overlays", nargs="+", default=["configs/demo.json"])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (cores shared; a stage 2 waits for its stage 1)")
    p.add_argument("--epochs", type=int, default=None, help="every arm's epochs (default: the overlays')")
    p.add_argument("--summary-only", action="store_true", help="tabulate what is there, run nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    failed = 0
    if not args.summary_only:
        arm_list = arms(work)
        extra = ["--chain", *(f"{a}=stage1" for a in STAGE2_ARMS)] + (["--epochs", str(args.epochs)] if args.epochs else [])
        for seed in args.seeds:
            print(f"[staged] seed {seed} ...", flush=True)
            try:
                seed_experiment(work, seed, args.cases, arm_list, args.overlays, args.ratios, args.parallel, extra=extra)
            except RuntimeError as exc:
                failed += 1
                print(f"[staged] seed {seed} failed: {exc}", flush=True)
    runs, cases = collect([work], args.seeds)
    if "mtl" not in runs or "stage1" not in runs:
        print("[staged] no finished 'mtl' and 'stage1' runs to compare with", flush=True)
        return 1
    rows = summarise(runs, cases, args.seeds, reference="mtl")
    kept = class_kept(runs, args.seeds)
    md = markdown(rows, kept, runs, args.seeds)
    (work / "summary.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows, "class_kept": kept}, indent=1,
                                                  default=str), encoding="utf-8")
    (work / "summary.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
