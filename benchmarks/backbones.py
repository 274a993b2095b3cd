"""Every backbone side by side: parameters, training seconds per iteration and peak memory at the
demo size (and the paper size with ``--paper``, meant for a GPU), and, with ``--datalist``, the
held-out Dice and balanced accuracy after the demo's training budget. Prints one Markdown table;
not a test.

    python benchmarks/backbones.py [--device cpu|cuda] [--iters 4] [--paper]
    python benchmarks/backbones.py --datalist COHORT/datalist.json --out work/backbones [--epochs N]

Speed: one training step (forward, the multi-task loss, backward, Adam) on random tensors of the
config's batch (``batch_size x num_samples`` patches of ``patch_size``), the median of ``--iters``
after one warm-up step, each backbone in a fresh process so that its peak memory is its own (CPU:
the peak RSS increase, VmHWM; CUDA: ``torch.cuda.max_memory_allocated``).

Accuracy: the experiment runner (``python -m pipeline experiment``, one 70/15/15 split, the demo
overlay) with one arm per backbone (``mtl`` is SegResNet); an interrupted benchmark resumes there.
The 2-D mode's rows are not here yet (it is not built).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERLAYS = {"segresnet": None, "basic_unet": "configs/backbone_basic_unet.json", "unet": "configs/backbone_unet.json",
            "attention_unet": "configs/backbone_attention_unet.json",
            "swin_unetr": "configs/backbone_swinunetr.json"}


def speed_one(backbone: str, size: str, device: str, iters: int) -> dict:
    """Params, s/iter and peak memory of one backbone (run in this process: call it in a fresh one)."""
    import torch
    from monai.bundle import ConfigParser

    from benchmarks.train_step import peak_mb
    from pipeline.losses import MultiTaskLoss

    files = [str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / f"configs/{size}.json")]
    if OVERLAYS[backbone]:
        files.append(str(ROOT / OVERLAYS[backbone]))
    p = ConfigParser()
    p.read_config(files)
    dev = torch.device(device)
    net = p.get_parsed_content("network_def").to(dev).train()
    patch = [int(s) for s in p.get_parsed_content("patch_size")]
    batch = int(p.get_parsed_content("batch_size")) * int(p.get_parsed_content("num_samples"))
    channels = int(p.get_parsed_content("in_channels")) + int(p.get_parsed_content("coord_channels"))
    loss_fn = MultiTaskLoss(cls_weight=0.3)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *patch, generator=g).to(dev)
    target = {"label": (torch.rand(batch, 1, *patch, generator=g) > 0.9).float().to(dev),
              "class": torch.arange(batch).remainder(3).to(dev), "has_label": torch.ones(batch, device=dev),
              "has_class": torch.ones(batch, device=dev), "image": x}
    base = peak_mb(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), target).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t)
    peak = peak_mb(dev) - (0.0 if dev.type == "cuda" else base)
    return {"backbone": backbone, "size": size, "params": sum(q.numel() for q in net.parameters()),
            "s_per_iter": statistics.median(times), "peak_mb": peak, "batch": batch, "patch": patch}


def speed_table(device: str, iters: int, sizes: list[str]) -> list[dict]:
    rows = []
    for size in sizes:
        for backbone in OVERLAYS:
            code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.backbones import speed_one; "
                    f"print('RESULT ' + json.dumps(speed_one({backbone!r}, {size!r}, {device!r}, {iters})))")
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"[backbones] {backbone} at {size}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(line[0][7:]))
            r = rows[-1]
            print(f"[backbones] {backbone:15s} {size}: {r['params'] / 1e6:.2f} M params, {r['s_per_iter']:.2f} s/iter, "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
    return rows


def accuracy(datalist: str, out: str, epochs: int | None) -> dict[str, dict]:
    """Run (or resume) the experiment with one arm per backbone; its results by backbone."""
    arms = ",".join("mtl" if o is None else f"{b}={o}" for b, o in OVERLAYS.items())
    cmd = [sys.executable, "-m", "pipeline", "experiment", "--datalist", datalist, "--out", out, "--repeats", "1",
           "--overlays", "configs/demo.json", "--arms", arms]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(Path(out) / "results.csv", encoding="utf-8") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    return {b: rows.get("mtl" if o is None else b, {}) for b, o in OVERLAYS.items()}


def _f(v: object, digits: int = 3) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--paper", action="store_true", help="also time the paper size (a GPU's job)")
    ap.add_argument("--datalist", default=None, help="train each backbone on this cohort (demo overlay)")
    ap.add_argument("--out", default="work/backbones", help="the experiment's folder (with --datalist)")
    ap.add_argument("--epochs", type=int, default=None, help="override the demo's epochs (with --datalist)")
    a = ap.parse_args()
    speed = speed_table(a.device, a.iters, ["demo", "paper"] if a.paper else ["demo"])
    acc = accuracy(a.datalist, a.out, a.epochs) if a.datalist else {}
    print(f"\n| backbone | dims | params (M) | s/iter at demo size ({a.device}) | peak memory (MB) | "
          "held-out Dice | held-out bal. acc. | minutes to train + evaluate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in (r for r in speed if r["size"] == "demo"):
        m = acc.get(r["backbone"], {})
        minutes = _f(float(m["seconds"]) / 60, 1) if m.get("seconds") else "n/a"
        print(f"| {r['backbone']} | 3-D | {r['params'] / 1e6:.2f} | {r['s_per_iter']:.2f} | {r['peak_mb']:.0f} | "
              f"{_f(m.get('test_dice'))} | {_f(m.get('test_balanced_accuracy'))} | {minutes} |")
    for r in (r for r in speed if r["size"] == "paper"):
        print(f"| {r['backbone']} (paper size) | 3-D | {r['params'] / 1e6:.2f} | {r['s_per_iter']:.2f} | "
              f"{r['peak_mb']:.0f} | | | |")
    print(f"\nbatch {speed[0]['batch'] if speed else '?'} patches of {speed[0]['patch'] if speed else '?'} per "
          "step; Dice / balanced accuracy on one split's held-out cases (one seed: an anecdote)")


if __name__ == "__main__":
    main()
