"""Registration accuracy and speed: synthetic cohort with known transforms, and the real TCGA pair.

Usage::

    python benchmarks/registration.py [--cohort DIR | --cases 24 --seed 3] [--spacing 2]
        [--threads 2] [--real ../shared/data/real/TCGA-FG-6692] [--no-ants] [--skull-strip morphology]

Synthetic (a native-space phantom cohort: ``DIR/datalist.json`` and ``DIR/<id>/to_atlas.tfm``,
the TRUE atlas -> native transform; generated with ``python -m pipeline phantom`` into a
temporary folder when ``--cohort`` is not given):

* TRE: for every atlas brain-mask voxel centre p, ``|| T_true(p) - T_est(p) ||`` in mm; the
  median and 95th percentile over all voxels of all cases, and the worst case's median;
* Dice between the case's mask brought to the atlas with the estimated and with the true
  transform (linear-then-threshold both times);
* seconds per case (registration only, brain extraction included).

Real pair (same patient, native skull-on FLAIR and the BraTS-prepared SRI24 FLAIR): the
disagreement of the two atlas routes exactly as ``shared/tools/registration_agreement.py``
defines it (median / p95 mm). With ``antspyx`` importable, the same figures for ANTs' ``Affine``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io.imageio import read_mask, read_volume
from pipeline.registration.atlas import Atlas, load_atlas
from pipeline.registration.register import register_to_atlas
from pipeline.registration.resample import resample_mask_to_atlas
from pipeline.registration.settings import RegistrationSettings
from pipeline.registration.transforms import to_affine

REAL_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "TCGA-FG-6692"

Registrar = Callable[[sitk.Image, Atlas], sitk.Transform]


def brain_points(atlas: Atlas, step: int = 1) -> np.ndarray:
    """Physical (LPS) points of the atlas brain-mask voxel centres, shape (N, 3)."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(atlas.brain_mask) > 0)[::step]
    direction = np.array(atlas.image.GetDirection()).reshape(3, 3)
    return np.array(atlas.image.GetOrigin()) + (zyx[:, ::-1] * np.array(atlas.image.GetSpacing())) @ direction.T


