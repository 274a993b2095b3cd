"""Seconds per training iteration and peak memory: multi-task network vs plain SegResNet, at the
``paper.json`` and ``demo.json`` sizes, plus patches per second from the data pipeline on cached
volumes. Prints a table; not a test.

    python benchmarks/train_step.py [--device cpu|cuda] [--iters 3] [--skip-paper] [--amp]

Sizes come from the bundle configs themselves (network_def, patch_size, batch_size x num_samples),
so the figures follow any change made there. On CPU, peak memory is the process's peak RSS
increase (ru_maxrss); on CUDA, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.losses import MultiTaskLoss  # noqa: E402


def parse(overlay: str) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / "configs" / overlay)])
    return p


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(net: torch.nn.Module, multitask: bool, batch: int, patch: list[int], device: torch.device,
               amp: bool, iters: int) -> tuple[float, float]:
    """Median seconds per Adam step (forward, loss, backward, step) and peak memory in MB."""
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    loss = MultiTaskLoss(cls_weight=0.3 if multitask else 0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    x = torch.randn(batch, 1, *patch, device=device)
    y = (torch.rand(batch, 1, *patch, device=device) > 0.9).float()
    cls = torch.randint(0, 3, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_mb(device)
    times = []
    for i in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = net(x)
            seg, logits = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            total = loss.compute(seg, logits, y, cls)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up (allocations, cudnn autotune)
            times.append(time.perf_counter() - t)
    mem = peak_mb(device) - (0 if device.type == "cuda" else base)
    return sorted(times)[len(times) // 2], mem


def build_networks(overlay: str) -> tuple[dict[str, torch.nn.Module], int, list[int]]:
    """The multi-task network of the config and the plain SegResNet of the same sizes."""
    p = parse(overlay)
    patch = list(p.get_parsed_content("patch_size"))
    batch = int(p.get_parsed_content("batch_size")) * int(p.get_parsed_content("num_samples"))
    mt = p.get_parsed_content("network_def")
    plain = SegResNet(init_filters=mt.init_filters, in_channels=1, out_channels=1,
                      blocks_down=tuple(mt.blocks_down), blocks_up=tuple(mt.blocks_up))
    return {"MultiTaskSegResNet": mt, "SegResNet (plain)": plain}, batch, patch


def measure_one(overlay: str, name: str, device: torch.device, iters: int, amp: bool, batch: int) -> dict:
    nets, _, patch = build_networks(overlay)
    torch.manual_seed(0)
    s, mem = time_steps(nets[name], name.startswith("MultiTask"), batch, patch, device, amp, iters)
    return {"s": s, "mem": mem, "params": sum(q.numel() for q in nets[name].parameters()), "patch": patch}


def bench_networks(device: torch.device, iters: int, amp: bool, overlays: list[str], cpu_paper_batch: int = 1) -> None:
    """On CPU each measurement runs in a fresh process: the peak RSS (ru_maxrss) only ever grows,
    so in one process the second network's peak would hide behind the first one's."""
    print(f"{'config':8} {'network':24} {'params':>11} {'batch x patch':>22} {'s/iter':>8} {'peak MB':>9}")
    for overlay in overlays:
        nets, batch, patch = build_networks(overlay)
        if overlay == "paper.json" and device.type == "cpu" and cpu_paper_batch:
            batch = cpu_paper_batch  # the study's batch of 4 x 128x128x112 needs > 24 GB in fp32 on CPU
        rows = []
        for name in nets:
            if device.type == "cpu":
                cmd = [sys.executable, __file__, "--one", overlay, name, str(batch), "--iters", str(iters),
                       "--device", "cpu"]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            else:
                r = measure_one(overlay, name, device, iters, amp, batch)
            rows.append(r["s"])
            print(f"{overlay[:-5]:8} {name:24} {r['params']:>11,} {f'{batch} x {patch}':>22} {r['s']:>8.3f} "
                  f"{r['mem']:>9.0f}", flush=True)
        print(f"{'':8} classifier overhead: {100 * (rows[0] / rows[1] - 1):+.1f} % time per iteration")


def bench_data(iters: int) -> None:
    """Patches/s from the demo's training DataLoader once the deterministic part is cached."""
    from pipeline.data.phantom import make_cohort

    with tempfile.TemporaryDirectory() as tmp:
        dl_path = make_cohort(Path(tmp) / "cohort", cases=6, seed=0, spacing=2.0, space="atlas").datalist
        p = parse("demo.json")
        p["datalist"] = str(dl_path)
        p["output_dir"] = str(Path(tmp) / "run")
        p["already_registered"] = True
        p["num_workers"] = 0
        loader = p.get_parsed_content("train#dataloader")
        for _ in loader:  # first pass fills the PersistentDataset cache
            pass
        n, t = 0, time.perf_counter()
        for _ in range(iters):
            for batch in loader:
                n += batch["image"].shape[0]
        dt = time.perf_counter() - t
        print(f"data pipeline (demo, cached, 0 workers): {n / dt:.1f} patches/s "
              f"({p.get_parsed_content('patch_size')} patches, random crop + flips + intensity)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--amp", action="store_true", help="autocast float16 + grad scaling (CUDA only)")
    ap.add_argument("--skip-paper", action="store_true", help="only the demo sizes (paper sizes take minutes on CPU)")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--cpu-paper-batch", type=int, default=1,
                    help="batch for the paper sizes on CPU (0 = the config's 4; needs > 24 GB)")
    ap.add_argument("--one", nargs=3, metavar=("OVERLAY", "NETWORK", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.one:  # one measurement in this (fresh) process, as JSON
        print(json.dumps(measure_one(a.one[0], a.one[1], device, a.iters, a.amp, int(a.one[2]))))
        return
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, amp {a.amp}")
    bench_networks(device, a.iters, a.amp, ["demo.json"] + ([] if a.skip_paper else ["paper.json"]), a.cpu_paper_batch)
    if not a.skip_data:
        bench_data(a.iters)


if __name__ == "__main__":
    main()
