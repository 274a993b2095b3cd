"""Checkpoints of a training run: atomic writing, finding the newest complete one, resuming.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing atomically and deleting a
  superseded checkpoint only after its successor is on disk; it also keeps the best key metric
  in resumable checkpoints.
- :func:`latest_checkpoint` / :func:`is_complete_checkpoint`: the newest whole ``checkpoint_epoch=N.pt``.
- :func:`checkpoint_objects` / :func:`resumable`: what a resumable checkpoint holds and what of
  it a given file can restore.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from pipeline.io.errors import machine_fault

__all__ = ["AtomicCheckpointSaver", "ResumeLoader", "TrainerScaler", "latest_checkpoint", "is_complete_checkpoint", "checkpoint_objects",
           "resumable", "resume_point", "attach_resumer"]

_EPOCH_RE = re.compile(r"epoch=(\d+)")
logger = logging.getLogger(__name__)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (zip with its central directory and
    a ``data.pkl`` record), without unpickling it. A file cut short by a kill or a full disk is not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> str | None:
    """Path of the newest complete ``<prefix>_epoch=N.pt`` in ``ckpt_dir`` (highest N), or ``None``.

    A truncated file (a run killed while writing it outside the atomic
    write, or a full disk) is skipped with a warning, so the run resumes from the newest checkpoint that loads.
    """
    d = Path(ckpt_dir)
    found = sorted(((int(m.group(1)), p) for p in d.glob(f"{prefix}*.pt") if (m := _EPOCH_RE.search(p.name))),
                   reverse=True)
    for _, path in found:
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("checkpoint %s is incomplete (cut short while written?): skipped for resuming", path)
    return None


class _SaveThenRemoveDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes atomically and deletes a superseded checkpoint only
    after its successor is on disk.

    Ignite's ``Checkpoint`` asks its saver to remove the oldest file *before* writing the new
    one, and MONAI's saver writes in place: a run killed during the save of epoch N+1 was left
    with no complete checkpoint at all. Here removals are deferred until the next write has
    succeeded. ``filename`` fixes the file name (as MONAI's own saver does for ``model.pt``).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        written = self.filename or filename
        try:
            super().__call__(checkpoint, written, metadata)  # temporary file + os.replace, on rank 0 only
        except Exception as exc:  # a full disk, a read-only folder: one line naming the file, the last one kept
            fault = machine_fault(exc, self.dirname / written)
            if fault is not None:
                raise fault from exc
            raise
        if idist.get_rank() != self.save_on_rank:
            self._superseded.clear()
            return
        for old in self._superseded:
            if old != written and (self.dirname / old).exists():
                (self.dirname / old).unlink()
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        # a fixed-name file is replaced atomically by the next write: nothing to delete
        if self.filename is None:
            self._superseded.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are written atomically (temporary file in the same
    folder, then ``os.replace``) and whose previous checkpoint is deleted only once the new one
    is complete, so a run killed at any moment can resume from a whole checkpoint.

    It also has ``state_dict`` (MONAI's saver only has ``load_state_dict``): the best key metric
    seen so far, so a resumed run keeps ``model.pt`` unless it beats the score from before the
    interruption (put the saver in the resumable checkpoint, :func:`checkpoint_objects`).

    Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _SaveThenRemoveDiskSaver(ckpt.save_handler.dirname,
                                                             getattr(ckpt.save_handler, "filename", None))
        if self._key_metric_checkpoint is not None:
            # a NaN key metric (no validation case could be scored) would stay "best" for ever, as
            # nothing compares greater than NaN: count it as the worst score instead
            score = self._key_metric_checkpoint.score_function

            def finite_score(engine: Engine) -> float:
                value = score(engine)
                return -math.inf if value != value else value

            self._key_metric_checkpoint.score_function = finite_score

    def state_dict(self) -> dict[str, Any]:
        """The key-metric tracking list (``{"_saved": [(score, filename)]}``), or ``{}``."""
        return dict(self._key_metric_checkpoint.state_dict()) if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


class ResumeLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for resuming a trainer from an epoch-level checkpoint: after
    loading, the run goes on at the start of the next epoch with *this* run's epoch length.

    Ignite restores the epoch length saved in the checkpoint; a run resumed with another number
    of processes (``multi_gpu_train.json``: each process sees 1/N of the cases) or another
    training set would otherwise run epochs of the old length and count epochs wrongly.
    Same arguments as ``CheckpointLoader``.
    """

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        loader = getattr(engine, "data_loader", None)
        length = len(loader) if loader is not None and hasattr(loader, "__len__") else None
        if length and engine.state.epoch_length != length:
            logger.info("resuming at epoch %d with %d iterations per epoch (the checkpoint's run had %s)",
                        engine.state.epoch, length, engine.state.epoch_length)
            engine.state.epoch_length = length
            engine.state.iteration = engine.state.epoch * length


class TrainerScaler:
    """The trainer's AMP grad scaler as a checkpoint object.

    MONAI's trainer creates its ``GradScaler`` in ``run()``, after the config built the checkpoint
    objects, so the scaler itself cannot be listed there: this stand-in reads ``trainer.scaler``
    each time a checkpoint is written or loaded (the loader runs on ``STARTED``, inside ``run()``,
    when the scaler exists). An fp16 run then resumes with its loss scale instead of 65536.
    """

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state:  # a disabled scaler (no CUDA) saved and loads nothing
            scaler.load_state_dict(state)


def checkpoint_objects(trainer: Engine, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       lr_scheduler: Any = None, best_model_saver: AtomicCheckpointSaver | None = None,
                       loss: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a resumable checkpoint holds: network, optimizer, scheduler, AMP grad scaler (when
    AMP is on), the trainer's state (epoch, iteration), the best key metric so far (the
    validation ``best_model_saver``, so ``model.pt`` stays the best of the whole run) and the loss
    when it has a state (the task weights of ``mtl_method: uncertainty`` and ``gradnorm``)."""
    objs: dict[str, Any] = {"network": network, "optimizer": optimizer, "trainer": trainer}
    if loss is not None and loss.state_dict():
        objs["loss"] = loss
    if lr_scheduler is not None:
        objs["lr_scheduler"] = lr_scheduler
    if best_model_saver is not None:
        objs["best_model"] = best_model_saver
    if getattr(trainer, "amp", False):
        objs["scaler"] = TrainerScaler(trainer)
    return objs


def resumable(checkpoint: str | Path | None, objects: dict[str, Any]) -> dict[str, Any]:
    """The part of ``objects`` (:func:`checkpoint_objects`) that ``checkpoint`` holds.

    A checkpoint from a run with AMP off has no grad scaler, one from an older version no
    best-model state: those objects start fresh (with a warning) instead of the resume failing.
    """
    if checkpoint is None:
        return objects
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    missing = [k for k in objects if k not in saved]
    if "network" in missing or "trainer" in missing:
        from pipeline.io.errors import InputError

        raise InputError(checkpoint, "not a resumable training checkpoint (no network or trainer state)")
    if missing:
        logger.warning("checkpoint %s holds no %s: starting those fresh", checkpoint, missing)
    return {k: v for k, v in objects.items() if k in saved}


def resume_point(ckpt_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint a run resumes from: the latest complete one when ``resume``, else ``None``."""
    return latest_checkpoint(ckpt_dir) if resume else None


def attach_resumer(resumer: Any, trainer: Engine) -> None:
    """Attach the resume loader (``None`` when the run starts afresh) to the trainer."""
    if resumer is not None:
        resumer.attach(trainer)
