"""What the learning benchmarks share: running their commands with a log, and reading figures back."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["finite_mean", "fixed", "number", "paired_text", "run_logged", "seed_experiment"]


def run_logged(cmds: list[list[str]], log: Path, cwd: Path) -> None:
    """Run ``cmds`` one after the other in ``cwd``, their output appended to ``log``; raise on the first failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        for cmd in cmds:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")


def number(v: str | None) -> float:
    """A CSV cell as a float; ``nan`` when empty or not a number."""
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def fixed(v: float, digits: int = 3) -> str:
    """A figure for a table: ``n/a`` when missing or not finite."""
    return "n/a" if not isinstance(v, float) or not math.isfinite(v) else f"{v:.{digits}f}"


def paired_text(c: dict | None, count_better: bool = False) -> str:
    """A :func:`pipeline.evaluation.paired_stats.paired_comparison` as ``+0.012 [lo, hi] (n N)``
    (95 % t-interval), with how many pairs improved when ``count_better``."""
    if not c or not c.get("n"):
        return "n/a"
    lo, hi = c["ci95_t"]
    better = f", {c['n_positive']} better" if count_better else ""
    return f"{c['mean_difference']:+.3f} [{fixed(lo)}, {fixed(hi)}] (n {c['n']}{better})"


def finite_mean(values: list[float]) -> float:
    """The mean of the finite values; ``nan`` when there are none."""
    v = [x for x in values if math.isfinite(x)]
    return statistics.fmean(v) if v else math.nan


def seed_experiment(work: Path, seed: int, cases: int, arms: str, overlays: Sequence[str], ratios: Sequence[float],
                    parallel: int, overrides: Sequence[str] = (), phantom: Sequence[str] = (), cohort_tag: str = "",
                    extra: Sequence[str] = ()) -> None:
    """Build the atlas-space cohort of ``seed`` once (``python -m pipeline phantom`` with ``phantom``'s
    options, under ``WORK/cohorts``) and run the experiment runner's arms on one split of it in
    ``WORK/s<seed>`` (its log in ``WORK/s<seed>.log``); raise on failure. ``overrides`` go after one
    ``--set`` (a second would replace the first), ``extra`` after the runner's other options."""
    cohort = work / "cohorts" / f"atlas_n{cases}{cohort_tag}_s{seed}"
    py = sys.executable
    cmds = []
    if not (cohort / "datalist.json").exists():
        cmds.append([py, "-m", "pipeline", "phantom", "--out", str(cohort), "--cases", str(cases), "--seed",
                     str(seed), "--space", "atlas", "--spacing", "2", *phantom])
    cmds.append([py, "-m", "pipeline", "experiment", "--datalist", str(cohort / "datalist.json"), "--out",
                 str(work / f"s{seed}"), "--overlays", *overlays, "--ratios", *map(str, ratios),
                 "--repeats", "1", "--arms", arms, "--seed", str(seed), "--parallel", str(parallel),
                 "--set", "already_registered=True", *overrides, *extra])
    run_logged(cmds, work / f"s{seed}.log", ROOT)
