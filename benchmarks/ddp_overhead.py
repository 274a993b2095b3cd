"""The cost of ``multi_gpu_train.json``'s wrapper on one device: seconds per training step of the
config's network as is, and wrapped by :func:`pipeline.runtime.distributed.wrap` (DistributedDataParallel,
synchronised head batch norm) in a one-process group, in turn, on the same synthetic batches.
Prints both and the overhead in %; not a test.

    torchrun --standalone --nproc_per_node=1 benchmarks/ddp_overhead.py [--overlay paper.json] [--device cuda] [--iters 20]
    python benchmarks/ddp_overhead.py ...            # makes its own one-process group

With one process DDP still registers its gradient hooks and buckets and runs an all-reduce on each
bucket (a copy with one rank); the head's batch norm goes through the all-reduce path. The batch is
the config's ``batch_size x num_samples`` patches of ``patch_size``; AMP as the config on that device.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.losses import MultiTaskLoss  # noqa: E402
from pipeline.runtime import distributed  # noqa: E402
from pipeline.runtime.precision import amp_kwargs, resolve_amp_dtype  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overlay", default="paper.json", help="configs/<overlay> after train.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20, help="timed steps of each variant")
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    device = torch.device(a.device)
    distributed.init_process_group(device)

    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / "configs" / a.overlay)])
    torch.manual_seed(0)
    plain = parser.get_parsed_content("network_def").to(device)
    wrapped = distributed.wrap(copy.deepcopy(plain), device)
    patch = list(parser.get_parsed_content("patch_size"))
    batch = int(parser.get_parsed_content("batch_size")) * int(parser.get_parsed_content("num_samples"))
    channels = int(parser.get_parsed_content("in_channels")) + int(parser.get_parsed_content("coord_channels"))
    use_amp = device.type == "cuda" and bool(parser.get_parsed_content("amp"))
    dtype = amp_kwargs(resolve_amp_dtype(parser.get_parsed_content("amp_dtype"), device)).get("dtype", torch.float32)
    loss_fn = MultiTaskLoss(cls_weight=0.3)
    x = torch.randn(batch, channels, *patch, device=device)
    target = {"label": (torch.rand(batch, 1, *patch, device=device) > 0.9).float(),
              "class": torch.arange(batch, device=device) % 3}
    opts = {id(n): torch.optim.Adam(n.parameters(), lr=1e-4) for n in (plain, wrapped)}

    def step(net: torch.nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            out = net(x)
        loss = loss_fn(out, target)
        opts[id(net)].zero_grad(set_to_none=True)
        loss.backward()
        opts[id(net)].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step(plain), step(wrapped)
    times: dict[str, list[float]] = {"plain": [], "ddp": []}
    for _ in range(a.iters):  # in turn, so drifts (clocks, other load) hit both alike
        times["plain"].append(step(plain))
        times["ddp"].append(step(wrapped))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    p, d = statistics.median(times["plain"]), statistics.median(times["ddp"])
    print(f"[ddp_overhead] {name}, {a.overlay}: batch {batch} x {channels} x {patch}, amp {use_amp} ({dtype}), "
          f"{a.iters} steps each")
    print(f"[ddp_overhead] plain network {p * 1000:.1f} ms/step, DDP-wrapped (1 process) {d * 1000:.1f} ms/step: "
          f"overhead {100 * (d / p - 1):+.1f} %")
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
