"""Planning an experiment of :mod:`pipeline.experiment.runner`: its splits (made once, then only re-read),
its runs (split x arm, each with its two bundle command lines) and the fingerprint of each run's
settings (config files' contents, overrides, split), by which a re-run tells a finished run from
one whose settings changed."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io.errors import InputError

__all__ = ["ROOT", "TRAIN", "EVALUATE", "ARMS", "ExperimentConfig", "RunSpec", "arm_name", "make_or_load_splits",
           "plan_runs", "check_chain", "parse_chain", "check_settings", "read_json"]

ROOT = Path(__file__).resolve().parents[2]
TRAIN = "bundles/plgg_mtl/configs/train.json"
EVALUATE = "bundles/plgg_mtl/configs/evaluate.json"
MULTI_GPU = "bundles/plgg_mtl/configs/multi_gpu_train.json"
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
    train_cases: int | None = None
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    arms: list[str] = field(default_factory=lambda: ["seg", "mtl"])
    seed: int = 0
    epochs: int | None = None
    parallel: int = 1
    gpus: list[str] = field(default_factory=list)
    gpus_per_run: int = 1
    tracking: str | None = None
    overrides: list[str] = field(default_factory=list)
    overwrite: bool = False
    python: str = sys.executable
    #: ``{arm: earlier arm}``: the arm's training starts from the earlier arm's model of the same split
    chain: dict[str, str] = field(default_factory=dict)


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
    train_fingerprint: str = ""
    after: str | None = None  # the arm whose model of this split the training starts from (--chain)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def arm_overlay(arm: str) -> tuple[str, str | None]:
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
    from pipeline.data.splits import (
        fewer_training_cases,
        kfold_split,
        load_splits,
        repeated_ratio_splits,
        save_splits,
    )

    path = cfg.out / "splits.json"
    dl = load_datalist(cfg.datalist)
    wanted = {"kind": cfg.kind, "seed": cfg.seed, "n": cfg.repeats if cfg.kind == "ratio" else cfg.folds}
    if cfg.kind == "ratio":
        wanted["ratios"] = [float(r) for r in cfg.ratios]
    if cfg.train_cases:
        wanted["train_cases"] = cfg.train_cases
    if path.is_file():
        splits = load_splits(path)
        info = json.loads(path.read_text(encoding="utf-8"))
        have = {"kind": info.get("kind"), "seed": info.get("seed"), "n": len(splits)}
        if cfg.kind == "ratio":
            have["ratios"] = [float(r) for r in info.get("ratios", [])]
        if info.get("train_cases"):
            have["train_cases"] = info["train_cases"]
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
    if cfg.train_cases:  # validation and test as in the full experiment of the same seed
        splits = fewer_training_cases(splits, cfg.train_cases, cfg.seed)
        extra["train_cases"] = cfg.train_cases
    save_splits(path, splits, kind=cfg.kind, seed=cfg.seed, datalist=str(dl.path), **extra)
    return splits


def _config_value(configs: list[str], key: str) -> int | None:
    """A plain integer setting (``epochs``, ``val_interval``) of the merged configs, or None when it
    is not a plain number or the configs do not parse."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config([str(ROOT / c) if not Path(c).is_absolute() else c for c in configs])
        value = parser.get(key)
    except Exception:  # a broken overlay: the run itself fails and reports it, the others go on
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_runs(cfg: ExperimentConfig, splits: list[dict]) -> list[RunSpec]:
    """Every split x arm, split-major (both arms of split 0 first, so a partial table is paired)."""
    overlays = [_config_path(o) for o in cfg.overlays]
    arms = [arm_overlay(a) for a in cfg.arms]
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise InputError(None, f"an arm is named twice in --arms {','.join(cfg.arms)} (each arm has its own folder)")
    overrides: list[str] = []
    for kv in cfg.overrides:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InputError(None, f"--set takes key=value, got {kv!r}")
        if value and not value.startswith(("$", "@", "%")) and Path(value).exists():
            value = str(Path(value).resolve())  # the runs start in the repository root, not here
        overrides += [f"--{key}", value]
    check_chain(cfg.chain, names)
    specs = []
    for k, split in enumerate(splits):
        train_fps: dict[str, str] = {}
        for name, arm_file in arms:
            configs = [TRAIN, *overlays] + ([_config_path(arm_file)] if arm_file else [])
            run_dir = (cfg.out / "runs" / name / f"split{k}").resolve()
            common = ["--datalist", str(cfg.datalist.resolve()), "--output_dir", str(run_dir),
                      "--log_dir", str(run_dir), "--split_file", str((cfg.out / "splits.json").resolve()),
                      "--split_index", str(k)]
            if not any(o == "--registration_cache" for o in overrides):
                # one registration cache for every run (keyed by file content, atlas and settings):
                # a native-space cohort is registered once, not once per run
                common += ["--registration_cache", str((cfg.out / "registration").resolve())]
            common += ["--seed", str(cfg.seed + k)]
            if cfg.epochs:
                common += ["--epochs", str(cfg.epochs)]
                interval = _config_value(configs, "val_interval")
                if interval and interval > cfg.epochs:  # else no validation would ever run: no model.pt
                    common += ["--val_interval", str(cfg.epochs)]
            common += overrides
            source = cfg.chain.get(name)
            start = ["--init_from", str((cfg.out / "runs" / source / f"split{k}" / "models" / "model.pt").resolve())
                     ] if source else []
            bundle = [cfg.python, "-m", "monai.bundle", "run"]
            train_cmd = [*bundle, "training", "--config_file", _config_list(configs), *common, *start]
            if cfg.gpus_per_run > 1:  # one process per GPU of the run's slot (CUDA_VISIBLE_DEVICES)
                train_cmd = [cfg.python, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={cfg.gpus_per_run}", *bundle[1:], "training", "--config_file",
                             _config_list([*configs, MULTI_GPU]), *common, *start]
            eval_configs = [TRAIN, EVALUATE, *configs[1:]]
            eval_cmd = [*bundle, "--config_file", _config_list(eval_configs), *common]
            if cfg.tracking:  # every run in one MLflow experiment, named <arm>/split<k> (not in the fingerprint)
                track = ["--tracking", cfg.tracking, "--tracking_uri",
                         f"sqlite:///{(cfg.out / 'mlruns' / 'mlflow.db').resolve()}",
                         "--experiment_name", cfg.out.resolve().name, "--run_name", f"{name}/split{k}"]
                train_cmd, eval_cmd = [*train_cmd, *track], [*eval_cmd, *track]
            # what the run's result depends on (config contents, including the files they reach with
            # %file#id, the datalist's content, the seed, the overrides and the split); not where the
            # experiment folder, the datalist or an overlay lies, so a moved folder keeps its runs
            train_part = {"configs": config_contents(configs), "datalist": _sha256(cfg.datalist),
                          "seed": cfg.seed + k, "args": common[common.index("--seed") + 2:],
                          "split": {p: split[p] for p in ("train", "val", "test")}}
            if cfg.gpus_per_run > 1:  # batch_size is per process: the global batch is batch_size x processes
                train_part["processes"] = cfg.gpus_per_run
            if source:  # a changed earlier stage retrains this one
                train_part["from"] = train_fps[source]
            train_fp = train_fps[name] = _digest(train_part)
            fingerprint = _digest({"train": train_fp, "evaluate": config_contents(eval_configs)})
            epochs = cfg.epochs or _config_value(configs, "epochs")
            specs.append(RunSpec(name, k, split.get("name", f"split{k}"), run_dir, train_cmd, eval_cmd, epochs,
                                 fingerprint, train_fp, after=source))
    return specs


