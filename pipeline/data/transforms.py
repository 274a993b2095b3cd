"""MONAI transforms of our own.

:class:`RegisterToAtlasd` sits at the head of a chain, before ``LoadImaged``: it takes the case's
file paths, registers the image onto the atlas once (a disk cache keyed by file content, atlas
and settings), writes the atlas-grid image and masks as NIfTI files in the cache and puts their
paths in the dict, so ``LoadImaged`` and everything after it work unchanged (and a downstream
``PersistentDataset`` caches as usual). The transform back to native space is kept in the dict.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monai.config import KeysCollection
from monai.transforms import MapTransform

from pipeline.data.datalist import reference_index
from pipeline.io.errors import InputError
from pipeline.io.filecheck import file_sha256
from pipeline.io.imageio import checksum_matches, read_mask, read_volume, write_checksum, write_image_atomic
from pipeline.registration.atlas import Atlas, load_atlas
from pipeline.registration.register import RegistrationCache, check_on_atlas_grid
from pipeline.registration.resample import resample_image_to_atlas, resample_mask_to_atlas
from pipeline.registration.settings import RegistrationSettings
from pipeline.runtime.locks import cache_lock

__all__ = ["BrainNormalised", "NormaliseIntensityd", "RegisterToAtlasd", "cached_key", "native_meta",
           "split_at_registration"]

NORMALISATIONS = ("nonzero", "brain")
logger = logging.getLogger(__name__)


def native_meta(path: str | Path, image: sitk.Image | None = None) -> dict[str, Any]:
    """Geometry of a native image (from ``image`` or the file header): what mapping back needs.

    Returns:
        ``{"path", "size", "spacing", "origin", "direction"}`` (SimpleITK x, y, z order, LPS).
    """
    if image is None and Path(path).is_dir():  # a DICOM series folder: no single header to read
        image = read_volume(path, check=False)
    if image is None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(path, "cannot be read as an image (corrupt or unsupported format)") from None
        image = reader
    return {"path": str(path), "size": list(image.GetSize()[:3]), "spacing": list(image.GetSpacing()[:3]),
            "origin": list(image.GetOrigin()[:3]), "direction": list(image.GetDirection()[:9])}


class RegisterToAtlasd(MapTransform):
    """Register a case onto the atlas (cached) and replace its file paths by atlas-grid files.

    Input: a dict of FILE PATHS (``{"image": ".../flair.nii.gz", "label": ".../mask.nii.gz", ...}``);
    ``image`` may be a list of a case's sequences (one file each, one grid), in channel order.
    Output: the same dict where ``image_key`` (each sequence) and each present ``mask_keys`` entry is
    the path of a NIfTI on the atlas grid (image float32, linear or B-spline; masks uint8 0/1), plus

    * ``"to_atlas"``: path of the ITK ``.tfm`` (atlas physical point -> native physical point);
      ``""`` (identity) when ``already_registered`` (a string, so batches collate);
    * ``"native_meta"``: the native image's path and geometry (:func:`native_meta`), so an inference
      step can map a prediction back with :func:`pipeline.registration.resample.map_to_native`.

    With several sequences the registration is estimated once, on the reference sequence, and
    moves every sequence and the mask; the transform cache and ``native_meta`` are the reference's.

    Args:
        keys: keys the transform handles (MONAI convention); ``image_key`` and ``mask_keys``
            say which of them is the image and which are masks.
        atlas: an :class:`~pipeline.registration.atlas.Atlas`, a user atlas path, or ``None`` for MNI152. A path
            or ``None`` is loaded lazily (once per process), which keeps the transform light to pickle.
        cache_dir: folder of the transform cache and of the registered files.
        settings: registration settings (default :class:`RegistrationSettings`), or a dict of
            its fields (bundle configs).
        already_registered: inputs are already on the atlas grid: check that and pass through.
        image_key: key of the scan to register.
        mask_keys: keys of masks on the scan's grid, carried with the same transform.
        allow_missing_keys: a case without a mask (or any missing key) is fine.
        atlas_mask: brain mask of a user atlas given by path.
        atlas_spacing: atlas grid spacing in mm (see :func:`~pipeline.registration.atlas.load_atlas`).
        interpolator: image interpolation, ``"linear"`` or ``"bspline"``.
        mask_mode: mask interpolation, ``"linear"`` (then >= 0.5) or ``"nearest"``.
        sequences: the sequences' names in channel order (``None``: one image).
        reference_sequence: the sequence to register (name or index; ``None``: ``flair`` when among
            ``sequences``, else the first), see :func:`pipeline.data.datalist.reference_index`.

    Raises:
        InputError: unreadable/2-D image or mask, mask on another grid, or (``already_registered``)
            an image not on the atlas grid.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        atlas: Atlas | str | Path | None = None,
        cache_dir: str | Path = "cache/registration",
        settings: RegistrationSettings | Mapping[str, Any] | None = None,
        already_registered: bool = False,
        image_key: str = "image",
        mask_keys: Sequence[str] = ("label",),
        allow_missing_keys: bool = True,
        atlas_mask: str | Path | None = None,
        atlas_spacing: float | None = None,
        interpolator: str = "linear",
        mask_mode: str = "linear",
        sequences: Sequence[str] | None = None,
        reference_sequence: str | int | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference = reference_index(sequences, reference_sequence)
        self._atlas = atlas if isinstance(atlas, Atlas) else None
        self._atlas_spec = (None if atlas is None or isinstance(atlas, Atlas) else str(atlas),
                            None if atlas_mask is None else str(atlas_mask), atlas_spacing)
        if isinstance(settings, Mapping):  # from a bundle config
            settings = RegistrationSettings.from_dict(settings)
        self.settings = settings or RegistrationSettings()
        self.cache = RegistrationCache(Path(cache_dir))
        self.already_registered = already_registered
        self.image_key = image_key
        self.mask_keys = tuple(mask_keys)
        self.interpolator = interpolator
        self.mask_mode = mask_mode

    @property
    def atlas(self) -> Atlas:
        """The atlas: the one given, else loaded from the spec (cached once per process)."""
        if self._atlas is not None:
            return self._atlas
        path, mask, spacing = self._atlas_spec
        return load_atlas(path, mask, spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"RegisterToAtlasd: key {self.image_key!r} not in the data")
        if self.already_registered:
            return self._pass_through(d)
        return self._register(d)

    def _images(self, d: dict[Hashable, Any]) -> list[Path]:
        value = d[self.image_key]
        paths = [Path(v) for v in value] if isinstance(value, list | tuple) else [Path(value)]
        if len(paths) > 1 and not 0 <= self.reference < len(paths):
            raise InputError(None, f"reference sequence {self.reference} is out of range for a case of {len(paths)} sequences")
        return paths

    def _inputs_exist(self, d: dict[Hashable, Any]) -> None:
        for path in self._images(d):
            if not path.exists():
                raise InputError(path, "image file not found")
        for key in self.mask_keys:
            if d.get(key) not in (None, "") and not Path(d[key]).exists():
                raise InputError(d[key], "mask file not found")

    def _reference(self, paths: list[Path]) -> Path:
        return paths[self.reference] if len(paths) > 1 else paths[0]

    def _pass_through(self, d: dict[Hashable, Any]) -> dict[Hashable, Any]:
        self._inputs_exist(d)
        paths = self._images(d)
        path = self._reference(paths)
        masks = [Path(d[k]) for k in self.mask_keys if d.get(k) not in (None, "")]
        metas = {p: native_meta(p) for p in (*paths, *masks)}
        for p, m in metas.items():
            ref = sitk.Image([int(v) for v in m["size"]], sitk.sitkUInt8)
            ref.SetSpacing(m["spacing"])
            ref.SetOrigin(m["origin"])
            ref.SetDirection(m["direction"])
            check_on_atlas_grid(ref, self.atlas, p)
        d["to_atlas"] = ""
        d["native_meta"] = metas[path]
        return d

    def _register(self, d: dict[Hashable, Any]) -> dict[Hashable, Any]:
        self._inputs_exist(d)
        atlas = self.atlas
        paths = self._images(d)
        path = self._reference(paths)
        tfm_path = self.cache.path_for(path, atlas, self.settings)
        out_dir = self.cache.root / "registered"
        # the reference keeps its single-image name (caches of one-sequence runs stay valid); the
        # others add their own content hash
        image_outs = [out_dir / (f"{tfm_path.stem}_{self.interpolator}.nii.gz" if p == path else
                                 f"{tfm_path.stem}_{file_sha256(p)[:16]}_{self.interpolator}.nii.gz") for p in paths]
        mask_outs = {k: out_dir / f"{tfm_path.stem}_{file_sha256(d[k])[:16]}_{self.mask_mode}.nii.gz"
                     for k in self.mask_keys if k in self.keys and d.get(k) not in (None, "")}
        image = None
        with cache_lock(self.cache.root, exclusive=False):  # no writer between an entry and its checksum
            tfm_whole = tfm_path.exists() and checksum_matches(tfm_path) is not False  # else recomputed, reported
            whole = tfm_whole and all([_intact(p) for p in (*image_outs, *mask_outs.values())])
        if not whole:
            image = read_volume(path)
            transform = self.cache.get_or_register(path, atlas, self.settings, image=image)
            written = {out: resample_image_to_atlas(image if p == path else read_volume(p), transform, atlas,
                                                    self.interpolator) for p, out in zip(paths, image_outs, strict=True)}
            written |= {out: resample_mask_to_atlas(read_mask(d[key], image, path), transform, atlas, self.mask_mode)
                        for key, out in mask_outs.items()}
            with cache_lock(self.cache.root, exclusive=True):
                for out, registered in written.items():
                    write_image_atomic(registered, out)
                    write_checksum(out)
        for key, out in mask_outs.items():
            d[key] = str(out)
        d[self.image_key] = str(image_outs[0]) if len(paths) == 1 else [str(p) for p in image_outs]
        d["to_atlas"] = str(tfm_path)
        d["native_meta"] = native_meta(path, image)
        return d


