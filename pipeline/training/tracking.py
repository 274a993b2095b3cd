"""Experiment tracking with MONAI's own bundle option: ``--tracking mlflow``.

MONAI patches an ``MLFlowHandler`` into the trainer's and the validator's handlers (rank 0 only).
What this bundle adds, because its trainer does not decollate its output (one dict per batch,
which MONAI's default handler cannot read: ``from_engine(["loss"])`` returns a tuple for it):

- :class:`TrackingOutput`, the last trainer handler: after every other handler has read an
  iteration's output, it leaves ``[{"loss": {loss, loss_seg, loss_cls, lr}}]``, so the MLflow
  handler logs every loss component and the learning rate per iteration;
- :func:`sqlite_store`: the store ``OUTPUT_DIR/mlruns/mlflow.db`` (config ``tracking_uri``; MLflow
  3 no longer writes plain-file stores). Browse it with
  ``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlruns/mlflow.db``.

Validation (training) and evaluation metrics are logged per epoch by MONAI's validator handler;
``max_epochs`` and ``epoch_length`` as parameters; the whole executed config as an artifact.
"""

from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events

from pipeline.training.engines import loss_output

__all__ = ["TrackingOutput", "sqlite_store"]


def sqlite_store(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/mlruns/mlflow.db`` (folder created)."""
    folder = Path(output_dir).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


class TrackingOutput:
    """Trainer handler, attached last: replaces the iteration's output by
    ``[{"loss": {"loss", "loss_seg", "loss_cls", "lr"}}]`` (plain floats) for the tracking
    handlers MONAI appends after it. The handlers before it (statistics, TensorBoard) have read
    the original output by then; nothing reads it later."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, dict) and "loss" in out:
            engine.state.output = [{"loss": loss_output(out)}]


def log_params_with(handlers: list, params: dict) -> None:
    """Give ``params`` (the run's key settings) to every MLflow handler among ``handlers`` (those
    ``--tracking mlflow`` appended), which logs them as the run's parameters when it starts; no-op
    without tracking. Values are logged as strings (lists as JSON)."""
    import json

    from monai.handlers import MLFlowHandler

    flat = {k: json.dumps(v) if isinstance(v, list | tuple | dict) else str(v) for k, v in params.items()}
    for handler in handlers or []:
        if isinstance(handler, MLFlowHandler):
            handler.experiment_param = {**(handler.experiment_param or {}), **flat}


def close_runs(handlers: list) -> None:
    """End the MLflow runs of the MLflow handlers among ``handlers`` (status FINISHED). MONAI's
    validator handler, which ``--tracking`` gives an evaluation, never ends its run itself."""
    from monai.handlers import MLFlowHandler

    for handler in handlers or []:
        if isinstance(handler, MLFlowHandler):
            handler.close()
