"""The study's experiment in one resumable command: repeated patient splits (or k-fold), single-task
against multi-task, every run an ordinary bundle run, one table with paired tests.

    python -m pipeline experiment --datalist DL --out DIR [--overlays configs/paper.json ...]
        [--repeats 6 | --kind kfold --folds 5] [--train-cases N] [--arms seg,mtl] [--seed S] [--epochs N]
        [--chain ARM=EARLIER_ARM ...] [--parallel K | --gpus 0,1,... [--gpus-per-run K]] [--tracking mlflow]
        [--set key=value ...] [--overwrite]

Arms (:data:`ARMS`): ``seg`` the segmentation alone (``configs/single_task.json``), ``cls`` the
classifier alone on the shared encoder (``configs/classify_only.json``), ``mtl`` both; a custom
arm is ``name=overlay.json``. The splits are written once to ``DIR/splits.json`` (seeded,
patient-level, stratified by class: :mod:`pipeline.data.splits`) and never changed by a re-run;
``--train-cases N`` keeps N of each split's training cases (nested seeded subsets, validation and
test as without it): one point of a learning curve (``benchmarks/learning_curve.py``).
Every split x arm is a training (``train.json`` + overlays + the arm's overlay) and an evaluation
of its best checkpoint on the split's test cases, as subprocesses, in ``DIR/runs/<arm>/split<k>/``
with the exact command lines in ``command.txt`` and their output in ``log.txt``. With
``--gpus-per-run K`` each training runs on K GPUs of the list (``torchrun`` with
``multi_gpu_train.json``; evaluation stays one process). Both arms of a
split share the split and the seed (``seed + k``), so they differ only in the branch.
``--chain stage2=stage1`` trains in stages: arm ``stage2`` of split k starts from arm ``stage1``'s
model of split k (``--init_from``; it waits for that run, fails without it, and is redone when
``stage1``'s settings change), as ``benchmarks/staged.py`` does for the staged recipe.

Re-running the command skips finished runs whose settings (config files' contents, overrides,
split) are unchanged, resumes interrupted ones from their last checkpoint, and refuses runs whose
settings changed unless ``--overwrite`` (which redoes them from scratch). Results and the summary
(:mod:`pipeline.experiment.report`) are rewritten after every finished run. One failed run is
reported and the others go on; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.experiment.execute import (
    Children,
    execute,
    finish,
    is_complete,
    latest_checkpoint_epoch,
)
from pipeline.experiment.plan import (
    ExperimentConfig,
    RunSpec,
    arm_name,
    check_settings,
    gpu_slots,
    make_or_load_splits,
    parse_chain,
    plan_runs,
    read_json,
)
from pipeline.io.errors import InputError, MachineError, find_input_error, machine_fault, machine_fault_line
from pipeline.runtime.locks import folder_lock

__all__ = ["run_experiment", "main"]


def _child_fault(spec: RunSpec) -> MachineError | None:
    """The full disk or read-only folder a failed run's last step ended with (its log's last
    ``error:`` line), else ``None``."""
    try:
        lines = (spec.run_dir / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    last = [ln for ln in lines if ln.startswith("error: ")][-1:]
    return machine_fault_line(last[0]) if last else None


def _report(cfg: ExperimentConfig, specs: list[RunSpec], class_names: list[str]) -> dict[str, Any]:
    from pipeline.experiment.report import collect_run, write_reports

    rows, cases = [], []
    for s in specs:
        row, case_rows = collect_run(s.run_dir, s.arm, s.split, s.split_name, class_names)
        rows.append(row)
        cases += case_rows
    info = {"datalist": str(cfg.datalist), "kind": cfg.kind, "n_splits": len({s.split for s in specs}),
            "arms": [arm_name(a) for a in cfg.arms], "overlays": cfg.overlays, "seed": cfg.seed,
            "epochs": cfg.epochs, "overrides": cfg.overrides}
    return write_reports(cfg.out, rows, cases, info["arms"], class_names, info)


def _describe(state: dict[str, Any], run_dir: Path) -> str:
    m = read_json(run_dir / "metrics.json")
    parts = []
    if m.get("dice") is not None:
        parts.append(f"test Dice {m['dice']:.3f} ({m.get('n_with_mask')} scored)")
        for key, label, unit in (("hd95_mm", "HD95", " mm"), ("surface_dice", "surface Dice", ""),
                                 ("lesion_dice", "lesion-wise Dice", ""), ("lesion_hd95_mm", "lesion-wise HD95", " mm")):
            if m.get(key) is not None:
                parts.append(f"{label} {m[key]:.{1 if unit else 3}f}{unit}")
    if m.get("balanced_accuracy") is not None:
        parts.append(f"bal. acc. {m['balanced_accuracy']:.3f} ({m.get('n_with_class')} with class)")
    if m.get("n_with_mask") == 0:
        parts.append("no Dice (no decoder, or no test case with a mask)")
    return ", ".join(parts) + f", {float(state.get('seconds') or 0) / 60:.1f} min"


def run_experiment(cfg: ExperimentConfig) -> int:
    """Run (or resume) the whole experiment; returns the exit status (0 all complete, 1 any failed)."""
    from tqdm import tqdm

    from pipeline.data.datalist import load_datalist

    if cfg.kind not in ("ratio", "kfold"):
        raise InputError(None, f"--kind must be ratio or kfold, got {cfg.kind!r}")
    if not cfg.arms:
        raise InputError(None, "no arm given (--arms seg,mtl)")
    with folder_lock(cfg.out, "experiment"):
        # once here, rather than the same error from every run; the runs then find every case in the check
        # cache (OUT/checked, beside the shared registration cache OUT/registration)
        dl = load_datalist(cfg.datalist, check_contents=True, check_cache=cfg.out / "checked")
        splits = make_or_load_splits(cfg)
        specs = plan_runs(cfg, splits)
        if cfg.tracking:
            (cfg.out / "mlruns").mkdir(parents=True, exist_ok=True)  # the runs' shared MLflow store
        check_settings(specs, cfg.overwrite)
        class_names = list(dl.classes)
        todo = [s for s in specs if not is_complete(s)]
        print(f"[experiment] {len(splits)} {cfg.kind} split(s) x {len(cfg.arms)} arm(s) = {len(specs)} runs in "
              f"{cfg.out}; {len(specs) - len(todo)} already complete, {len(todo)} to run", flush=True)
        _report(cfg, specs, class_names)
        children = Children()
        slots: list[str | None] = gpu_slots(cfg.gpus, cfg.gpus_per_run) if cfg.gpus else [None] * max(1, cfg.parallel)
        free: list[str | None] = list(slots)
        slot_lock = threading.Lock()
        report_lock = threading.Lock()
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="experiment", unit="run", file=sys.stderr,
                   dynamic_ncols=True, disable=None)  # no bar when stderr is not a terminal (logs)
        failed: list[str] = []
        machine: list[MachineError] = []  # the fault that stopped the experiment
        # --chain: a run waits for the earlier arm's run of its split (submitted before it, so never a
        # deadlock: the pool takes jobs in order, and the awaited one has started or ended)
        ended = {(s.arm, s.split): threading.Event() for s in specs}
        for s in specs:
            if s not in todo:
                ended[(s.arm, s.split)].set()
        by_key = {(s.arm, s.split): s for s in specs}

        def job(spec: RunSpec) -> None:
            try:
                run(spec)
            finally:
                ended[(spec.arm, spec.split)].set()

        def run(spec: RunSpec) -> None:
            if spec.after is not None:
                ended[(spec.after, spec.split)].wait()
            if children.stopping.is_set():  # the experiment is being stopped: start nothing new
                return
            if spec.after is not None and not is_complete(by_key[(spec.after, spec.split)]):
                finish(spec, "failed", 0.0, f"{spec.after}/split{spec.split} did not complete: no model to start from")
                failed.append(f"{spec.arm}/split{spec.split}")
                tqdm.write(f"[experiment] FAILED {spec.arm}/split{spec.split}: {spec.after}/split{spec.split} "
                           "did not complete", file=sys.stdout)
                with report_lock:
                    bar.update(1)
                return
            with slot_lock:
                slot = free.pop(0)
            try:
                ckpt = latest_checkpoint_epoch(spec.run_dir)
                where = f" on GPU {slot}" if cfg.gpus else ""
                resume = f", resuming after epoch {ckpt}" if ckpt else ""
                tqdm.write(f"[experiment] start {spec.arm}/split{spec.split} ({spec.epochs or '?'} epochs{resume})"
                           f"{where}", file=sys.stdout)
                try:
                    state = execute(spec, slot, cfg, children)
                    fault = _child_fault(spec) if state.get("status") == "failed" else None
                except Exception as exc:  # a process that cannot start ...: this run only
                    err = find_input_error(exc)
                    fault = err if isinstance(err, MachineError) else machine_fault(exc)
                    if fault is None:
                        state = finish(spec, "failed", 0.0, f"{type(exc).__name__}: {exc}")
                if fault is not None:  # a full disk or a read-only folder: every run would fail alike
                    machine.append(fault)
                    children.terminate_all()
                    return
            finally:
                with slot_lock:
                    free.append(slot)
            if state.get("status") == "complete":
                tqdm.write(f"[experiment] done  {spec.arm}/split{spec.split}: {_describe(state, spec.run_dir)}",
                           file=sys.stdout)
            elif not children.stopping.is_set():
                failed.append(f"{spec.arm}/split{spec.split}")
                tqdm.write(f"[experiment] FAILED {spec.arm}/split{spec.split}: {state.get('error')}", file=sys.stdout)
            with report_lock:
                try:
                    _report(cfg, specs, class_names)
                except Exception as exc:  # a report problem must not stop the runs
                    tqdm.write(f"[experiment] warning: tables not rewritten: {type(exc).__name__}: {exc}",
                               file=sys.stderr)
                bar.update(1)

        def stop(signum: int, _frame: Any) -> None:
            children.terminate_all()
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        pool = ThreadPoolExecutor(max_workers=len(slots))
        try:
            for f in [pool.submit(job, s) for s in todo]:
                f.result()
        except BaseException:  # stopped (signal, Ctrl-C) or broken: no bundle run outlives the experiment
            children.terminate_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for s, h in previous.items():
                signal.signal(s, h)
            bar.close()
        if machine:
            raise machine[0]
        summary = _report(cfg, specs, class_names)
        _print_summary(summary, cfg.out)
        if failed:
            print(f"[experiment] {len(failed)} run(s) failed: {', '.join(failed)} (see their log.txt); re-run the "
                  "same command to retry them", flush=True)
        return 1 if failed else 0


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None or v != v else (f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}")

    for arm, a in summary["arms"].items():
        print(f"[experiment] {arm}: {a['n_splits']}/{a['n_planned']} runs, test Dice {f(a['test_dice_mean'])} "
              f"(sd {f(a['test_dice_sd'])}), val Dice {f(a['val_dice_mean'])}, test balanced accuracy "
              f"{f(a['test_balanced_accuracy_mean'])} (sd {f(a['test_balanced_accuracy_sd'])})")
    for c in summary["comparisons"]:
        s = c["splits"]
        print(f"[experiment] mtl - {c['single_task_arm']} on {c['metric']}: mean {f(s['mean_difference'])} "
              f"[95% CI {f(s['ci95'][0])}, {f(s['ci95'][1])}] over {s['n']} splits, Wilcoxon p {f(s['wilcoxon_p'])}, "
              f"t-test p {f(s['ttest_p'])}; over {c['cases']['n']} test cases Wilcoxon p {f(c['cases']['wilcoxon_p'])}")
    print(f"[experiment] tables: {out / 'results.csv'}, {out / 'cases.csv'}, {out / 'summary.md'}, "
          f"{out / 'summary.png'}; tensorboard --logdir {out / 'runs'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline experiment ...`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m pipeline experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="datalist (JSON or CSV) of the whole cohort")
    p.add_argument("--out", required=True, help="experiment folder (splits, runs, tables)")
    p.add_argument("--overlays", nargs="*", default=[], help="overlays after train.json, e.g. configs/paper.json")
    p.add_argument("--kind", choices=("ratio", "kfold"), default="ratio",
                   help="ratio: repeated seeded train/validation/test splits; kfold: K folds, each the test part once")
    p.add_argument("--repeats", type=int, default=6, help="repeated 70/15/15 splits (kind ratio)")
    p.add_argument("--folds", type=int, default=5, help="folds (kind kfold)")
    p.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"), help="split fractions (kind ratio; default 0.7 0.15 0.15)")
    p.add_argument("--train-cases", type=int, default=None,
                   help="train on only N of each split's training cases (nested seeded subsets; validation and "
                        "test unchanged): one point of a learning curve")
    p.add_argument("--arms", default="seg,mtl", help="comma-separated: seg, cls, mtl or name=overlay.json")
    p.add_argument("--chain", nargs="*", default=[], metavar="ARM=EARLIER_ARM",
                   help="staged training: ARM's training starts from EARLIER_ARM's model of the same split "
                        "(--init_from); EARLIER_ARM comes before ARM in --arms")
    p.add_argument("--seed", type=int, default=0, help="split seed; split k trains with seed + k")
    p.add_argument("--epochs", type=int, default=None, help="override the overlays' epochs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--parallel", type=int, default=1, help="runs at a time on CPU (cores shared)")
    group.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs each run trains on (torchrun + multi_gpu_train.json; batch_size is per GPU)")
    p.add_argument("--tracking", choices=("mlflow",), default=None,
                   help="log every run to OUT/mlruns/mlflow.db, one MLflow experiment, runs named <arm>/split<k>")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra bundle overrides key=value")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose settings changed")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel must be at least 1")
    gpus = [g.strip() for g in a.gpus.split(",") if g.strip()]
    if a.gpus_per_run < 1 or (a.gpus_per_run > 1 and len(gpus) < a.gpus_per_run):
        p.error(f"--gpus-per-run {a.gpus_per_run} needs at least that many ids in --gpus (got {len(gpus)})")
    cfg = ExperimentConfig(datalist=Path(a.datalist), out=Path(a.out), overlays=list(a.overlays), kind=a.kind,
                           repeats=a.repeats, folds=a.folds, train_cases=a.train_cases,
                           ratios=tuple(a.ratios),
                           arms=[x.strip() for x in a.arms.split(",") if x.strip()], seed=a.seed, epochs=a.epochs,
                           parallel=a.parallel, gpus=gpus, gpus_per_run=a.gpus_per_run, tracking=a.tracking,
                           overrides=list(a.overrides), overwrite=a.overwrite, chain=parse_chain(a.chain))
    return run_experiment(cfg)
