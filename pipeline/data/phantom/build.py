"""Synthetic pLGG cohort built from real anatomy: the MNI152 2009 template shipped inside nilearn.

``python -m pipeline phantom --out DIR --cases N --seed S`` writes, per case ``DIR/<id>/``:

- ``image.nii.gz``: FLAIR-like float32 volume (WM darker than GM, CSF dark, optional skull/scalp
  shell, one hyperintense tumour, sometimes with a dark cyst), bias field, Rician noise and an
  arbitrary intensity scale. ``--space native`` (default) also applies a random pose, thick slices
  along a random axis and varied orientation codes (some oblique); ``--space atlas`` writes the
  case on the atlas grid directly.
- ``mask.nii.gz``: uint8 whole-tumour mask on the image grid (``mask_truth.nii.gz`` instead when the
  case's label is left out of the datalist, so it is not used by mistake).
- ``to_atlas.tfm``: the true ITK ``AffineTransform`` mapping atlas physical points (LPS) to native
  physical points: ``sitk.Resample(native_image, atlas_grid, T)`` brings the case onto the atlas.
- ``truth.json``: class, region, appearance, pose, slice thickness, orientation, skull, volumes.

and ``DIR/datalist.json`` (decathlon style, written last) with a ``"phantom"`` block holding the
settings, the priors and the Bayes-optimal class accuracy they allow.

How cases are drawn. Classes are balanced: a seeded shuffle of round-robin labels 0, 1, 2, 0, ...
(so class frequencies are n_c / N, each within one case of N / 3). Given the class, the tumour
centre's region is drawn from a discrete prior over :data:`REGIONS` (defined on MNI RAS mm in
:func:`region_of`) and its appearance (solid / cystic) from a weaker discrete prior; both are the
only class cues, so :func:`bayes_accuracy` is the exact ceiling of any classifier. The anatomy
and tumour come from a per-case random stream, the acquisition (pose, slices, orientation,
bias, noise, scale) from a second one, so ``--space atlas`` and ``--space native`` runs with the
same seed and case count hold the very same tumours. Left-out labels / classes and skulls are
exact counts (``round(fraction * N)`` cases), chosen by a seeded shuffle.

Every case is built on the atlas grid at ``--spacing`` (the grid of
:func:`pipeline.registration.atlas.load_atlas`), then resampled onto its native grid through the inverse of
the true transform, so image, mask and ``to_atlas.tfm`` agree by construction. The anatomy is
the same template for every case (the pose is the only geometric difference), so registration
error can be measured exactly.

This module draws the cohort and writes the datalist; the parts live in
:mod:`~pipeline.data.phantom.config` (names, :class:`PhantomConfig`),
:mod:`~pipeline.data.phantom.cues` (class cues and their sampler),
:mod:`~pipeline.data.phantom.anatomy` (MNI152 tissue maps), :mod:`~pipeline.data.phantom.tumour`
(tumour and FLAIR rendering), :mod:`~pipeline.data.phantom.acquisition` (pose, slices, noise) and
:mod:`~pipeline.data.phantom.case` (one case rendered and written); this module builds the cohort from them
(:func:`make_cohort`, ``python -m pipeline phantom``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.phantom.anatomy import Anatomy, load_anatomy
from pipeline.data.phantom.case import CONTRASTS, CaseSpec, render_case, write_case_files, write_json_atomic
from pipeline.data.phantom.config import (
    APPEARANCES,
    CLASSES,
    REGIONS,
    SPACES,
    SPACING_RANGE_MM,
    PhantomConfig,
    check_fraction,
)
from pipeline.data.phantom.cues import bayes_accuracy, sample_cues
from pipeline.io.errors import InputError

__all__ = ["PROFILES", "CohortSummary", "make_cohort", "main"]

#: ``--profile`` names: the study's phantom and :meth:`PhantomConfig.realistic`.
PROFILES = ("study", "realistic")


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`make_cohort` wrote.

    Attributes:
        datalist: path of ``datalist.json``.
        cases: number of cases.
        bayes_accuracy: Bayes-optimal class accuracy of the priors at this cohort's class frequencies.
        class_counts: cases per class name (ground truth, including cases whose class is left out).
        region_counts: cases per region.
        labelled: cases whose mask is referenced as ``label`` in the datalist.
        classified: cases whose ``class`` is in the datalist.
        seconds: wall time.
    """

    datalist: Path
    cases: int
    bayes_accuracy: float
    class_counts: dict[str, int]
    region_counts: dict[str, int]
    labelled: int
    classified: int
    seconds: float


