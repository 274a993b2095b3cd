"""Seconds per forward pass of the config's network in PyTorch and in ONNX Runtime, on the batch
the sliding window feeds (``sw_batch_size`` patches of ``patch_size``), with the outputs compared.
Exports the network (random weights: speed does not depend on them) with ``monai.bundle
onnx_export`` and the bundle's args file, as a user would. Prints a table; not a test.

    python benchmarks/onnx_speed.py [--overlay demo.json] [--iters 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.onnx_backend import OnnxNetwork  # noqa: E402

CONFIGS = ROOT / "bundles" / "plgg_mtl" / "configs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overlay", default="demo.json")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    configs = [str(CONFIGS / "inference.json"), str(ROOT / "configs" / a.overlay)]
    parser = ConfigParser()
    parser.read_config(configs)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    patch = list(parser.get_parsed_content("patch_size"))
    batch = int(parser.get_parsed_content("sw_batch_size"))
    channels = int(parser.get_parsed_content("in_channels")) + int(parser.get_parsed_content("coord_channels"))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_file = Path(tmp) / "model.pt", Path(tmp) / "model.onnx"
        torch.save(net.state_dict(), ckpt)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", str(onnx_file),
                        "--ckpt_file", str(ckpt), "--meta_file", str(CONFIGS / "metadata.json"), "--config_file",
                        repr(configs), "--input_shape", repr([1, channels, *patch]),
                        "--args_file", str(CONFIGS / "onnx_export_args.json")],
                       cwd=ROOT, check=True, capture_output=True)
        export_s = time.perf_counter() - t0
        ort_net = OnnxNetwork(onnx_file)
        x = torch.randn(batch, channels, *patch)
        times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        with torch.no_grad():
            ref, got = net(x), ort_net(x)
            diff = max(float((r - g).abs().max()) for r, g in zip(ref, got, strict=True))
            for _ in range(a.iters):  # in turn
                for name, f in (("pytorch", net), ("onnxruntime", ort_net)):
                    t = time.perf_counter()
                    f(x)
                    times[name].append(time.perf_counter() - t)
    print(f"[onnx_speed] {a.overlay}: batch {batch} x {channels} x {patch}, {torch.get_num_threads()} threads, "
          f"export {export_s:.1f} s, largest output difference {diff:.2e}")
    for name, ts in times.items():
        print(f"[onnx_speed] {name:12s} {statistics.median(ts):.3f} s per forward (median of {a.iters})")


if __name__ == "__main__":
    main()
