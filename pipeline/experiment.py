"""The study's experiment in one resumable command: repeated patient splits (or k-fold), single-task
against multi-task, every run an ordinary bundle run, one table with paired tests.

    python -m pipeline experiment --datalist DL --out DIR [--overlays configs/paper.json ...]
        [--repeats 6 | --kind kfold --folds 5] [--arms seg,mtl] [--seed S] [--epochs N]
        [--parallel K | --gpus 0,1,...] [--set key=value ...] [--overwrite]

Arms (:data:`ARMS`): ``seg`` the segmentation alone (``configs/single_task.json``), ``cls`` the
classifier alone on the shared encoder (``configs/classify_only.json``), ``mtl`` both; a custom
arm is ``name=overlay.json``. The splits are written once to ``DIR/splits.json`` (seeded,
patient-level, stratified by class: :mod:`pipeline.data.splits`) and never changed by a re-run.
Every split x arm is a training (``train.json`` + overlays + the arm's overlay) and an evaluation
of its best checkpoint on the split's test cases, as subprocesses, in ``DIR/runs/<arm>/split<k>/``
with the exact command lines in ``command.txt`` and their output in ``log.txt``. Both arms of a
split share the split and the seed (``seed + k``), so they differ only in the branch.

Re-running the command skips finished runs whose settings (config files' contents, overrides,
split) are unchanged, resumes interrupted ones from their last checkpoint, and refuses runs whose
settings changed unless ``--overwrite`` (which redoes them from scratch). Results and the summary
(:mod:`pipeline.experiment_report`) are rewritten after every finished run. One failed run is
reported and the others go on; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

__all__ = ["ARMS", "ExperimentConfig", "RunSpec", "make_or_load_splits", "plan_runs", "run_experiment", "main"]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "bundles/plgg_mtl/configs/train.json"
EVALUATE = "bundles/plgg_mtl/configs/evaluate.json"
ARMS: dict[str, str | None] = {"seg": "configs/single_task.json", "cls": "configs/classify_only.json", "mtl": None}


@dataclass
class ExperimentConfig:
    """What ``python -m pipeline experiment`` was asked (see the module docstring)."""

    datalist: Path
    out: Path
    overlays: list[str] = field(default_factory=list)
    kind: str = "ratio"
    repeats: int = 6
    folds: int = 5
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    arms: list[str] = field(default_factory=lambda: ["seg", "mtl"])
    seed: int = 0
    epochs: int | None = None
    parallel: int = 1
    gpus: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    overwrite: bool = False
    python: str = sys.executable


@dataclass
class RunSpec:
    """One split x arm: its folder, its two command lines and the fingerprint of its settings."""

    arm: str
    split: int
    split_name: str
    run_dir: Path
    train_cmd: list[str]
    eval_cmd: list[str]
    epochs: int | None
    fingerprint: str


def _arm_overlay(arm: str) -> tuple[str, str | None]:
    """``seg`` / ``cls`` / ``mtl`` or ``name=overlay.json`` -> (name, overlay or None)."""
    if "=" in arm:
        name, path = arm.split("=", 1)
        if not name.isidentifier():
            raise InputError(None, f"arm name {name!r} must be a plain word (it names DIR/runs/<arm>)")
        return name, path
    if arm not in ARMS:
        raise InputError(None, f"unknown arm {arm!r}: use {', '.join(ARMS)} or name=overlay.json")
    return arm, ARMS[arm]


def _config_path(path: str) -> str:
    """A config file as the bundle command gets it: repository-relative when it lies in the repository
    (commands run from there), else absolute. Raises when it does not exist."""
    p = Path(path)
    for candidate in (p, ROOT / p):
        if candidate.is_file():
            resolved = candidate.resolve()
            try:
                return str(resolved.relative_to(ROOT))
            except ValueError:
                return str(resolved)
    raise InputError(p, "overlay not found")


def make_or_load_splits(cfg: ExperimentConfig) -> list[dict]:
    """``DIR/splits.json``: made once (seeded, stratified), re-read on every later call.

    Raises:
        InputError: the file exists but was made with other settings or for other patients.
    """
    from pipeline.data.datalist import load_datalist
    from pipeline.data.splits import kfold_split, load_splits, repeated_ratio_splits, save_splits

    path = cfg.out / "splits.json"
    dl = load_datalist(cfg.datalist)
    wanted = {"kind": cfg.kind, "seed": cfg.seed, "n": cfg.repeats if cfg.kind == "ratio" else cfg.folds}
    if path.is_file():
        splits = load_splits(path)
        info = json.loads(path.read_text())
        have = {"kind": info.get("kind"), "seed": info.get("seed"), "n": len(splits)}
        if have != wanted:
            raise InputError(path, f"made with {have}, this call asks for {wanted}: the splits of an experiment "
                                   "never change; use another --out, or delete the folder to start over")
        unknown = {i for s in splits for part in ("train", "val", "test") for i in s[part]} - set(dl.by_id())
        if unknown:
            raise InputError(path, f"{len(unknown)} patient id(s) of the splits are not in {cfg.datalist}: "
                                   f"{sorted(unknown)[:5]}")
        return splits
    if cfg.kind == "ratio":
        splits = repeated_ratio_splits(dl.cases, cfg.repeats, cfg.ratios, cfg.seed)
        extra: dict[str, Any] = {"ratios": list(cfg.ratios)}
    else:
        splits = kfold_split(dl.cases, cfg.folds, cfg.seed)
        extra = {"folds": cfg.folds}
    save_splits(path, splits, kind=cfg.kind, seed=cfg.seed, datalist=str(dl.path), **extra)
    return splits


def _val_interval(configs: list[str]) -> int | None:
    """``val_interval`` of the merged configs (a plain number in ours), or None if not a number."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config([str(ROOT / c) if not Path(c).is_absolute() else c for c in configs])
        value = parser.get("val_interval")
    except Exception:  # a broken overlay: the run itself fails and reports it, the others go on
        return None
    return value if isinstance(value, int) else None


