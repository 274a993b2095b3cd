"""Seconds per training iteration and peak memory: multi-task network vs plain SegResNet, at the
``paper.json`` and ``demo.json`` sizes, plus patches per second from the data pipeline on cached
volumes. Prints a table; not a test.

    python benchmarks/train_step.py [--device cpu|cuda] [--iters 5] [--skip-paper] [--amp]
    python benchmarks/train_step.py --precision [--overlay paper.json] [--device cuda] [--iters 20]

``--precision`` times the config's multi-task network in fp32, float16 autocast + grad scaling,
bfloat16 autocast and compiled bfloat16 (``torch.compile``, default mode) side by side, one step of
each in turn, and prints s/iter, images/s, peak memory and each variant's ratio to fp32 (compile
warm-up reported apart). On CPU, autocast runs in bfloat16 only (float16 is skipped) and peak
memory is not measured (the process's peak RSS only grows).

Sizes come from the bundle configs themselves (network_def, patch_size, batch_size x num_samples),
so the figures follow any change made there. On CPU, peak memory is the process's peak RSS
increase (VmHWM, each network in a fresh process); on CUDA, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
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

from pipeline.models.losses import MultiTaskLoss  # noqa: E402


def parse(overlay: str) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / "configs" / overlay)])
    return p


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM: the peak RSS of this process image. ru_maxrss would do, but after fork + exec a child
    # starts from its parent's peak, which hides the child's own when the parent is larger.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def input_channels(net: torch.nn.Module) -> int:
    """Channels a network reads: its image channels plus the tumour head's atlas coordinates."""
    return int(getattr(net, "image_channels", 1)) + int(getattr(net, "coord_channels", 0))


class Stepper:
    """One network's training step (forward, loss, backward, Adam step) on fixed random data."""

    def __init__(self, net: torch.nn.Module, multitask: bool, batch: int, patch: list[int], device: torch.device,
                 amp: bool) -> None:
        self.net = net.to(device).train()
        self.device, self.amp = device, amp and device.type == "cuda"
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-4)
        self.loss = MultiTaskLoss(cls_weight=0.3 if multitask else 0.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.x = torch.randn(batch, input_channels(self.net), *patch, device=device)
        self.y = (torch.rand(batch, 1, *patch, device=device) > 0.9).float()
        self.cls = torch.randint(0, 3, (batch,), device=device)

    def forward_loss(self) -> torch.Tensor:
        """Forward pass and loss (the part the precision variants change)."""
        with torch.autocast(self.device.type, enabled=self.amp):
            out = self.net(self.x)
            seg, logits = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            return self.loss.compute(seg, logits, self.y, self.cls)["loss"]

    def step(self) -> float:
        """Seconds of one training step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        total = self.forward_loss()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def build_networks(overlay: str) -> tuple[dict[str, torch.nn.Module], int, list[int]]:
    """The multi-task network of the config and the plain SegResNet of the same sizes."""
    p = parse(overlay)
    patch = list(p.get_parsed_content("patch_size"))
    batch = int(p.get_parsed_content("batch_size")) * int(p.get_parsed_content("num_samples"))
    mt = p.get_parsed_content("network_def")
    plain = SegResNet(init_filters=mt.init_filters, in_channels=1, out_channels=1,
                      blocks_down=tuple(mt.blocks_down), blocks_up=tuple(mt.blocks_up))
    return {"MultiTaskSegResNet": mt, "SegResNet (plain)": plain}, batch, patch


def training_flops(net: torch.nn.Module, patch: list[int]) -> float:
    """FLOPs of one forward + backward pass at batch 1, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).to("meta")
    with FlopCounterMode(display=False) as counter:
        out = net(torch.randn(1, input_channels(net), *patch, device="meta"))
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs if o is not None).backward()
    return float(counter.get_total_flops())


def peak_memory_one(overlay: str, name: str, device: torch.device, amp: bool, batch: int) -> float:
    """Peak memory (MB) of training steps of one network, in a process of its own on CPU."""
    nets, _, patch = build_networks(overlay)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_mb(device)
    stepper = Stepper(nets[name], name.startswith("MultiTask"), batch, patch, device, amp)
    stepper.step()
    stepper.step()
    return peak_mb(device) - (0 if device.type == "cuda" else base)


def bench_networks(device: torch.device, iters: int, amp: bool, overlays: list[str], cpu_paper_batch: int = 1) -> None:
    """Time per step with the two networks' steps interleaved (so a drift of the machine's speed
    hits both alike), the head's share of the FLOPs, and peak memory. On CPU each memory figure
    comes from a fresh process: the peak RSS only ever grows."""
    print(f"{'config':8} {'network':24} {'params':>11} {'batch x patch':>22} {'s/iter':>8} {'peak MB':>9} {'GFLOP/step':>11}")
    for overlay in overlays:
        nets, batch, patch = build_networks(overlay)
        if overlay == "paper.json" and device.type == "cpu" and cpu_paper_batch:
            batch = cpu_paper_batch  # the study's batch of 4 x 128x128x112 needs > 24 GB in fp32 on CPU
        torch.manual_seed(0)
        flops = {name: training_flops(net, patch) * batch for name, net in nets.items()}
        steppers = {name: Stepper(net, name.startswith("MultiTask"), batch, patch, device, amp)
                    for name, net in nets.items()}
        times: dict[str, list[float]] = {name: [] for name in nets}
        order = list(steppers)
        for r in range(iters + 1):
            for name in (order if r % 2 else order[::-1]):  # A B, B A, ...: neither always goes first
                t = steppers[name].step()
                if r:  # the first round warms up (allocations, cudnn autotune)
                    times[name].append(t)
        del steppers
        medians = {}
        for name, net in nets.items():
            if device.type == "cpu":
                cmd = [sys.executable, __file__, "--memory-of", overlay, name, str(batch), "--device", "cpu"]
                mem = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            else:
                mem = peak_memory_one(overlay, name, device, amp, batch)
            medians[name] = statistics.median(times[name])
            n = sum(q.numel() for q in net.parameters())
            print(f"{overlay[:-5]:8} {name:24} {n:>11,} {f'{batch} x {patch}':>22} {medians[name]:>8.3f} {mem:>9.0f} "
                  f"{flops[name] / 1e9:>11.1f}", flush=True)
        mt, plain = medians["MultiTaskSegResNet"], medians["SegResNet (plain)"]
        extra = flops["MultiTaskSegResNet"] / flops["SegResNet (plain)"] - 1
        print(f"{'':8} classifier overhead: {100 * (mt / plain - 1):+.1f} % time per iteration (median of {iters} "
              f"interleaved steps each), {100 * extra:.5f} % FLOPs")


