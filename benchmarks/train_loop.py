"""Engine overhead: the bundle's own training loop (MONAI ``SupervisedTrainer`` with every handler of
``train.json``) against a bare PyTorch loop, on the same batches held in memory. Prints s/iter of
both and their ratio; not a test.

    python benchmarks/train_loop.py --datalist work/feed/c1mm/datalist.json [--overlays configs/demo.json]
        [--batches 8] [--epochs 3] [--device cpu|cuda] [--set key=value ...]

The batches come from the bundle's own DataLoader once (so data loading is outside both
measurements), then both loops run ``--epochs`` passes over them with the config's network, loss,
optimizer, precision and compile settings; the first pass of each is a warm-up (compile, cudnn
autotune). Validation is switched off (``val_interval`` past the last epoch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parser_for(args: argparse.Namespace, output_dir: Path):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), *[str(ROOT / o) for o in args.overlays]])
    p.update({"datalist": str(Path(args.datalist).resolve()), "output_dir": str(output_dir), "already_registered": True,
              "num_workers": 0, "device": f"$torch.device('{args.device}')", "val_interval": 10**6,
              "epochs": args.epochs})
    for kv in args.set:
        key, _, value = kv.partition("=")
        p[key] = value if value.lower() not in ("true", "false") else value.lower() == "true"
    return p


def bundle_loop(p, batches: list, epochs: int) -> list[float]:
    """Seconds per iteration of the config's trainer, epochs after the first."""
    from ignite.engine import Events

    trainer = p.get_parsed_content("train#trainer")
    trainer.data_loader = batches
    trainer.state.epoch_length = len(batches)
    stamps: list[tuple[int, float]] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(engine) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append((engine.state.epoch, time.perf_counter()))

    trainer.run()
    times = [b - a for (ea, a), (eb, b) in zip(stamps, stamps[1:], strict=False) if ea > 1 and eb == ea]
    return times


def bare_loop(p, batches: list, epochs: int) -> list[float]:
    """Seconds per iteration of a plain loop: prepare batch, autocast forward, loss, backward, step."""
    import copy

    from pipeline.runtime.precision import amp_kwargs
    from pipeline.training.engines import MultiTaskPrepareBatch

    device = torch.device(p.get_parsed_content("device"))
    net = copy.deepcopy(p.get_parsed_content("network_def")).to(device).train()
    amp = bool(p.get_parsed_content("amp"))
    dtype = amp_kwargs(p.get_parsed_content("amp_dtype"), device)["dtype"]
    model = torch.compile(net, **p.get_parsed_content("compile_kwargs")) if p.get_parsed_content("compile") else net
    loss_fn = p.get_parsed_content("loss")
    opt = torch.optim.Adam(net.parameters(), float(p.get_parsed_content("lr")))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    prepare = MultiTaskPrepareBatch(cls_needs_tumour=bool(p.get_parsed_content("cls_tumour_patches_only")))
    times = []
    for epoch in range(epochs):
        for batch in batches:
            t = time.perf_counter()
            image, target = prepare(batch, device)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                out = model(image)
                loss = loss_fn(out, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch:
                times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--overlays", nargs="+", default=["configs/demo.json"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        p = parser_for(args, Path(tmp))
        loader = p.get_parsed_content("train#dataloader")
        batches = []
        while len(batches) < args.batches:
            batches += list(loader)
        batches = batches[: args.batches]
        bare = statistics.median(bare_loop(parser_for(args, Path(tmp) / "bare"), batches, args.epochs))
        engine = statistics.median(bundle_loop(p, batches, args.epochs))
    print(f"training loop, {args.overlays} on {args.device}: {args.batches} batches x {args.epochs} epochs "
          f"(first epoch = warm-up), median s/iter")
    print(f"bare PyTorch loop   {bare:.4f} s/iter")
    print(f"bundle trainer      {engine:.4f} s/iter")
    print(f"engine overhead     x{engine / bare:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