def plan_runs(cfg: ExperimentConfig, splits: list[dict]) -> list[RunSpec]:
    """Every split x arm, split-major (both arms of split 0 first, so a partial table is paired)."""
    overlays = [_config_path(o) for o in cfg.overlays]
    arms = [_arm_overlay(a) for a in cfg.arms]
    overrides: list[str] = []
    for kv in cfg.overrides:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InputError(None, f"--set takes key=value, got {kv!r}")
        overrides += [f"--{key}", value]
    specs = []
    for k, split in enumerate(splits):
        for name, arm_overlay in arms:
            configs = [TRAIN, *overlays] + ([_config_path(arm_overlay)] if arm_overlay else [])
            run_dir = (cfg.out / "runs" / name / f"split{k}").resolve()
            common = ["--datalist", str(cfg.datalist.resolve()), "--output_dir", str(run_dir),
                      "--log_dir", str(run_dir), "--split_file", str((cfg.out / "splits.json").resolve()),
                      "--split_index", str(k), "--seed", str(cfg.seed + k)]
            if cfg.epochs:
                common += ["--epochs", str(cfg.epochs)]
                interval = _val_interval(configs)
                if interval and interval > cfg.epochs:  # else no validation would ever run: no model.pt
                    common += ["--val_interval", str(cfg.epochs)]
            common += overrides
            bundle = [cfg.python, "-m", "monai.bundle", "run"]
            train_cmd = [*bundle, "training", "--config_file", _config_list(configs), *common]
            eval_configs = [TRAIN, EVALUATE, *configs[1:]]
            eval_cmd = [*bundle, "--config_file", _config_list(eval_configs), *common]
            contents = {c: hashlib.sha256((ROOT / c if not Path(c).is_absolute() else Path(c)).read_bytes()).hexdigest()
                        for c in eval_configs}
            # what the run's result depends on; not the experiment folder's own paths, so a moved or
            # copied experiment folder keeps its finished runs
            settings = {"configs": contents, "config_order": eval_configs, "datalist": str(cfg.datalist.resolve()),
                        "seed": cfg.seed + k, "args": common[common.index("--seed") + 2:],
                        "split": {p: split[p] for p in ("train", "val", "test")}}
            fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
            specs.append(RunSpec(name, k, split.get("name", f"split{k}"), run_dir, train_cmd, eval_cmd, cfg.epochs,
                                 fingerprint))
    return specs


