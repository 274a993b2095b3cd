"""Start-up of a training run: seconds from the command to the first training iteration, cold (new
output folder: every case checked, nothing cached) and warm (the same folder again), and where they
go. Prints a table; not a test.

    python benchmarks/startup.py --datalist work/feed/c1mm/datalist.json [--overlays configs/paper.json]
        [--device cpu|cuda] [--workers 2]

The totals come from the bundle itself (``python -m monai.bundle run training``; the
``pipeline.runtime.startup.StartupTimer`` handler logs them; the run is stopped as soon as the first
iteration starts). The breakdown parses the same config in this process and times its parts in the
order the bundle evaluates them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_LINE = re.compile(r"start-up: ([0-9.]+) s")


def bundle_startup(args: argparse.Namespace, out: Path) -> float:
    """Seconds the bundle reports to its first iteration (the run is then stopped)."""
    files = [str(ROOT / "bundles/plgg_mtl/configs/train.json"), *[str(ROOT / o) for o in args.overlays]]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(files),
           "--datalist", str(Path(args.datalist).resolve()), "--output_dir", str(out), "--already_registered", "True",
           "--num_workers", str(args.workers), "--device", f"$torch.device('{args.device}')"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            m = _LINE.search(line)
            if m:
                return float(m.group(1))
        raise RuntimeError(f"the run ended (exit {proc.wait()}) before its first iteration: {' '.join(cmd)}")
    finally:
        proc.kill()
        proc.wait()


def breakdown(args: argparse.Namespace, out: Path) -> list[tuple[str, float]]:
    """Seconds of each part, in one process (imports first)."""
    t = time.perf_counter()
    import monai  # noqa: F401
    import torch  # noqa: F401
    from monai.bundle import ConfigParser

    import pipeline  # noqa: F401

    parts = [("imports (torch, monai, pipeline)", time.perf_counter() - t)]
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles/plgg_mtl/configs/train.json"), *[str(ROOT / o) for o in args.overlays]])
    p.update({"datalist": str(Path(args.datalist).resolve()), "output_dir": str(out), "already_registered": True,
              "num_workers": args.workers, "device": f"$torch.device('{args.device}')"})
    for name, key in (("atlas brain mask", "brain_mask_file"), ("datalist check + split", "cohort"),
                      ("network", "network"), ("data loader", "train#dataloader"), ("trainer + handlers", "train#trainer")):
        t = time.perf_counter()
        p.get_parsed_content(key)
        parts.append((name, time.perf_counter() - t))
    loader = p.get_parsed_content("train#dataloader")
    t = time.perf_counter()
    next(iter(loader))
    parts.append(("first batch", time.perf_counter() - t))
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--overlays", nargs="+", default=["configs/paper.json"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=ROOT / "work" if (ROOT / "work").is_dir() else None) as tmp:
        cold = bundle_startup(args, Path(tmp) / "run")
        warm = bundle_startup(args, Path(tmp) / "run")
        parts = breakdown(args, Path(tmp) / "parts")
    print(f"start-up, {args.datalist}, {args.overlays}, {args.device}, {args.workers} workers")
    print(f"command -> first iteration: cold {cold:.1f} s, warm {warm:.1f} s")
    print("cold breakdown (in-process):")
    for name, seconds in parts:
        print(f"  {name:<34} {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
