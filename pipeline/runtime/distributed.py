"""Multi-process training and evaluation (``torchrun``, PyTorch ``DistributedDataParallel``).

What ``bundles/plgg_mtl/configs/multi_gpu_train.json`` needs beyond MONAI and Ignite:

- the process group: :func:`init_process_group` (``nccl`` on CUDA, ``gloo`` on CPU, from the
  device), :func:`local_device` (one GPU per local rank), :func:`destroy_process_group`;
- :func:`wrap` / :func:`unwrap`: the network in ``DistributedDataParallel``, its classifier
  head's batch norm synchronised (:class:`SyncBatchNorm1dOrRunning`);
- one writer: :func:`is_main`, :func:`main_process_first`, :func:`on_main`,
  :func:`handlers_for_this_rank`, :class:`NullSummaryWriter`;
- metrics over every process: :func:`all_reduce_sum` (differentiable, so a loss can be the
  whole batch's) and :func:`gather_in_sampler_order` (the cases of every rank, in the order a
  single process would have seen them).

Without a process group (one process, the default) every function here is a no-op, so the
single-process bundle runs exactly as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed", "rank", "world_size", "is_main", "local_device", "loader_workers", "init_process_group",
    "destroy_process_group", "wrap", "unwrap", "SyncBatchNorm1dOrRunning", "convert_head_batch_norm",
    "all_reduce_sum", "gather_in_sampler_order", "from_main", "main_process_first", "on_main", "barrier",
    "handlers_for_this_rank", "NullSummaryWriter", "summary_writer",
]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def loader_workers(reserve: int = 2, low: int = 2, high: int = 16) -> int:
    """DataLoader workers for this process: the CPUs it may run on (its affinity mask, which batch
    schedulers and containers set; ``os.cpu_count()`` counts the whole machine), shared among the
    processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``), less ``reserve`` for the
    process itself, kept within ``[low, high]``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cpus = os.cpu_count() or 4
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(low, min(high, cpus // local - reserve))


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process on each node), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group(device: torch.device | str | None = None) -> None:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...):
    ``nccl`` for a CUDA device (which is made the current one), ``gloo`` otherwise. A second call
    is a no-op. Raises ``RuntimeError`` with the launch command when not started by torchrun."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("multi_gpu_train.json needs torchrun: torchrun --standalone --nproc_per_node=N -m "
                           "monai.bundle run training --config_file \"[..., 'bundles/plgg_mtl/configs/"
                           "multi_gpu_train.json']\" ...")
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    if dist.get_rank() > 0:  # one console: the engines' progress messages come from rank 0
        for name in ("ignite", "monai", "pipeline"):
            logging.getLogger(name).setLevel(logging.WARNING)
    else:
        print(f"[distributed] {dist.get_world_size()} process(es), backend {dist.get_backend()}, rank 0 on {device}",
              flush=True)