def bench_data(iters: int) -> None:
    """Patches/s from the demo's training DataLoader once the deterministic part is cached."""
    from pipeline.data.phantom.build import make_cohort

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


class PrecisionStepper(Stepper):
    """A training step in one precision: ``fp32``, ``fp16`` (autocast + grad scaling), ``bf16``
    (autocast, no scaling) or ``bf16+compile`` (``torch.compile`` of the network)."""

    def __init__(self, net: torch.nn.Module, variant: str, batch: int, patch: list[int], device: torch.device) -> None:
        super().__init__(net, True, batch, patch, device, amp=False)
        self.variant = variant
        self.dtype = {"fp16": torch.float16}.get(variant, torch.bfloat16)
        self.autocast = variant != "fp32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant == "fp16")
        self.model = torch.compile(self.net) if variant.endswith("compile") else self.net

    def forward_loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            seg, logits, _ = self.model(self.x)
            return self.loss.compute(seg.float(), logits.float(), self.y, self.cls)["loss"]


def bench_precision(device: torch.device, overlay: str, iters: int, batch: int | None) -> None:
    """fp32 / fp16 / bf16 / compiled bf16 steps of the config's network, interleaved."""
    p = parse(overlay)
    patch = list(p.get_parsed_content("patch_size"))
    batch = batch or int(p.get_parsed_content("batch_size")) * int(p.get_parsed_content("num_samples"))
    variants = ["fp32", "bf16", "bf16+compile"] if device.type == "cpu" else ["fp32", "fp16", "bf16", "bf16+compile"]
    steppers, warmup, peaks = {}, {}, {}
    for v in variants:
        torch.manual_seed(0)
        net = p.get_parsed_content("network_def", instantiate=True, lazy=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        steppers[v] = PrecisionStepper(net, v, batch, patch, device)
        warmup[v] = steppers[v].step() + steppers[v].step()  # compile happens here
        if device.type == "cuda":
            peaks[v] = torch.cuda.max_memory_allocated(device) / 2**30
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(iters):
        for v in (variants if r % 2 else variants[::-1]):
            times[v].append(steppers[v].step())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"precision, {overlay}: {name}, batch {batch} x {patch}, median of {iters} interleaved steps")
    print(f"{'variant':14} {'s/iter':>8} {'images/s':>9} {'peak GB':>8} {'speed vs fp32':>14} {'memory vs fp32':>15} "
          f"{'warm-up s':>10}")
    base = statistics.median(times["fp32"])
    for v in variants:
        m = statistics.median(times[v])
        mem = f"{peaks[v]:>8.1f}" if v in peaks else f"{'-':>8}"
        ratio = f"{peaks[v] / peaks['fp32']:>15.2f}" if v in peaks else f"{'-':>15}"
        print(f"{v:14} {m:>8.3f} {batch / m:>9.1f} {mem} {base / m:>13.2f}x {ratio} {warmup[v]:>10.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per network (after one warm-up)")
    ap.add_argument("--amp", action="store_true", help="autocast float16 + grad scaling (CUDA only)")
    ap.add_argument("--skip-paper", action="store_true", help="only the demo sizes (paper sizes take minutes on CPU)")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--cpu-paper-batch", type=int, default=1,
                    help="batch for the paper sizes on CPU (0 = the config's 4; needs > 24 GB)")
    ap.add_argument("--precision", action="store_true", help="fp32 / fp16 / bf16 / compiled bf16 side by side")
    ap.add_argument("--overlay", default="paper.json", help="overlay of --precision (configs/NAME)")
    ap.add_argument("--batch", type=int, default=0, help="batch of --precision (0: the config's)")
    ap.add_argument("--memory-of", nargs=3, metavar=("OVERLAY", "NETWORK", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.memory_of:  # one memory measurement in this (fresh) process
        print(peak_memory_one(a.memory_of[0], a.memory_of[1], device, a.amp, int(a.memory_of[2])))
        return
    if a.precision:
        bench_precision(device, a.overlay, a.iters, a.batch or None)
        return
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, amp {a.amp}")
    bench_networks(device, a.iters, a.amp, ["demo.json"] + ([] if a.skip_paper else ["paper.json"]), a.cpu_paper_batch)
    if not a.skip_data:
        bench_data(a.iters)


if __name__ == "__main__":
    main()