def _config_list(files: list[str]) -> str:
    """MONAI's list form of ``--config_file``: ``['a.json','b.json']``."""
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(spec: RunSpec, **state: Any) -> None:
    from pipeline.imageio import write_text_atomic

    doc = {**_read_json(spec.run_dir / "run.json"), **state, "arm": spec.arm, "split": spec.split,
           "fingerprint": spec.fingerprint}
    write_text_atomic(spec.run_dir / "run.json", json.dumps(doc, indent=1))


def _is_complete(spec: RunSpec) -> bool:
    state = _read_json(spec.run_dir / "run.json")
    return (state.get("status") == "complete" and state.get("fingerprint") == spec.fingerprint
            and (spec.run_dir / "metrics.json").is_file())


def _last_error(log: Path) -> str:
    """The most telling line of a failed run's log: the last ``error:`` / exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.lower().startswith("error") or "Error:" in ln or "Exception:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


class _Children:
    """The running bundle subprocesses, so a stopped experiment stops them too (no orphan keeps
    training into a folder that the next call of the experiment resumes)."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def terminate_all(self) -> None:
        self.stopping.set()
        with self.lock:
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the experiment process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def shell_line(cmd: list[str]) -> str:
    """``cmd`` as one shell line to paste; a config list like ``['a.json','b.json']`` is put in double
    quotes (readable) instead of shlex's single-quote escaping."""
    def quote(arg: str) -> str:
        if "'" in arg and not any(ch in arg for ch in '"$`\\!'):
            return f'"{arg}"'
        return shlex.quote(arg)

    return " ".join(quote(a) for a in cmd)


def _run_step(cmd: list[str], log: Path, env: dict[str, str], children: _Children) -> int:
    with log.open("a") as fh:
        fh.write(f"\n$ {shell_line(cmd)}\n")
        fh.flush()
        if children.stopping.is_set():
            return -signal.SIGTERM
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        with children.lock:
            children.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with children.lock:
                children.procs.discard(proc)