def check_chain(chain: dict[str, str], names: list[str]) -> None:
    """Each ``arm: source`` of ``--chain`` names two arms of ``--arms``, the source earlier (it trains
    first within a split); raises :class:`InputError` otherwise."""
    for target, source in chain.items():
        for arm in (target, source):
            if arm not in names:
                raise InputError(None, f"--chain {target}={source}: {arm!r} is not an arm of --arms "
                                       f"({', '.join(names)})")
        if names.index(source) >= names.index(target):
            raise InputError(None, f"--chain {target}={source}: {source!r} must come before {target!r} in --arms "
                                   "(it trains first in each split)")


def parse_chain(items: list[str]) -> dict[str, str]:
    """``["stage2=stage1", ...]`` -> ``{"stage2": "stage1"}``; raises :class:`InputError` on a malformed item."""
    chain: dict[str, str] = {}
    for item in items:
        target, sep, source = item.partition("=")
        if not sep or not target or not source or target in chain:
            raise InputError(None, f"--chain takes ARM=EARLIER_ARM once per arm, got {item!r}")
        chain[target] = source
    return chain


_REFERENCE = re.compile(r"%([^%#'\"\s]+\.json)#")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def config_contents(configs: list[str]) -> list[tuple[str, str]]:
    """(file name, SHA-256) of each config in order, followed by every file they reference with
    MONAI's ``%path#id`` macro (recursively; such paths are relative to the repository root)."""
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    todo = [(ROOT / c if not Path(c).is_absolute() else Path(c)).resolve() for c in configs]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        out.append((path.name if path.parent != ROOT / "bundles" / "plgg_mtl" / "configs" else f"bundle:{path.name}",
                    _sha256(path)))
        for ref in _REFERENCE.findall(path.read_text(encoding="utf-8", errors="replace")):
            target = ROOT / ref
            if target.is_file():
                todo.append(target.resolve())
    return out


def gpu_slots(gpus: list[str], per_run: int = 1) -> list[str]:
    """The GPU groups runs take turns on: ``["0,1", "2,3"]`` for GPUs 0-3 with 2 per run (each a
    ``CUDA_VISIBLE_DEVICES`` value). GPUs left over (5 GPUs, 2 per run) are not used."""
    per_run = max(1, per_run)
    return [",".join(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]


def _config_list(files: list[str]) -> str:
    """MONAI's list form of ``--config_file``: ``['a.json','b.json']``."""
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def check_settings(specs: list[RunSpec], overwrite: bool) -> None:
    """Runs whose stored fingerprint differs are refused in one clear error, unless ``overwrite``:
    then a run whose training settings are unchanged (only the evaluation's changed) keeps its
    trained model and is evaluated again, any other is removed and trained from scratch."""
    import shutil


    changed = [s for s in specs if (s.run_dir / "run.json").is_file()
               and read_json(s.run_dir / "run.json").get("fingerprint") not in (None, s.fingerprint)]
    if changed and not overwrite:
        names = ", ".join(f"{s.arm}/split{s.split}" for s in changed[:6])
        raise InputError(changed[0].run_dir.parents[1], f"the settings of {len(changed)} run(s) changed since they ran "
                         f"({names}): pass --overwrite to redo them, or use another --out")
    for s in changed:
        state = read_json(s.run_dir / "run.json")
        if state.get("train_fingerprint") == s.train_fingerprint and state.get("trained"):
            from pipeline.io.imageio import write_text_atomic

            state.update(status="evaluate again", fingerprint=s.fingerprint)
            write_text_atomic(s.run_dir / "run.json", json.dumps(state, indent=1))
        else:
            shutil.rmtree(s.run_dir)


def arm_name(arm: str) -> str:
    """The folder name of an ``--arms`` entry (``seg`` or ``name=overlay.json`` -> ``name``)."""
    return arm_overlay(arm)[0]
