"""Executing the runs of :mod:`pipeline.experiment.runner`: each run's state file (``run.json``), its
bundle subprocesses (training, then evaluation) with their output in ``log.txt``, and the guards
that keep two processes from training the same run (one experiment process per folder; bundle
subprocesses stop when the experiment process stops, even when it is killed)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.experiment.plan import ROOT, ExperimentConfig, RunSpec, read_json

__all__ = ["Children", "execute", "finish", "is_complete", "shell_line", "latest_checkpoint_epoch"]

def _write_state(spec: RunSpec, **state: Any) -> None:
    from pipeline.io.imageio import write_text_atomic

    doc = {**read_json(spec.run_dir / "run.json"), **state, "arm": spec.arm, "split": spec.split,
           "fingerprint": spec.fingerprint, "train_fingerprint": spec.train_fingerprint}
    write_text_atomic(spec.run_dir / "run.json", json.dumps(doc, indent=1))


def is_complete(spec: RunSpec) -> bool:
    state = read_json(spec.run_dir / "run.json")
    return (state.get("status") == "complete" and state.get("fingerprint") == spec.fingerprint
            and (spec.run_dir / "metrics.json").is_file())


def _last_error(log: Path) -> str:
    """The most telling line of a failed run's log: the last ``error:`` / exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.lower().startswith("error") or "Error:" in ln or "Exception:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


class Children:
    """The running bundle subprocesses, so a stopped experiment stops them too (no orphan keeps
    training into a folder that the next call of the experiment resumes)."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # re-entrant: a second signal may arrive inside terminate_all
        self.stopping = threading.Event()

    def add(self, proc: subprocess.Popen) -> None:
        """Track ``proc``; terminate it at once if the experiment is already stopping."""
        with self.lock:
            self.procs.add(proc)
            if self.stopping.is_set():
                proc.terminate()

    def terminate_all(self, grace: float = 30.0) -> None:
        """SIGTERM every running bundle subprocess (each saves nothing half-written: checkpoints are
        atomic); SIGKILL those still alive after ``grace`` seconds (in a background thread)."""
        self.stopping.set()
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()

        def kill_late() -> None:
            deadline = time.time() + grace
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.time()))
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()

        if procs:
            threading.Thread(target=kill_late, daemon=True).start()


def _find_prctl() -> Any:
    # resolved once in the parent: the child, forked from a threaded process, must not dlopen
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _find_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the experiment process dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def shell_line(cmd: list[str]) -> str:
    """``cmd`` as one shell line to paste; a config list like ``['a.json','b.json']`` is put in double
    quotes (readable) instead of shlex's single-quote escaping."""
    def quote(arg: str) -> str:
        if "'" in arg and not any(ch in arg for ch in '"$`\\!'):
            return f'"{arg}"'
        return shlex.quote(arg)

    return " ".join(quote(a) for a in cmd)


def _run_step(cmd: list[str], log: Path, env: dict[str, str], children: Children) -> int:
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ {shell_line(cmd)}\n")
        fh.flush()
        if children.stopping.is_set():
            return -signal.SIGTERM
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if _PRCTL is not None else None)
        children.add(proc)
        try:
            return proc.wait()
        finally:
            with children.lock:
                children.procs.discard(proc)


def execute(spec: RunSpec, slot: str | None, cfg: ExperimentConfig, children: Children) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists) and evaluate one run; return its state."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "command.txt").write_text(
        f"# {spec.arm}, split {spec.split} ({spec.split_name}); run from the repository root:\ncd {shlex.quote(str(ROOT))}\n"
        f"# training (resumes from models/checkpoint_epoch=N.pt when present)\n{shell_line(spec.train_cmd)}\n"
        f"# evaluation of models/model.pt on the split's test cases -> metrics.json, cases.csv\n{shell_line(spec.eval_cmd)}\n", encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    elif cfg.parallel > 1:  # share the cores instead of every run grabbing all of them
        threads = str(max(1, (os.cpu_count() or 1) // cfg.parallel))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    state = read_json(spec.run_dir / "run.json")
    seconds = float(state.get("seconds") or 0.0)
    t0 = time.time()
    log = spec.run_dir / "log.txt"
    _write_state(spec, status="running", epochs=spec.epochs, device=slot, error="",
                 attempts=int(state.get("attempts", 0)) + 1)
    if not state.get("trained") or state.get("train_fingerprint") != spec.train_fingerprint:
        rc = _run_step(spec.train_cmd, log, env, children)
        if rc != 0:
            return finish(spec, "stopped" if children.stopping.is_set() else "failed", seconds + time.time() - t0,
                           f"training exited with {rc}: {_last_error(log)} (see {log})")
        _write_state(spec, trained=True)
    rc = _run_step(spec.eval_cmd, log, env, children)
    if rc != 0:
        return finish(spec, "stopped" if children.stopping.is_set() else "failed", seconds + time.time() - t0,
                       f"evaluation exited with {rc}: {_last_error(log)} (see {log})")
    if cfg.tracking:
        tag_tracked_runs(cfg.out, spec)
    return finish(spec, "complete", seconds + time.time() - t0, "")


def tag_tracked_runs(out: Path, spec: RunSpec) -> None:
    """Tag the MLflow runs of ``spec`` (training and evaluation, named ``<arm>/split<k>``) with
    ``arm``, ``split`` and ``split_name``, so the experiment's runs can be grouped and filtered."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(out.resolve().name)
    if experiment is None:
        return
    for run in client.search_runs([experiment.experiment_id],
                                  filter_string=f"attributes.run_name = '{spec.arm}/split{spec.split}'"):
        for key, value in (("arm", spec.arm), ("split", str(spec.split)), ("split_name", spec.split_name)):
            client.set_tag(run.info.run_id, key, value)


def finish(spec: RunSpec, status: str, seconds: float, error: str) -> dict[str, Any]:
    _write_state(spec, status=status, seconds=round(seconds, 1), error=error)
    return read_json(spec.run_dir / "run.json")


def latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the newest complete resumable checkpoint of a run, or None."""
    from pipeline.training.checkpoints import latest_checkpoint

    path = latest_checkpoint(run_dir / "models")
    if path is None:
        return None
    digits = Path(path).stem.rsplit("=", 1)[-1]
    return int(digits) if digits.isdigit() else None


