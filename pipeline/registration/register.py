"""Affine registration of a scan onto the atlas (SimpleITK), resampling both ways, and a disk cache.

Transform convention (ITK, the one ``sitk.Resample`` takes): every transform here maps an ATLAS
physical point to the NATIVE physical point it comes from, so

* ``sitk.Resample(native, atlas.image, T)`` brings a native image onto the atlas grid, and
* ``sitk.Resample(atlas_grid_image, native, T.GetInverse())`` brings it back.

It is the same convention as the synthetic cohort's ``to_atlas.tfm`` ground truth.

Method (:func:`register_to_atlas`), all on a working grid of about 2 mm (the transform is
physical, so it applies to any atlas grid):

1. the moving scan is smoothed/resampled to the working spacing (thick slices stay thick),
   clipped to intensity percentiles of its head and rescaled to [0, 1];
2. its brain is found (``skull_strip``: the deepbet network when installed, else morphology)
   and everything else is set to 0, so a skull-on scan looks like the brain-only template and
   the skull cannot drive the fit (this is what makes skull-on, thick-slice clinical FLAIR work);
3. start: brain centroids aligned, isotropic scale from the brain volumes, and the best of a
   few start rotations after a short coarse fit each;
4. multi-resolution stages (default similarity then affine) maximise Mattes mutual information
   over the dilated atlas brain mask (template and FLAIR contrasts differ);
5. refinement: the atlas brain mask is taken back to native space, dilated a little and
   intersected with the brain mask, and the last stage is run again on that.

Measured (``benchmarks/registration.py``, 2 cores): synthetic native-space phantoms (skull on
for half, slices up to 6 mm, oblique) TRE median 0.6 mm / p95 1.4 mm; the real skull-on
5.5 mm FLAIR agrees with the BraTS-prepared route within 1.9 mm median / 4.5 mm p95.

The parts live in :mod:`pipeline.registration.settings` (:class:`RegistrationSettings`),
:mod:`pipeline.registration.transforms` (affine collapse, ``.tfm`` read / write),
:mod:`pipeline.registration.masks` (head / brain masks, deepbet), :mod:`pipeline.registration.preprocess`
(working images), :mod:`pipeline.registration.fit` (the ITK optimisation) and
:mod:`pipeline.registration.resample` (atlas <-> native resampling); this module runs them
(:func:`register_to_atlas`) and keeps the disk cache.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pipeline.io.errors import InputError
from pipeline.io.filecheck import file_sha256
from pipeline.io.imageio import checksum_matches, read_volume, write_checksum
from pipeline.registration.atlas import Atlas, same_grid
from pipeline.registration.fit import (
    initial_transform,
    run_stages,
    volume_mm3,
)
from pipeline.registration.masks import (
    grow,
    head_mask,
    moving_brain_mask,
)
from pipeline.registration.preprocess import normalise_working, working_fixed, working_moving
from pipeline.registration.resample import map_to_native
from pipeline.registration.settings import RegistrationSettings
from pipeline.registration.transforms import read_transform, to_affine, write_transform_atomic
from pipeline.runtime.locks import cache_lock

__all__ = ["RegistrationCache", "check_on_atlas_grid", "register_to_atlas"]

logger = logging.getLogger(__name__)


def register_to_atlas(moving: sitk.Image, atlas: Atlas, settings: RegistrationSettings | None = None) -> sitk.AffineTransform:
    """Affine registration of a scan onto the atlas (skull on or off, any orientation, thick slices).

    Args:
        moving: the native scan (3-D, any pixel type, any direction/spacing).
        atlas: the target (:func:`pipeline.registration.atlas.load_atlas`).
        settings: knobs (defaults: :class:`RegistrationSettings`).

    Returns:
        An invertible ``sitk.AffineTransform`` mapping an atlas physical point to the native
        physical point (what ``sitk.Resample(moving, atlas.image, T)`` takes).

    Raises:
        InputError: no head-sized foreground in the scan (the caller knows the file name).
    """
    s = settings or RegistrationSettings()
    native = sitk.Cast(moving, sitk.sitkFloat32)
    moving = working_moving(native, s.working_spacing)
    fixed, fixed_brain = working_fixed(atlas, s.working_spacing)
    fixed_mask = grow(fixed_brain, s.fixed_mask_dilation)
    head = head_mask(moving)
    if volume_mm3(head) < 50_000.0:  # mm^3: 50 mL, far below any head or brain
        raise InputError(None, f"no head found in the scan (foreground {volume_mm3(head) / 1000:.1f} mL): "
                               "is it a brain MRI volume?")
    moving_n = normalise_working(moving, head, s.clip_percentiles)
    brain = moving_brain_mask(native, moving_n, head, s)
    masked = sitk.Mask(moving_n, brain)
    try:
        start = initial_transform(fixed, fixed_brain, fixed_mask, masked, brain, s)
        transform = run_stages(fixed, fixed_mask, masked, None, start, s.stages, s)
        for _ in range(s.refine_passes):
            back = map_to_native(fixed_brain, transform, moving, is_mask=True)  # on the working grid
            back = grow(back, s.refine_dilation)
            masked = sitk.Mask(moving_n, sitk.And(back, brain))
            transform = run_stages(fixed, fixed_mask, masked, None, transform, s.stages[-1:], s)
    except RuntimeError as exc:  # ITK optimiser failures, e.g. too little overlap with the atlas
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if not ln.startswith("Exception thrown")), lines[-1] if lines else "")
        raise InputError(None, f"registration to the atlas failed: {detail[:200]} (is the scan a brain MRI "
                               "volume with enough of the head in view?)") from None
    return to_affine(transform)


# ----------------------------------------------------------------------------- cache


@dataclass
class RegistrationCache:
    """Transforms on disk, keyed by file content, atlas and settings; registration runs once per key.

    ``root/<sha256(file)[:16]>_<atlas.fingerprint()>_<settings.key()>.tfm``, written atomically with
    a ``.sha256`` beside it, both under the cache's exclusive lock (:func:`~pipeline.runtime.locks.cache_lock`;
    readers share it), so processes registering the same case at once at worst both compute it and
    all use the first one written. An entry whose bytes no longer match (cut short, changed, a disk
    error) is logged as corrupt and recomputed, never used.

    Attributes:
        root: cache folder (created on first write).
        registrations_performed: registrations this object ran (cache misses).
    """

    root: Path
    registrations_performed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key(self, image_path: str | Path, atlas: Atlas, settings: RegistrationSettings) -> str:
        """The cache key of one (file, atlas, settings) triple."""
        return f"{file_sha256(image_path)[:16]}_{atlas.fingerprint()}_{settings.key()}"

    def path_for(self, image_path: str | Path, atlas: Atlas, settings: RegistrationSettings) -> Path:
        """Where the transform of this triple is (or will be) stored."""
        return self.root / f"{self.key(image_path, atlas, settings)}.tfm"

    def get_or_register(self, image_path: str | Path, atlas: Atlas,
                        settings: RegistrationSettings | None = None,
                        image: sitk.Image | None = None) -> sitk.AffineTransform:
        """The cached transform of ``image_path``, registering (and storing) it on a miss.

        Args:
            image_path: the native scan's file (its bytes are hashed).
            atlas: registration target.
            settings: registration settings (default :class:`RegistrationSettings`).
            image: the already-read scan, to avoid reading it twice on a miss.

        Raises:
            InputError: unreadable or invalid image file.
        """
        s = settings or RegistrationSettings()
        if not Path(image_path).exists():
            raise InputError(image_path, "file not found")
        target = self.path_for(image_path, atlas, s)
        cached = self._read(target)
        if cached is not None:
            return cached
        moving = image if image is not None else read_volume(image_path)
        try:
            transform = register_to_atlas(moving, atlas, s)
        except InputError as exc:
            if exc.path is None:
                raise InputError(image_path, exc.problem) from None
            raise
        with self._lock:
            self.registrations_performed += 1
        with cache_lock(self.root, exclusive=True):  # the entry and its checksum, seen together
            if checksum_matches(target):  # another process wrote it meanwhile: every process uses that one
                return read_transform(target)
            write_transform_atomic(transform, target)
            write_checksum(target)
        return transform

    def _read(self, target: Path) -> sitk.AffineTransform | None:
        """The entry at ``target`` when it is whole; ``None`` when missing or corrupt (reported)."""
        with cache_lock(self.root, exclusive=False):
            if not target.exists():
                return None
            intact = checksum_matches(target)
            try:
                if intact is False:
                    raise InputError(target, "content does not match its checksum")
                transform = read_transform(target)
                if intact is None:  # written before checksums: vouched for from now on
                    write_checksum(target)
                return transform
            except InputError as exc:  # a damaged cache entry is reported and recomputed, never used
                logger.warning("registration cache entry %s is corrupt (%s): recomputed", target, exc.problem)
                return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def check_on_atlas_grid(image: sitk.Image, atlas: Atlas, path: str | Path) -> None:
    """Raise :class:`InputError` when an image said to be registered is not on the atlas grid."""
    if not same_grid(image, atlas.image):
        raise InputError(path, f"said to be on the atlas grid ({atlas.name}: size {atlas.image.GetSize()}, spacing "
                               f"{atlas.image.GetSpacing()}) but has size {image.GetSize()}, spacing "
                               f"{tuple(round(s, 3) for s in image.GetSpacing())}, origin "
                               f"{tuple(round(o, 2) for o in image.GetOrigin())}; register it first")
