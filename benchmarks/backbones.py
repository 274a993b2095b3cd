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
The 2-D rows (``mtl2d``, ``cls2d``) time one step on a batch of whole 128 x 128 slices; the 3-D
classifier-alone baselines (``cls_densenet121``, ``cls_resnet18``, ``cls_vit``) are timed and trained
only when named in ``--train``.
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
# The 2-D mode (multi-task and classifier alone) and the 3-D classifier-alone baselines: timed like the
# backbones, trained when named in --train.
EXTRA = {"mtl2d": "configs/mtl2d.json", "cls2d": "configs/cls2d.json",
         "cls_densenet121": "configs/cls_densenet121.json", "cls_resnet18": "configs/cls_resnet18.json",
         "cls_vit": "configs/cls_vit.json"}
ROWS = {**OVERLAYS, **EXTRA}  # every row of the table: name -> overlay (None: the default SegResNet)


def speed_one(backbone: str, size: str, device: str, iters: int) -> dict:
    """Params, s/iter and peak memory of one backbone (run in this process: call it in a fresh one)."""
    import torch
    from monai.bundle import ConfigParser

    from benchmarks.train_step import peak_mb
    from pipeline.models.losses import MultiTaskLoss

    files = [str(ROOT / "bundles/plgg_mtl/configs/train.json"), str(ROOT / f"configs/{size}.json")]
    overlay = ROWS[backbone]
    if overlay:
        files.append(str(ROOT / overlay))
    p = ConfigParser()
    p.read_config(files)
    dev = torch.device(device)
    net = p.get_parsed_content("network_def").to(dev).train()
    dims = int(p.get_parsed_content("spatial_dims"))
    patch = [int(s) for s in p.get_parsed_content("patch_size" if dims == 3 else "slice_size")]
    batch = int(p.get_parsed_content("batch_size")) * int(p.get_parsed_content("num_samples"))
    channels = int(p.get_parsed_content("in_channels")) + int(p.get_parsed_content("coord_channels"))
    # the config's own loss terms (class_weights needs a cohort: left at None here)
    loss_fn = MultiTaskLoss(cls_weight=float(p.get_parsed_content("loss#cls_weight")),
                            seg_weight=float(p.get_parsed_content("seg_weight")) if p.get_parsed_content("segment") else 0.0,
                            recon_weight=float(p.get_parsed_content("loss#recon_weight")),
                            seg_loss=p.get_parsed_content("seg_loss"))
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
    return {"backbone": backbone, "size": size, "dims": dims, "params": sum(q.numel() for q in net.parameters()),
            "s_per_iter": statistics.median(times), "peak_mb": peak, "batch": batch, "patch": patch}


def speed_table(device: str, iters: int, sizes: list[str]) -> list[dict]:
    rows = []
    for size in sizes:
        for backbone in ROWS:
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


def accuracy(datalist: str, out: str, epochs: int | None, names: list[str]) -> dict[str, dict]:
    """Run (or resume) the experiment with one arm per backbone in ``names``; its results by name."""
    arms = ",".join("mtl" if ROWS[b] is None else f"{b}={ROWS[b]}" for b in names)
    cmd = [sys.executable, "-m", "pipeline", "experiment", "--datalist", datalist, "--out", out, "--repeats", "1",
           "--overlays", "configs/demo.json", "--arms", arms]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(Path(out) / "results.csv", encoding="utf-8") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    return {b: rows.get("mtl" if ROWS[b] is None else b, {}) for b in names}


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
    ap.add_argument("--train", default=",".join([*OVERLAYS, "mtl2d", "cls2d"]),
                    help="comma-separated rows to train with --datalist (default: every backbone and the 2-D mode; "
                         f"also: {', '.join(k for k in EXTRA if k not in ('mtl2d', 'cls2d'))})")
    ap.add_argument("--no_speed", action="store_true", help="skip the timing (only the accuracy columns)")
    a = ap.parse_args()
    names = [n.strip() for n in a.train.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    speed = [] if a.no_speed else speed_table(a.device, a.iters, ["demo", "paper"] if a.paper else ["demo"])
    acc = accuracy(a.datalist, a.out, a.epochs, names) if a.datalist else {}
    print(f"\n| backbone | dims | params (M) | batch x input | s/iter at demo size ({a.device}) | peak memory (MB) | "
          "held-out Dice | held-out bal. acc. | minutes to train + evaluate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    timed = {r["backbone"]: r for r in speed if r["size"] == "demo"}
    for name in ROWS:
        r, m = timed.get(name), acc.get(name, {})
        if r is None and not m:
            continue
        minutes = _f(float(m["seconds"]) / 60, 1) if m.get("seconds") else "n/a"
        shape = f"{r['batch']} x {'x'.join(map(str, r['patch']))}" if r else "n/a"
        dims = f"{r['dims']}-D" if r else ("2-D" if name.endswith("2d") else "3-D")
        print(f"| {name} | {dims} | {_f(r and r['params'] / 1e6, 2)} | {shape} | {_f(r and r['s_per_iter'], 2)} | "
              f"{_f(r and r['peak_mb'], 0)} | {_f(m.get('test_dice'))} | {_f(m.get('test_balanced_accuracy'))} | "
              f"{minutes} |")
    for r in (r for r in speed if r["size"] == "paper"):
        print(f"| {r['backbone']} (paper size) | {r['dims']}-D | {r['params'] / 1e6:.2f} | "
              f"{r['batch']} x {'x'.join(map(str, r['patch']))} | {r['s_per_iter']:.2f} | {r['peak_mb']:.0f} | | | |")
    print("\nDice / balanced accuracy on one split's held-out cases (one cohort seed: an anecdote); n/a: not "
          "trained in this run (--train) or no decoder (no Dice).")


if __name__ == "__main__":
    main()
