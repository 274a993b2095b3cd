"""Seconds per case of the inference bundle, split into registration, network and writing.

Runs the real ``bundles/plgg_mtl/configs/inference.json`` in-process (:func:`pipeline.inference.folder.runner_from_config`)
on one 1 mm volume, once with each overlay (``configs/demo.json``: 2 mm atlas, 8 filters, 48-cubed
patches, the demo's quick phantom registration; ``configs/paper.json``: 1 mm atlas, 32 filters,
128 x 128 x 112 patches, the default registration with deepbet), with RANDOMLY INITIALISED
weights (speed does not depend on them). Each configuration runs twice: the first run registers
the scan, the second re-uses the cached transform
(``--overwrite``), which is what a re-run or a second model on the same scans costs.

    python benchmarks/inference.py                      # a 1 mm isotropic synthetic native case, CPU
    python benchmarks/inference.py --image ../shared/data/real/BraTS-GLI-00001-000/t2f.nii.gz
    python benchmarks/inference.py --configs demo --device cuda

Columns: registration = reading + checking the scan, registration (or cache look-up), resampling
onto the atlas and the training chain's normalisation; network = sliding window over the atlas
grid + the tumour-centred classification patch (+ TTA passes when set); writing = probability map
back to native space, seg.nii.gz, qc.png and result.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = {"demo": "configs/demo.json", "paper": "configs/paper.json"}


def _input_volume(image: str | None, work: Path) -> Path:
    """The benchmark's input folder holding one volume (a copy of ``image`` or a 1 mm phantom)."""
    folder = work / "input"
    folder.mkdir(parents=True)
    if image:
        name = Path(image).name if Path(image).name.endswith((".nii", ".nii.gz")) else "case.nii.gz"
        shutil.copy(image, folder / name)
        return folder
    from pipeline.data.phantom.build import make_cohort
    from pipeline.data.phantom.config import PhantomConfig

    iso = PhantomConfig(thickness_mm=(1.0, 1.0))  # 1 mm isotropic (posed, any orientation)
    make_cohort(work / "phantom", cases=1, seed=3, spacing=1.0, space="native", config=iso)
    shutil.copy(work / "phantom" / "c000" / "image.nii.gz", folder / "phantom_1mm.nii.gz")
    return folder


def _run(config: str, inputs: Path, out: Path, device: str, overwrite: bool) -> dict:
    from pipeline.inference.folder import runner_from_config

    files = [ROOT / "bundles/plgg_mtl/configs/inference.json", ROOT / OVERLAYS[config]]
    runner, cases = runner_from_config(
        files, input_dir=str(inputs), output_dir=str(out), overwrite=overwrite, ckpt="random-init",
        device=f"$torch.device('{device}')", network="$@network_def.to(@device).eval()")
    row = runner.run(cases)[0]
    if row["status"] != "ok":
        raise SystemExit(f"{config}: {row['status']}")
    return row


def main(argv: list[str] | None = None) -> int:
    """Print seconds per case for each configuration (cold and cached registration)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", help="a NIfTI volume (default: a 1 mm isotropic synthetic native case)")
    p.add_argument("--configs", nargs="+", default=list(OVERLAYS), choices=list(OVERLAYS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch / SimpleITK threads (0: all cores)")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the configs' %file macros are relative to the repository root
    import SimpleITK as sitk
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        work = Path(tmp)
        inputs = _input_volume(args.image, work)
        volume = next(inputs.iterdir())
        size = sitk.ReadImage(str(volume)).GetSize()
        print(f"input {volume.name} {size}; device {args.device}, torch threads {torch.get_num_threads()}, "
              f"{platform.processor() or platform.machine()}; random-init weights")
        print(f"{'config':<7} {'run':<22} {'registration':>12} {'network':>8} {'writing':>8} {'total':>8}  (seconds)")
        for config in args.configs:
            for label, overwrite in (("first (registers)", False), ("re-run (cached reg.)", True)):
                row = _run(config, inputs, work / f"out_{config}", args.device, overwrite)
                print(f"{config:<7} {label:<22} {row['seconds_registration']:>12.1f} {row['seconds_network']:>8.1f} "
                      f"{row['seconds_writing']:>8.1f} {row['seconds_total']:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