def _intact(path: Path) -> bool:
    """A registered file of the cache is whole: present and matching its checksum (one written before
    checksums is vouched for from now on); a corrupt one is logged and will be rewritten."""
    if not path.exists():
        return False
    intact = checksum_matches(path)
    if intact is None:
        write_checksum(path)
        return True
    if not intact:
        logger.warning("registration cache entry %s is corrupt (content does not match its checksum): recomputed", path)
    return intact


class BrainNormalised:
    """Z-score an image inside its brain, blind to the scanner's intensity scale.

    The brain is the atlas brain mask intersected, per channel, with the scan's own foreground: the
    voxels above the image's minimum (a skull-stripped scan's background and the resampling's
    padding both sit at that minimum, see :func:`~pipeline.registration.resample.resample_image_to_atlas`).
    Inside it the channel is clipped to the ``percentiles`` of its brain voxels (hot vessels and
    artefacts) and z-scored; outside it is 0. Every step commutes with a positive affine change of
    intensities (``a * x + b``, ``a > 0``), so int16 scanner counts and a z-scored float copy of
    the same scan give the same output: MONAI's ``NormalizeIntensity(nonzero=True)`` does not (its
    foreground is the non-zero voxels, which a shifted copy changes). Written here because neither
    MONAI nor SimpleITK has a masked, clipped z-score; MONAI's ``NormalizeIntensity`` and NumPy do
    the arithmetic.

    Args:
        percentiles: clip range, in percent of the brain voxels (``None``: no clipping).
        rel_tol: a voxel is foreground when above ``min + rel_tol * (max - min)``.
    """

    def __init__(self, percentiles: tuple[float, float] | None = (0.5, 99.5), rel_tol: float = 1e-4) -> None:
        self.percentiles = percentiles
        self.rel_tol = rel_tol

    def __call__(self, image: Any, brain: Any | None) -> Any:
        """``image`` ``(C, H, W, D)`` tensor or array; ``brain`` ``(1, H, W, D)`` mask or ``None``
        (the whole grid). Returns a float32 image of the same type and shape."""
        import numpy as np
        import torch
        from monai.transforms import NormalizeIntensity
        from monai.utils import convert_to_dst_type

        arr = image.detach().cpu().numpy().astype(np.float64) if isinstance(image, torch.Tensor) \
            else np.asarray(image, dtype=np.float64)
        inside = np.ones(arr.shape[1:], bool) if brain is None else np.asarray(brain)[0] > 0
        out = np.zeros(arr.shape, np.float32)
        for c, channel in enumerate(arr):
            lo, hi = float(channel.min()), float(channel.max())
            fg = inside & (channel > lo + self.rel_tol * (hi - lo))
            if not fg.any():
                continue
            values = channel[fg]
            if self.percentiles is not None:
                values = np.clip(values, *np.percentile(values, self.percentiles))
            normed = NormalizeIntensity(nonzero=False, dtype=np.float64)(values)
            out[c][fg] = np.asarray(normed, dtype=np.float32)
        return convert_to_dst_type(out, image, dtype=torch.float32)[0]  # a MetaTensor keeps its metadata