def apply(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Map points (N, 3) through a linear transform, vectorised."""
    aff = to_affine(transform)
    return points @ np.array(aff.GetMatrix()).reshape(3, 3).T + np.array(aff.GetTranslation())


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    denom = x.sum() + y.sum()
    return float(2 * (x & y).sum() / denom) if denom else 1.0


def sitk_registrar(settings: RegistrationSettings) -> Registrar:
    return lambda image, atlas: register_to_atlas(image, atlas, settings)


def ants_registrar(threads: int) -> Registrar | None:
    """ANTs ``Affine`` (defaults) when antspyx is importable; the result read back as an ITK transform."""
    try:
        import ants
    except ImportError:
        return None
    import os

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)

    def run(image: sitk.Image, atlas: Atlas) -> sitk.Transform:
        with tempfile.TemporaryDirectory() as tmp:
            sitk.WriteImage(image, f"{tmp}/m.nii.gz")
            sitk.WriteImage(atlas.image, f"{tmp}/f.nii.gz")
            out = ants.registration(ants.image_read(f"{tmp}/f.nii.gz"), ants.image_read(f"{tmp}/m.nii.gz"),
                                    type_of_transform="Affine")
            return to_affine(sitk.ReadTransform(out["fwdtransforms"][0]))

    return run


def synthetic(cohort: Path, atlas: Atlas, registrar: Registrar) -> dict[str, float]:
    """TRE / Dice / seconds over every case of a phantom cohort."""
    data = json.loads((cohort / "datalist.json").read_text(encoding="utf-8"))
    points = brain_points(atlas)
    errors, dices, seconds, medians = [], [], [], []
    for entry in data["training"]:
        case = cohort / entry["id"]
        image = read_volume(cohort / entry["image"])
        truth = sitk.ReadTransform(str(case / "to_atlas.tfm"))
        t0 = time.perf_counter()
        estimate = registrar(image, atlas)
        seconds.append(time.perf_counter() - t0)
        err = np.linalg.norm(apply(truth, points) - apply(estimate, points), axis=1)
        errors.append(err)
        medians.append(float(np.median(err)))
        label = entry.get("label") or (f"{entry['id']}/mask_truth.nii.gz" if (case / "mask_truth.nii.gz").exists() else None)
        if label:
            mask = read_mask(cohort / label, image, cohort / entry["image"])
            dices.append(dice(resample_mask_to_atlas(mask, estimate, atlas), resample_mask_to_atlas(mask, truth, atlas)))
        print(f"  {entry['id']}: TRE median {medians[-1]:.2f} mm, p95 {np.percentile(err, 95):.2f} mm, "
              f"Dice {dices[-1] if dices else float('nan'):.3f}, {seconds[-1]:.1f} s", flush=True)
    all_err = np.concatenate(errors)
    return {"cases": len(seconds), "tre_median": float(np.median(all_err)), "tre_p95": float(np.percentile(all_err, 95)),
            "worst_case_median": max(medians), "dice_mean": float(np.mean(dices)), "dice_min": float(np.min(dices)),
            "s_per_case": float(np.mean(seconds))}


def direct_reference(case: Path) -> sitk.Transform:
    """The checker's same-patient rigid MI registration (native FLAIR -> prepared FLAIR)."""
    fixed = sitk.ReadImage(str(case / "sri24" / "flair_brain.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(case / "native" / "flair.nii.gz"), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetMetricFixedMask(sitk.Cast(fixed > 0, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 300, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                              sitk.CenteredTransformInitializerFilter.GEOMETRY),
                            inPlace=False)
    return reg.Execute(fixed, moving)


def real_pair(case: Path, direct: sitk.Transform, registrar: Registrar) -> dict[str, float]:
    """Disagreement of the native and prepared routes on the checker's points (MNI 2 mm brain, every 5th)."""
    atlas = load_atlas(spacing=2)
    points = brain_points(atlas, step=5)
    native = read_volume(case / "native" / "flair.nii.gz")
    prepared = read_volume(case / "sri24" / "flair_brain.nii.gz")
    t0 = time.perf_counter()
    t_native = registrar(native, atlas)
    t_prepared = registrar(prepared, atlas)
    seconds = (time.perf_counter() - t0) / 2
    route = np.array([direct.TransformPoint(tuple(p)) for p in apply(t_prepared, points)])
    d = np.linalg.norm(apply(t_native, points) - route, axis=1)
    return {"median": float(np.median(d)), "p95": float(np.percentile(d, 95)), "s_per_image": seconds}


def make_cohort(cases: int, seed: int, spacing: float) -> Path:
    out = Path(tempfile.mkdtemp(prefix="regbench_"))
    subprocess.run([sys.executable, "-m", "pipeline", "phantom", "--out", str(out), "--cases", str(cases),
                    "--seed", str(seed), "--spacing", f"{spacing:g}", "--space", "native"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", type=Path, help="native-space phantom cohort (default: generate one)")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0, help="atlas spacing, mm (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real", type=Path, default=REAL_CASE, help="TCGA-FG-6692 folder (skipped when absent)")
    p.add_argument("--no-ants", action="store_true", help="skip ANTs even when antspyx is importable")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skull-strip", default="auto", choices=["auto", "deepbet", "morphology", "none"],
                   help="brain extraction of our registration (default auto: deepbet when installed)")
    args = p.parse_args(argv)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)

    registrars = {f"sitk/{args.skull_strip}": sitk_registrar(RegistrationSettings(threads=args.threads,
                                                                               skull_strip=args.skull_strip))}
    ants = None if args.no_ants else ants_registrar(args.threads)
    if ants is not None:
        registrars["ants-affine"] = ants
    if not args.skip_synthetic:
        cohort = args.cohort or make_cohort(args.cases, args.seed, args.spacing)
        atlas = load_atlas(spacing=args.spacing)
        for name, reg in registrars.items():
            print(f"[{name}] synthetic cohort {cohort} on {atlas.name}")
            r = synthetic(cohort, atlas, reg)
            print(f"[{name}] {r['cases']} cases: TRE median {r['tre_median']:.2f} mm, p95 {r['tre_p95']:.2f} mm "
                  f"(worst case median {r['worst_case_median']:.2f}); mask Dice mean {r['dice_mean']:.3f} "
                  f"(min {r['dice_min']:.3f}); {r['s_per_case']:.1f} s/case", flush=True)
    if args.real.is_dir():
        direct = direct_reference(args.real)
        for name, reg in registrars.items():
            r = real_pair(args.real, direct, reg)
            print(f"[{name}] real pair {args.real.name}: route disagreement median {r['median']:.2f} mm, "
                  f"p95 {r['p95']:.2f} mm; {r['s_per_image']:.1f} s/image", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
