"""Patches per second from the bundle's own training DataLoader, for several data-feed settings side
by side, next to what a training step consumes (the headroom ratio). Prints a table; not a test.

    python benchmarks/data_feed.py --datalist work/feed/c1mm/datalist.json [--overlays configs/paper.json]
        [--workers 2] [--epochs 3] [--consume 38] [--variant NAME key=value ...] ...

Every variant builds ``train#dataloader`` from ``train.json`` + the overlays + its overrides (on CPU,
``already_registered``), fills its cache once (not timed: the first epoch of a real run pays it
once), then iterates ``--epochs`` epochs and reports: patches/s over whole epochs (the first batch
of each epoch included: with workers that are not persistent it waits for them to restart), the
mean wait for an epoch's first batch, and patches/s divided by ``--consume`` (patches/s a training
step takes; 38 = the compiled bf16 paper step on an H100). Default variants: today's
settings, cached crop indices, and both with the volumes cached in memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = [
    ["baseline", "cache_crop_indices=False", "persistent_workers=False"],
    ["persistent", "cache_crop_indices=False"],
    ["persistent+indices", "cache_crop_indices=True"],
    ["memory+indices", "cache_crop_indices=True", "dataset_cache=memory"],
]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def build(args: argparse.Namespace, overrides: list[str], output_dir: Path):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), *[str(ROOT / o) for o in args.overlays]])
    p.update({"datalist": str(Path(args.datalist).resolve()), "output_dir": str(output_dir), "already_registered": True,
              "num_workers": args.workers, "device": "$torch.device('cpu')", "check_cache": str(output_dir / "checked"),
              "registration_cache": str(output_dir / "registration")})
    for kv in overrides:
        key, _, value = kv.partition("=")
        p[key] = _value(value)
    return p.get_parsed_content("train#dataloader")


def measure(loader, epochs: int) -> tuple[float, float, int]:
    """(patches/s over the epochs, mean seconds to an epoch's first batch, patches per epoch)."""
    for _ in loader:  # fill the cache (disk or memory) and start the workers: not timed
        pass
    patches, firsts = 0, []
    start = time.perf_counter()
    for _ in range(epochs):
        t = time.perf_counter()
        for k, batch in enumerate(loader):
            if k == 0:
                firsts.append(time.perf_counter() - t)
            patches += int(batch["image"].shape[0])
    seconds = time.perf_counter() - start
    return patches / seconds, sum(firsts) / len(firsts), patches // epochs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--overlays", nargs="+", default=["configs/paper.json"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--consume", type=float, default=38.0, help="patches/s one training step consumes")
    ap.add_argument("--variant", nargs="+", action="append", metavar="NAME key=value",
                    help="a named setting (repeatable); default: baseline, persistent, +indices, memory")
    args = ap.parse_args(argv)
    variants = args.variant or DEFAULT_VARIANTS
    print(f"data feed: {args.datalist}, overlays {args.overlays}, {args.workers} workers, {args.epochs} epochs")
    print(f"{'variant':<22} {'patches/s':>10} {'first batch s':>14} {'headroom':>9}  overrides")
    base = None
    with tempfile.TemporaryDirectory(dir=ROOT / "work" if (ROOT / "work").is_dir() else None) as tmp:
        for name, *overrides in variants:
            rate, first, _ = measure(build(args, overrides, Path(tmp) / name), args.epochs)
            base = base or rate
            print(f"{name:<22} {rate:>10.1f} {first:>14.2f} {rate / args.consume:>9.2f}  {' '.join(overrides)} "
                  f"(x{rate / base:.2f} of the first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
