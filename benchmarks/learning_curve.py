"""Synthetic pretraining against real-only training as the number of real training cases grows.

For every N of ``--sizes`` it runs the experiment runner (``python -m pipeline experiment --kind kfold
--train-cases N``) on the real datalist with two arms on the same folds, the same N training cases
(nested seeded subsets: the 2 cases of N = 2 are among the 5 of N = 5), the same seeds and the same
number of epochs (the same budget), segmentation alone (``configs/single_task.json``):

- ``scratch``: the network trained from its random initialisation;
- ``pretrained``: the same, started from ``--pretrained`` (``--init_from``: every tensor whose name and
  shape match), e.g. the model ``benchmarks/synthetic_to_real.py`` trains on the synthetic cohort alone;
- ``mixed`` (with ``--synthetic DATALIST``): from scratch, the synthetic cases added to every fold's
  training part (``--extra_train``), about half of each epoch's draws (``--extra_train_share 0.5``),
  an epoch as long as the real-only one.

Validation and test cases are those of the full cross-validation of the same seed, so every N is scored
on the same cases; the registrations are shared (``WORK/registration``). Prints, per N, each arm's test
Dice (mean over the folds done) and each arm minus scratch paired by fold and by test case (95 % t-interval), and writes ``WORK/summary.json``,
``WORK/summary.md`` and ``WORK/learning_curve.png``. The pretraining's own cost is paid once and is
not in the budget.

    python benchmarks/learning_curve.py --pretrained work/synth2real/realistic_e40/train/models/model.pt \\
        [--synthetic work/synth2real/cohorts/native_n60_s0_2mm_realistic/datalist.json] [--datalist ../shared/data/real/brats2018/datalist.json] [--sizes 2 5 10 14] [--folds 5] \\
        [--overlays configs/real.json] [--epochs N] [--work work/learning_curve] [--summary-only]

Runs resume (the runner's): stop it at any time, re-run the same command to go on; the runner works
fold by fold, both arms of a fold before the next, so a partial table is paired. With 20 cases and 5
folds a fold has 14 training cases: the largest N is 14.
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

from benchmarks.runs import finite_mean, fixed, number, paired_text, run_logged  # noqa: E402
from pipeline.evaluation.paired_stats import paired_comparison  # noqa: E402

ARM_NAMES = ("scratch", "pretrained", "mixed")


def arm_overlays(work: Path, pretrained: Path | None, synthetic: Path | None) -> str:
    """Write the arms' overlays into ``work`` and return the runner's ``--arms`` value."""
    work.mkdir(parents=True, exist_ok=True)
    overlays = {"scratch": {"_comment": "learning curve: from the random initialisation", "init_from": None}}
    if pretrained:
        overlays["pretrained"] = {"_comment": "learning curve: from the synthetic model",
                                  "init_from": str(pretrained.resolve())}
    if synthetic:
        overlays["mixed"] = {"_comment": "learning curve: synthetic cases beside the real ones in every epoch",
                             "extra_train": str(synthetic.resolve()), "extra_train_share": 0.5}
    arms = []
    for name, overlay in overlays.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(overlay, indent=1), encoding="utf-8")
        arms.append(f"{name}={path.resolve()}")
    return ",".join(arms)


def run_size(n: int, args: argparse.Namespace, arms: str) -> None:
    """Both arms at N training cases (all folds); raise when the runner fails."""
    cmd = [sys.executable, "-m", "pipeline", "experiment", "--datalist", str(Path(args.datalist).resolve()),
           "--out", str(Path(args.work).resolve() / f"n{n}"), "--kind", "kfold", "--folds", str(args.folds),
           "--train-cases", str(n), "--arms", arms, "--seed", str(args.seed),
           "--overlays", *args.overlays, "configs/single_task.json",
           "--set", f"registration_cache={(Path(args.work) / 'registration').resolve()}"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    run_logged([cmd], Path(args.work) / f"n{n}.log", ROOT)


def collect(work: Path, sizes: list[int]) -> tuple[dict, dict]:
    """``folds[n][arm][fold]`` (test Dice) and ``cases[n][arm][id]`` (test Dice per case)."""
    folds: dict[int, dict[str, dict[int, float]]] = {}
    cases: dict[int, dict[str, dict[str, float]]] = {}
    for n in sizes:
        exp = work / f"n{n}"
        if not (exp / "results.csv").is_file():
            continue
        with (exp / "results.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("status") == "complete":
                    folds.setdefault(n, {}).setdefault(r["arm"], {})[int(r["split"])] = number(r.get("test_dice"))
        with (exp / "cases.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                cases.setdefault(n, {}).setdefault(r["arm"], {})[r["id"]] = number(r.get("dice"))
    return folds, cases


def summarise(folds: dict, cases: dict) -> dict:
    """Per N: each arm's mean test Dice over its folds, and each other arm minus scratch paired by
    fold (only folds both arms finished) and by test case."""
    out: dict = {}
    for n in sorted(folds):
        by_arm = folds[n]
        row: dict = {arm: {"folds": len(by_arm.get(arm, {})), "test_dice": finite_mean(list(by_arm.get(arm, {}).values()))}
                     for arm in ARM_NAMES}
        for arm in ARM_NAMES[1:]:
            both = sorted(set(by_arm.get("scratch", {})) & set(by_arm.get(arm, {})))
            if both:
                scratch, other = cases[n].get("scratch", {}), cases[n].get(arm, {})
                ids = sorted(set(scratch) & set(other))
                row[arm]["by_fold"] = paired_comparison([by_arm["scratch"][k] for k in both],
                                                        [by_arm[arm][k] for k in both])
                row[arm]["by_case"] = paired_comparison([scratch[i] for i in ids], [other[i] for i in ids])
        out[str(n)] = row
    return out


def markdown(summary: dict) -> str:
    lines = ["| N real training cases | arm | test Dice (folds) | minus scratch, by fold | by test case |",
             "| --- | --- | --- | --- | --- |"]
    for n, row in summary.items():
        for arm in ARM_NAMES:
            a = row[arm]
            if a["folds"]:
                lines.append(f"| {n} | {arm} | {fixed(a['test_dice'])} ({a['folds']}) | {paired_text(a.get('by_fold'), count_better=True)} | "
                             f"{paired_text(a.get('by_case'), count_better=True)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm in ARM_NAMES:
        points = [(int(n), row[arm]["test_dice"]) for n, row in summary.items() if math.isfinite(row[arm]["test_dice"])]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=arm)
    ax.set_xlabel("real training cases")
    ax.set_ylabel("test Dice (mean over folds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", help="the synthetic model (model.pt) the pretrained arm starts from")
    p.add_argument("--synthetic", help="a synthetic datalist: adds the mixed arm")
    p.add_argument("--datalist", default=str(ROOT.parent / "shared/data/real/brats2018/datalist.json"))
    p.add_argument("--sizes", nargs="+", type=int, default=[2, 5, 10, 14])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlays", nargs="+", default=["configs/real.json"])
    p.add_argument("--epochs", type=int, default=0, help="override the overlays' epochs (0: keep them)")
    p.add_argument("--work", default="work/learning_curve")
    p.add_argument("--summary-only", action="store_true", help="tabulate what is there, run nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    if not args.summary_only:
        if not args.pretrained and not args.synthetic:
            p.error("give --pretrained MODEL.pt, --synthetic DATALIST or both")
        for flag, path in (("--pretrained", args.pretrained), ("--synthetic", args.synthetic)):
            if path and not Path(path).is_file():
                p.error(f"{flag}: no file {path}")
        arms = arm_overlays(work, Path(args.pretrained) if args.pretrained else None,
                            Path(args.synthetic) if args.synthetic else None)
        for n in args.sizes:
            print(f"[learning_curve] N = {n}", flush=True)
            run_size(n, args, arms)
    folds, cases = collect(work, args.sizes)
    summary = summarise(folds, cases)
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    text = markdown(summary)
    (work / "summary.md").write_text(text, encoding="utf-8")
    if summary:
        plot(summary, work / "learning_curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