def _execute(spec: RunSpec, slot: str | None, cfg: ExperimentConfig, children: _Children) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists) and evaluate one run; return its state."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "command.txt").write_text(
        f"# {spec.arm}, split {spec.split} ({spec.split_name}); run from the repository root:\ncd {shlex.quote(str(ROOT))}\n"
        f"# training (resumes from models/checkpoint_epoch=N.pt when present)\n{shell_line(spec.train_cmd)}\n"
        f"# evaluation of models/model.pt on the split's test cases -> metrics.json, cases.csv\n{shell_line(spec.eval_cmd)}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    elif cfg.parallel > 1:  # share the cores instead of every run grabbing all of them
        threads = str(max(1, (os.cpu_count() or 1) // cfg.parallel))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    state = _read_json(spec.run_dir / "run.json")
    seconds = float(state.get("seconds") or 0.0)
    t0 = time.time()
    log = spec.run_dir / "log.txt"
    _write_state(spec, status="running", epochs=spec.epochs, device=slot, attempts=int(state.get("attempts", 0)) + 1)
    if not state.get("trained") or state.get("fingerprint") != spec.fingerprint:
        rc = _run_step(spec.train_cmd, log, env, children)
        if rc != 0:
            return _finish(spec, "stopped" if children.stopping.is_set() else "failed", seconds + time.time() - t0,
                           f"training exited with {rc}: {_last_error(log)} (see {log})")
        _write_state(spec, trained=True)
    rc = _run_step(spec.eval_cmd, log, env, children)
    if rc != 0:
        return _finish(spec, "stopped" if children.stopping.is_set() else "failed", seconds + time.time() - t0,
                       f"evaluation exited with {rc}: {_last_error(log)} (see {log})")
    return _finish(spec, "complete", seconds + time.time() - t0, "")


def _finish(spec: RunSpec, status: str, seconds: float, error: str) -> dict[str, Any]:
    _write_state(spec, status=status, seconds=round(seconds, 1), error=error)
    return _read_json(spec.run_dir / "run.json")


def _check_settings(specs: list[RunSpec], overwrite: bool) -> None:
    """Runs whose stored fingerprint differs: removed with ``overwrite``, else one clear error."""
    import shutil

    changed = [s for s in specs if (s.run_dir / "run.json").is_file()
               and _read_json(s.run_dir / "run.json").get("fingerprint") not in (None, s.fingerprint)]
    if changed and not overwrite:
        names = ", ".join(f"{s.arm}/split{s.split}" for s in changed[:6])
        raise InputError(changed[0].run_dir.parents[1], f"the settings of {len(changed)} run(s) changed since they ran "
                         f"({names}): pass --overwrite to redo them from scratch, or use another --out")
    for s in changed:
        shutil.rmtree(s.run_dir)


@contextlib.contextmanager
def _experiment_lock(out: Path):
    """One experiment process per folder at a time (a second would train the same runs twice)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise InputError(out, f"another experiment process ({fh.read().strip() or 'unknown pid'}) is running "
                                  "in this folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield


def _report(cfg: ExperimentConfig, specs: list[RunSpec], class_names: list[str]) -> dict[str, Any]:
    from pipeline.experiment_report import collect_run, write_reports

    rows, cases = [], []
    for s in specs:
        row, case_rows = collect_run(s.run_dir, s.arm, s.split, s.split_name, class_names)
        rows.append(row)
        cases += case_rows
    info = {"datalist": str(cfg.datalist), "kind": cfg.kind, "n_splits": len({s.split for s in specs}),
            "arms": [_arm_overlay(a)[0] for a in cfg.arms], "overlays": cfg.overlays, "seed": cfg.seed,
            "epochs": cfg.epochs, "overrides": cfg.overrides}
    return write_reports(cfg.out, rows, cases, info["arms"], class_names, info)


def _describe(state: dict[str, Any], run_dir: Path) -> str:
    m = _read_json(run_dir / "metrics.json")
    parts = []
    if m.get("dice") is not None:
        parts.append(f"test Dice {m['dice']:.3f} ({m.get('n_with_mask')} scored)")
    if m.get("balanced_accuracy") is not None:
        parts.append(f"bal. acc. {m['balanced_accuracy']:.3f} ({m.get('n_with_class')} with class)")
    if m.get("n_with_mask") == 0:
        parts.append("no test case with a mask")
    return ", ".join(parts) + f", {float(state.get('seconds') or 0) / 60:.1f} min"


def run_experiment(cfg: ExperimentConfig) -> int:
    """Run (or resume) the whole experiment; returns the exit status (0 all complete, 1 any failed)."""
    from tqdm import tqdm

    from pipeline.data.datalist import load_datalist, validate_datalist

    if cfg.kind not in ("ratio", "kfold"):
        raise InputError(None, f"--kind must be ratio or kfold, got {cfg.kind!r}")
    if not cfg.arms:
        raise InputError(None, "no arm given (--arms seg,mtl)")
    with _experiment_lock(cfg.out):
        dl = load_datalist(cfg.datalist)
        validate_datalist(dl)  # once here, rather than the same error from every run
        splits = make_or_load_splits(cfg)
        specs = plan_runs(cfg, splits)
        _check_settings(specs, cfg.overwrite)
        class_names = list(dl.classes)
        todo = [s for s in specs if not _is_complete(s)]
        print(f"[experiment] {len(splits)} {cfg.kind} split(s) x {len(cfg.arms)} arm(s) = {len(specs)} runs in "
              f"{cfg.out}; {len(specs) - len(todo)} already complete, {len(todo)} to run", flush=True)
        _report(cfg, specs, class_names)
        children = _Children()
        slots: list[str | None] = list(cfg.gpus) if cfg.gpus else [None] * max(1, cfg.parallel)
        free: list[str | None] = list(slots)
        slot_lock = threading.Lock()
        report_lock = threading.Lock()
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="experiment", unit="run", file=sys.stderr,
                   dynamic_ncols=True, disable=None)  # no bar when stderr is not a terminal (logs)
        failed: list[str] = []

        def job(spec: RunSpec) -> None:
            with slot_lock:
                slot = free.pop(0)
            try:
                ckpt = latest_checkpoint_epoch(spec.run_dir)
                where = f" on GPU {slot}" if cfg.gpus else ""
                resume = f", resuming after epoch {ckpt}" if ckpt else ""
                tqdm.write(f"[experiment] start {spec.arm}/split{spec.split} ({cfg.epochs or 'overlay'} epochs{resume})"
                           f"{where}", file=sys.stdout)
                state = _execute(spec, slot, cfg, children)
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
                _report(cfg, specs, class_names)
                bar.update(1)

        def stop(signum: int, _frame: Any) -> None:
            children.terminate_all()
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with ThreadPoolExecutor(max_workers=len(slots)) as pool:
                for f in [pool.submit(job, s) for s in todo]:
                    f.result()
        finally:
            children.terminate_all()
            for s, h in previous.items():
                signal.signal(s, h)
            bar.close()
        summary = _report(cfg, specs, class_names)
        _print_summary(summary, cfg.out)
        if failed:
            print(f"[experiment] {len(failed)} run(s) failed: {', '.join(failed)} (see their log.txt); re-run the "
                  "same command to retry them", flush=True)
        return 1 if failed else 0


def latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the newest complete resumable checkpoint of a run, or None."""
    from pipeline.checkpoints import latest_checkpoint

    path = latest_checkpoint(run_dir / "models")
    if path is None:
        return None
    digits = Path(path).stem.rsplit("=", 1)[-1]
    return int(digits) if digits.isdigit() else None


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

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
    p.add_argument("--kind", choices=("ratio", "kfold"), default="ratio")
    p.add_argument("--repeats", type=int, default=6, help="repeated 70/15/15 splits (kind ratio)")
    p.add_argument("--folds", type=int, default=5, help="folds (kind kfold)")
    p.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15))
    p.add_argument("--arms", default="seg,mtl", help="comma-separated: seg, cls, mtl or name=overlay.json")
    p.add_argument("--seed", type=int, default=0, help="split seed; split k trains with seed + k")
    p.add_argument("--epochs", type=int, default=None, help="override the overlays' epochs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--parallel", type=int, default=1, help="runs at a time on CPU (cores shared)")
    group.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra bundle overrides key=value")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose settings changed")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel must be at least 1")
    cfg = ExperimentConfig(datalist=Path(a.datalist), out=Path(a.out), overlays=list(a.overlays), kind=a.kind,
                           repeats=a.repeats, folds=a.folds, ratios=tuple(a.ratios),
                           arms=[x.strip() for x in a.arms.split(",") if x.strip()], seed=a.seed, epochs=a.epochs,
                           parallel=a.parallel, gpus=[g.strip() for g in a.gpus.split(",") if g.strip()],
                           overrides=list(a.overrides), overwrite=a.overwrite)
    return run_experiment(cfg)