# ----------------------------------------------------------------------------- cohort


def _exact_subset(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean array with exactly ``round(fraction * n)`` True entries at seeded random places."""
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[: int(round(fraction * n))]] = True
    return chosen


def _case_specs(cases: int, seed: int, missing_mask: float, missing_class: float,
                config: PhantomConfig) -> list[CaseSpec]:
    cohort_seq, case_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(cohort_seq)
    cues = sample_cues(cases, rng, config)
    skull = _exact_subset(cases, config.skull_fraction, rng)
    no_label = _exact_subset(cases, missing_mask, rng)
    no_class = _exact_subset(cases, missing_class, rng)
    width = max(3, len(str(cases - 1)))
    return [
        CaseSpec(cid=f"c{i:0{width}d}", cls=int(cues.classes[i]), region=int(cues.regions[i]),
                  appearance=int(cues.appearances[i]), skull=bool(skull[i]), has_label=not no_label[i],
                  has_class=not no_class[i], seed=seq)
        for i, seq in enumerate(case_seq.spawn(cases))
    ]


def _check_options(out: Path, cases: int, spacing: float, space: str, missing_mask: float,
                   missing_class: float) -> None:
    if cases < 1:
        raise InputError(None, f"--cases must be >= 1, got {cases}")
    if not SPACING_RANGE_MM[0] <= spacing <= SPACING_RANGE_MM[1]:
        raise InputError(None, f"--spacing must be in [{SPACING_RANGE_MM[0]}, {SPACING_RANGE_MM[1]}] mm, got {spacing}")
    if space not in SPACES:
        raise InputError(None, f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    check_fraction(missing_mask, "--missing-mask")
    check_fraction(missing_class, "--missing-class")
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is not a folder")
    datalist = out / "datalist.json"
    if datalist.exists():
        try:
            ours = "phantom" in json.loads(datalist.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise InputError(datalist, "exists and is not a phantom datalist; refusing to overwrite it")


def _metadata(specs: list[CaseSpec], anat: Anatomy, settings: dict[str, Any], config: PhantomConfig,
              accuracy: float) -> dict[str, Any]:
    counts = np.bincount([s.cls for s in specs], minlength=len(CLASSES))
    grid = anat.grid
    return {
        "generator": "pipeline.data.phantom.build", **settings,
        "class_sampling": "balanced: seeded shuffle of round-robin labels",
        "regions": list(REGIONS), "appearances": list(APPEARANCES),
        "region_definition_mni_ras_mm": {
            "infratentorial": "z < -25 and y < -40", "midline": "|x| < 12, -35 < y < 10, -15 < z < 20",
            "hemispheric": "|x| > 20 and z > 5",
        },
        "region_prior": {c: dict(zip(REGIONS, row, strict=True)) for c, row in zip(CLASSES, config.region_prior, strict=True)},
        "appearance_prior": {c: dict(zip(APPEARANCES, row, strict=True)) for c, row in zip(CLASSES, config.appearance_prior, strict=True)},
        "class_counts": dict(zip(CLASSES, counts.tolist(), strict=True)),
        "bayes_accuracy": round(accuracy, 4),
        "bayes_accuracy_uniform_classes": round(bayes_accuracy(config.region_prior, config.appearance_prior), 4),
        "atlas": {"name": anat.name, "size": list(grid.GetSize()), "spacing": list(grid.GetSpacing()),
                  "origin_lps": list(grid.GetOrigin()), "direction": list(grid.GetDirection())},
        "truth_files": {"transform": "<id>/to_atlas.tfm (atlas LPS -> native LPS)", "record": "<id>/truth.json",
                        "unlabelled_mask": "<id>/mask_truth.nii.gz"},
        "config": asdict(config),
    }


def make_cohort(out: str | Path, cases: int = 60, seed: int = 0, spacing: float = 2.0, space: str = "native",
                missing_mask: float = 0.0, missing_class: float = 0.0, config: PhantomConfig | None = None,
                progress: Callable[[str], None] | None = None, sequences: tuple[str, ...] = ("flair",)
                ) -> CohortSummary:
    """Write a synthetic cohort and its ``datalist.json`` (see the module docstring for the layout).

    ``out`` may exist: our files (``datalist.json``, ``<id>/...``) are overwritten, others are left
    alone; an existing ``datalist.json`` that is not a phantom datalist is never overwritten. The
    old datalist is removed first, so a datalist present means a complete cohort.

    Args:
        out: output folder.
        cases: number of cases (>= 1); ids ``c000``, ``c001``, ...
        seed: random seed; the same seed and options give identical output.
        spacing: atlas grid spacing and native in-plane spacing in mm, in [0.5, 8].
        space: ``"native"`` (posed, thick slices, varied orientation) or ``"atlas"``.
        missing_mask: fraction of cases without ``label`` in the datalist.
        missing_class: fraction of cases without ``class`` in the datalist.
        config: generator knobs; ``PhantomConfig()`` when ``None``.
        progress: called with one line per case (e.g. ``print``).
        sequences: contrasts per case, ``flair`` first (``("flair", "t2")`` adds ``<id>/t2.nii.gz``
            on the FLAIR's grid; the datalist then lists both: ``"sequences"`` and an ``image`` list).
            The FLAIR, masks and transforms are the same whatever the contrasts.

    Returns:
        A :class:`CohortSummary`.

    Raises:
        InputError: bad option, or ``out`` holds a datalist that is not ours.
    """
    start = time.perf_counter()
    out, cfg = Path(out), config or PhantomConfig()
    _check_options(out, cases, spacing, space, missing_mask, missing_class)
    sequences = tuple(sequences)
    if not sequences or sequences[0] != "flair" or len(set(sequences)) != len(sequences) or \
            not set(sequences) <= set(CONTRASTS):
        raise InputError(None, f"sequences must start with flair and use {list(CONTRASTS)} once each, got {list(sequences)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").unlink(missing_ok=True)
    anat = load_anatomy(float(spacing), cfg.min_depth_mm)
    specs = _case_specs(cases, seed, missing_mask, missing_class, cfg)
    entries = []
    for n, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        image, seg, tfm, truth, others = render_case(spec, anat, space, cfg, sequences)
        write_case_files(out / spec.cid, image, seg, tfm, truth, others)
        entries.append(_entry(spec, sequences))
        if progress:
            progress(f"[{n:>{len(str(cases))}}/{cases}] {spec.cid}  {CLASSES[spec.cls]:<11} "
                     f"{REGIONS[spec.region]:<14} {APPEARANCES[spec.appearance]:<6} "
                     f"{truth['tumour_volume_ml_atlas']:5.1f} mL  {'skull' if spec.skull else 'brain'}  "
                     f"{truth['orientation']}{'*' if truth['oblique'] else ' '} "
                     f"{truth['slice_thickness_mm']:.1f} mm  {time.perf_counter() - t0:.2f} s")
    freq = np.bincount([s.cls for s in specs], minlength=len(CLASSES)) / cases
    accuracy = bayes_accuracy(cfg.region_prior, cfg.appearance_prior, freq)
    settings = {"cases": cases, "seed": seed, "spacing_mm": spacing, "space": space, "missing_mask": missing_mask,
                "missing_class": missing_class, "skull_fraction": cfg.skull_fraction}
    datalist = {"classes": list(CLASSES), **({"sequences": list(sequences)} if len(sequences) > 1 else {}),
                "training": entries, "phantom": _metadata(specs, anat, settings, cfg, accuracy)}
    write_json_atomic(datalist, out / "datalist.json")
    return CohortSummary(
        datalist=out / "datalist.json", cases=cases, bayes_accuracy=accuracy,
        class_counts=datalist["phantom"]["class_counts"],
        region_counts={r: sum(s.region == i for s in specs) for i, r in enumerate(REGIONS)},
        labelled=sum(s.has_label for s in specs), classified=sum(s.has_class for s in specs),
        seconds=time.perf_counter() - start)


def _entry(spec: CaseSpec, sequences: tuple[str, ...] = ("flair",)) -> dict[str, Any]:
    files = [f"{spec.cid}/{'image' if s == 'flair' else s}.nii.gz" for s in sequences]
    entry: dict[str, Any] = {"id": spec.cid, "image": files[0] if len(files) == 1 else files}
    if spec.has_label:
        entry["label"] = f"{spec.cid}/mask.nii.gz"
    if spec.has_class:
        entry["class"] = spec.cls
    return entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline phantom",
                                description="Build the synthetic pLGG cohort from MNI152 anatomy.")
    p.add_argument("--out", type=Path, required=True, help="output folder (may exist; our files are overwritten)")
    p.add_argument("--cases", type=int, default=60, help="number of cases (default 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--spacing", type=float, default=2.0, help="atlas / in-plane spacing in mm (default 2)")
    p.add_argument("--space", default="native", help="native (posed, thick slices) or atlas (default native)")
    p.add_argument("--missing-mask", type=float, default=0.0, help="fraction of cases without label (default 0)")
    p.add_argument("--missing-class", type=float, default=0.0, help="fraction of cases without class (default 0)")
    p.add_argument("--sequences", default="flair",
                   help="contrasts per case, comma-separated, flair first: flair or flair,t2 (default flair)")
    p.add_argument("--skull-fraction", type=float, default=PhantomConfig.skull_fraction,
                   help=f"fraction of cases with a skull/scalp shell (default {PhantomConfig.skull_fraction})")
    p.add_argument("--satellites", type=float, default=0.0,
                   help="fraction of cases with one or two small lesions apart from the tumour (default 0)")
    p.add_argument("--iso-cores", type=float, default=0.0,
                   help="fraction of the cores with oedema drawn as high-grade cores, not FLAIR-bright "
                        "(realistic profile only; default 0)")
    p.add_argument("--profile", choices=PROFILES, default="study",
                   help="study: the study's phantom (one FLAIR contrast, 10-60 mL tumours; the default); "
                        "realistic: oedema along white matter, 3-100 mL cores (whole tumours up to about 300 mL), "
                        "random tissue contrast, white-matter hyperintensities, deformed anatomy, mass effect")
    return p


def main(argv: list[str]) -> int:
    """CLI entry: ``python -m pipeline phantom --out DIR --cases N --seed S [...]``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.iso_cores and args.profile != "realistic":
        parser.error("--iso-cores needs --profile realistic (the study's phantom has no oedema)")
    config = (PhantomConfig.realistic if args.profile == "realistic" else PhantomConfig)(
        skull_fraction=args.skull_fraction, satellite_fraction=args.satellites, iso_core_fraction=args.iso_cores)
    summary = make_cohort(args.out, cases=args.cases, seed=args.seed, spacing=args.spacing, space=args.space,
                          missing_mask=args.missing_mask, missing_class=args.missing_class, config=config,
                          progress=print, sequences=tuple(s.strip() for s in args.sequences.split(",") if s.strip()))
    counts = ", ".join(f"{k}: {v}" for k, v in summary.class_counts.items())
    print(f"wrote {summary.cases} cases ({counts}; {summary.labelled} with label, {summary.classified} with class) "
          f"to {summary.datalist} in {summary.seconds:.1f} s")
    uniform = bayes_accuracy(config.region_prior, config.appearance_prior)
    note = "" if abs(uniform - summary.bayes_accuracy) < 5e-3 else \
        f" (at this cohort's class counts; {uniform:.2f} with equal class frequencies)"
    print(f"Bayes-optimal class accuracy of these priors: {summary.bayes_accuracy:.2f}{note}")
    return 0