class NormaliseIntensityd(MapTransform):
    """Intensity normalisation of the chain, chosen by ``mode`` (the config's ``intensity_norm``).

    * ``"nonzero"``: the image masked by the atlas brain mask, then MONAI's
      ``NormalizeIntensity(nonzero=True, channel_wise=True)`` (the study's and nnU-Net's MRI rule);
    * ``"brain"``: :class:`BrainNormalised` (``configs/real.json``): independent of the scanner's
      intensity scale and offset, clipped to percentiles of the brain.

    Args:
        keys: image key(s).
        brain_key: key of the atlas brain mask (``(1, H, W, D)``); a missing one means the whole grid.
        mode: one of :data:`NORMALISATIONS`.

    Raises:
        InputError: an unknown ``mode``.
    """

    def __init__(self, keys: KeysCollection = "image", brain_key: str = "brain", mode: str = "nonzero") -> None:
        super().__init__(keys)
        if mode not in NORMALISATIONS:
            raise InputError(None, f"intensity_norm must be one of {NORMALISATIONS}, got {mode!r}")
        self.brain_key = brain_key
        self.mode = mode
        self._brain = BrainNormalised()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import MaskIntensity, NormalizeIntensity

        d = dict(data)
        brain = d.get(self.brain_key)
        for key in self.key_iterator(d):
            if self.mode == "brain":
                d[key] = self._brain(d[key], brain)
                continue
            image = d[key] if brain is None else MaskIntensity(brain)(d[key])
            d[key] = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
        return d


def split_at_registration(preprocessing: Any) -> tuple[Any, Any]:
    """Split the training chain (a ``Compose`` of ``train#deterministic_transforms``) after its
    :class:`~pipeline.data.transforms.RegisterToAtlasd`: ``(registration, normalisation)``.

    The registration part yields the atlas -> native transform (``to_atlas``), which the rest of
    the chain deletes, and the two parts are timed apart.

    Raises:
        ValueError: the chain holds no (or several) ``RegisterToAtlasd``.
    """
    from monai.transforms import Compose

    transforms = list(getattr(preprocessing, "transforms", preprocessing))
    found = [i for i, t in enumerate(transforms) if isinstance(t, RegisterToAtlasd)]
    if len(found) != 1:
        raise ValueError(f"the preprocessing chain must hold exactly one RegisterToAtlasd, found {len(found)}")
    k = found[0]
    return Compose(transforms[: k + 1]), Compose(transforms[k + 1:])


def cached_key(key: str, cached: bool) -> str | None:
    """``key`` when the chain caches that item (the crop's foreground / background indices,
    ``cache_crop_indices``), else ``None`` (the crop computes them itself)."""
    return key if cached else None