def destroy_process_group() -> None:
    """Leave the process group once every process got here (no-op without one).

    Two exit hangs seen with gloo (torch 2.13, one run in five each) are avoided: a process that
    left while another was still finishing (rank 0 writing its last file), hence the barrier; and
    a deadlock between the interpreter, which destroys the DDP reducer and with it the process
    group (joining gloo's worker threads while holding the GIL), and a gloo worker thread still
    releasing the barrier's work object (which needs the GIL): the short sleep releases the GIL
    so the workers are idle before anything is destroyed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


class SyncBatchNorm1dOrRunning(nn.BatchNorm1d):
    """Batch norm over the samples of *every* process: the statistics of the whole global batch,
    as one process with the whole batch would compute them, so results do not depend on the
    number of processes. A global batch of one sample falls back to the running statistics (like
    :class:`pipeline.models.networks.BatchNorm1dOrRunning`). Input ``(B, C)``, ``B`` may be 0 on a rank.

    Hand-written because ``torch.nn.SyncBatchNorm`` runs on GPUs only (CPU tensors with the
    ``gloo`` backend raise) and raises on a global batch of one. Mean and variance are two passes
    (sum, then squared deviations) in float64 through :func:`all_reduce_sum`, which is
    differentiable, so the gradient is the whole batch's too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_local = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        xd = x.double()
        sums = all_reduce_sum(torch.cat([xd.sum(0), n_local]))
        n = float(sums[-1].detach())
        if n < 2:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        mean = sums[:-1] / n
        var = all_reduce_sum(((xd - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            m = 0.1 if self.momentum is None else float(self.momentum)
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        y = (xd - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.double() + self.bias.double()
        return y.to(x.dtype)


def convert_head_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d`` of ``module`` by :class:`SyncBatchNorm1dOrRunning` (weights and
    running statistics kept), in place; returns ``module``. The encoder's group norm is per
    sample and needs no synchronisation."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, SyncBatchNorm1dOrRunning):
            new = SyncBatchNorm1dOrRunning(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(next(child.buffers(), torch.zeros(0)).device))
        else:
            convert_head_batch_norm(child)
    return module


def wrap(network: nn.Module, device: torch.device | str | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``network`` (already on its device) with its head's batch norm synchronised, in
    ``DistributedDataParallel`` when a process group is running; unchanged otherwise. Buffers
    are not re-broadcast before every forward pass: the only ones that change (the head's
    batch-norm running statistics) are computed from the global batch, equal on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return network
    head = getattr(network, "classifier", None)
    if head is not None:
        convert_head_batch_norm(head)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    ids = [device] if device.type == "cuda" else None
    # torch >= 2.13 names it forward_sync_buffers (buffers are still broadcast from rank 0 at wrapping)
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(network, device_ids=ids, **{**no_sync, **ddp_kwargs})


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else itself)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel | nn.DataParallel) else network


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is the sum of the gradients over processes (hand-written:
    ``torch.distributed.nn.functional.all_reduce`` is deprecated, its replacement not differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over every process, differentiably (itself in one process).

    With every rank's loss computed from such sums, each rank's loss is the whole batch's, and
    DDP's gradient average equals one process's gradient on the whole batch."""
    return _AllReduceSum.apply(x) if is_distributed() else x


def gather_in_sampler_order(items: Sequence[Any]) -> list[Any]:
    """Every rank's per-iteration ``items`` (picklable, e.g. CPU tensors or row dicts), in the order
    one process would have produced them; the local list in one process.

    Assumes the round-robin split of ``monai.data.DistributedSampler(shuffle=False)`` (rank ``r``
    gets cases ``r, r + N, r + 2N, ...``) with one case per iteration, as in the bundle's
    validation and evaluation, so a mean over the result adds in the single-process order.
    """
    if not is_distributed():
        return list(items)
    per_rank: list[list[Any]] = [[] for _ in range(world_size())]
    dist.all_gather_object(per_rank, list(items))
    out = []
    for j in range(max(len(p) for p in per_rank)):
        out += [p[j] for p in per_rank if j < len(p)]
    return out


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; ``value`` itself in one process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it writes: split file, caches); the others wait, then run it
    (and read what rank 0 wrote). A no-op in one process."""
    if is_distributed() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main():
            dist.barrier()


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 only, the others waiting for it; returns its result on rank 0,
    ``None`` elsewhere."""
    try:
        return fn(*args, **kwargs) if is_main() else None
    finally:
        barrier()


# Handlers that drive the run or take part in collectives run on every rank; the others (writers,
# loggers, progress bars) only on rank 0.
_EVERY_RANK = ("EpochSeeds", "ValidationHandler", "LrScheduleHandler", "LossTermsHandler", "EvaluationReport",
               "CheckpointLoader", "AtomicCheckpointSaver", "CheckpointSaver", "EarlyStopHandler")


def handlers_for_this_rank(handlers: Sequence[Any] | None) -> list[Any]:
    """The engine handlers this process attaches: all of them on rank 0; on the other ranks those
    that drive the run or gather across processes (the epoch's seeds, validation, learning-rate schedule, loss terms,
    the evaluation report, checkpoints, whose files only rank 0 writes), not those that write or
    print (statistics, TensorBoard, progress bar, history)."""
    handlers = list(handlers or [])
    if is_main():
        return handlers
    return [h for h in handlers if any(c.__name__ in _EVERY_RANK for c in type(h).__mro__)]


class NullSummaryWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` on ranks > 0: every method does nothing and no
    file is created (a real writer creates its event file when constructed)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str) -> Any:
    """TensorBoard's ``SummaryWriter`` on the process that writes, a :class:`NullSummaryWriter` on the others."""
    if not is_main():
        return NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)
