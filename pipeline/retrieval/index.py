"""Similar-case retrieval from the shared encoder (Pisov et al., "Brain tumor image retrieval via
multitask learning"): an embedding per tumour by RoI pooling, properties the neighbours are judged
by, an index file, and the nearest-neighbour search.

Embedding: the encoder's feature map at one level (default the bottleneck) of the patch the network
was trained on (the training patch size, centred on the tumour's box; the whole padded volume for a
network that reads the whole brain, ``classify = "whole"``), restricted to the tumour's bounding box
mapped onto that level's grid (``floor(lo / 2**level) .. ceil(hi / 2**level)``, at least one cell),
and max-pooled: one value per channel. The box comes from the ground-truth mask when the case has
one, otherwise from the network's predicted tumour (its most confident component).

Properties, all from the mask on the atlas grid (so in the atlas' millimetres): volume (mL), linear
size (diameter of the sphere of that volume, mm), centroid (atlas RAS mm) and location descriptors:
hemisphere (left / right), front / rear and upper / lower (relative to the atlas brain mask's centre
of mass), supra- / infratentorial and the region of :func:`pipeline.data.phantom.cues.region_of`
(hemispheric / infratentorial / midline / other). The last two use MNI coordinates: they mean what
they say for the default MNI152 atlas and atlases aligned with it.

Search: Euclidean distance between embeddings standardised per channel (mean and sd of the index),
scikit-learn's exact ``NearestNeighbors``. That is instant up to ~1e5 cases; a larger index would
switch to an approximate search library (FAISS, hnswlib) behind :func:`nearest`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io.errors import InputError

__all__ = ["RetrievalModel", "load_model", "tumour_box", "feature_box", "roi_max_pool", "distort_box",
           "tumour_properties", "CaseFeatures", "case_features", "write_index", "read_index", "nearest",
           "PROPERTIES"]

#: Categorical properties the neighbours are judged by (besides the class), and the size.
PROPERTIES: tuple[str, ...] = ("hemisphere", "front_rear", "upper_lower", "tentorium", "region")


@dataclass
class RetrievalModel:
    """A trained network with what it needs to embed a case: the config's preprocessing (registration
    to the atlas included), the prediction settings and where its weights came from."""

    network: torch.nn.Module
    preprocessing: Any
    predict_cfg: Any
    device: torch.device
    config_files: list[str]
    ckpt: str
    class_names: list[str]
    brain_mask: str | None

    @property
    def has_decoder(self) -> bool:
        return bool(getattr(self.network, "has_decoder", True))


def load_model(config_files: Sequence[str | Path], ckpt: str | Path, work_dir: str | Path,
               device: str | None = None, overrides: dict[str, Any] | None = None) -> RetrievalModel:
    """Build the network of ``train.json`` + overlays, load ``ckpt`` and take the validation chain.

    Args:
        config_files: ``bundles/plgg_mtl/configs/train.json`` and the overlays the model was trained with.
        ckpt: ``models/model.pt`` of the training run (its ``postprocessing.json`` decides the
            component rule of a predicted tumour).
        work_dir: the config's ``output_dir`` (caches: registration, the atlas brain mask).
        device: ``cpu`` / ``cuda``; default the config's.
        overrides: more config ids and values (e.g. ``already_registered``).
    """
    from monai.bundle import ConfigParser

    from pipeline.models.weights import load_network

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update({"output_dir": str(work_dir), "ckpt": str(ckpt), "num_workers": 0, **(overrides or {})})
    if device is not None:
        parser.update({"device": f"$torch.device('{device}')"})
    dev = parser.get_parsed_content("device")
    network = load_network(parser.get_parsed_content("network_def"), ckpt, dev)
    return RetrievalModel(
        network=network,
        preprocessing=parser.get_parsed_content("validate#preprocessing"),
        predict_cfg=parser.get_parsed_content("validate#inferer").cfg,
        device=dev,
        config_files=[str(f) for f in config_files],
        ckpt=str(ckpt),
        class_names=list(parser.get_parsed_content("class_names")),
        brain_mask=parser.get_parsed_content("brain_mask_file"),
    )


def tumour_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``(lo, hi)`` (voxel indices, ``hi`` exclusive) of a 3-D mask, ``None`` if empty."""
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        return None
    return idx.min(0).astype(float), idx.max(0).astype(float) + 1.0


def feature_box(lo: np.ndarray, hi: np.ndarray, stride: int, grid: Sequence[int]) -> tuple[list[int], list[int]]:
    """A voxel box mapped onto a feature grid ``stride`` times coarser: every cell the box touches
    (``floor(lo / stride) .. ceil(hi / stride)``), clipped to ``grid``, at least one cell per axis."""
    a = [int(np.clip(np.floor(v / stride), 0, g - 1)) for v, g in zip(lo, grid, strict=True)]
    b = [int(np.clip(np.ceil(v / stride), a_ + 1, g)) for v, a_, g in zip(hi, a, grid, strict=True)]
    return a, b


def roi_max_pool(features: torch.Tensor, lo: np.ndarray, hi: np.ndarray, stride: int) -> np.ndarray:
    """Global max pooling of a ``(C, h, w, d)`` feature map over the box ``[lo, hi)`` (voxel
    coordinates of the input, ``stride`` voxels per feature cell). Returns ``(C,)`` float32."""
    a, b = feature_box(lo, hi, stride, features.shape[1:])
    region = features[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    return region.flatten(1).amax(1).float().cpu().numpy()


def distort_box(lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator, log2_scale_sd: float = 1 / 3,
                shift_sd: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The paper's box distortion: per axis, the size is multiplied by ``2**s``, ``s ~ N(0, sd)``
    (``log2_scale_sd`` is the standard deviation), and the centre moved by ``size * N(0, shift_sd)``.
    Returns the new ``(lo, hi)`` (not clipped; :func:`feature_box` clips)."""
    size = hi - lo
    centre = (lo + hi) / 2 + size * rng.normal(0.0, shift_sd, size=3)
    new = np.maximum(size * 2.0 ** rng.normal(0.0, log2_scale_sd, size=3), 1.0)
    return centre - new / 2, centre + new / 2


def tumour_properties(mask: np.ndarray, affine: np.ndarray, brain_centre: np.ndarray) -> dict[str, Any]:
    """Volume, linear size, centroid and location descriptors of a mask on the atlas grid.

    Args:
        mask: ``(H, W, D)`` 0/1 tumour mask (non-empty).
        affine: the grid's voxel-to-RAS-mm affine (4 x 4).
        brain_centre: the atlas brain's centre of mass, RAS mm (3,).
    """
    from pipeline.data.phantom.cues import region_of

    idx = np.argwhere(np.asarray(mask) > 0)
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))
    volume_mm3 = len(idx) * voxel_mm3
    x, y, z = (np.asarray(affine, dtype=float) @ np.append(idx.mean(0), 1.0))[:3]
    c = np.asarray(brain_centre, dtype=float)
    return {
        "volume_ml": round(volume_mm3 / 1000.0, 4),
        "size_mm": round(float((6.0 * volume_mm3 / np.pi) ** (1 / 3)), 3),
        "centroid_mm": [round(float(v), 2) for v in (x, y, z)],
        "hemisphere": "right" if x > c[0] else "left",
        "front_rear": "front" if y > c[1] else "rear",
        "upper_lower": "upper" if z > c[2] else "lower",
        "tentorium": "infratentorial" if (z < -25 and y < -40) else "supratentorial",
        "region": region_of((x, y, z)) or "other",
    }


@dataclass
class CaseFeatures:
    """One case prepared for retrieval: the encoder's levels on its patch and its tumour box.

    ``levels[i]``: ``(C_i, h_i, w_i, d_i)`` CPU tensor, ``strides[i]`` voxels of the patch per cell;
    ``box``: ``(lo, hi)`` in patch voxel coordinates; ``box_source``: ``truth`` or ``predicted``.
    """

    id: str
    levels: list[torch.Tensor]
    strides: list[int]
    box: tuple[np.ndarray, np.ndarray]
    box_source: str
    properties: dict[str, Any]
    volume: tuple[np.ndarray, np.ndarray] | None = None  # (image, tumour mask) on the atlas grid, when kept

    def embedding(self, level: int = -1, box: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """RoI max pooling at ``level`` (``-1``: bottleneck) over ``box`` (default the tumour's)."""
        i = level % len(self.levels)
        lo, hi = self.box if box is None else box
        return roi_max_pool(self.levels[i], lo, hi, self.strides[i])


def _patch(image: torch.Tensor, centre: Sequence[float], size: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Crop ``size`` around ``centre`` (shifted to stay inside), zero-padded at the end where the image
    is smaller; returns the patch and its start (voxel offset of the patch in the image)."""
    starts = [min(max(int(round(c)) - s // 2, 0), max(n - s, 0)) for c, s, n in zip(centre, size, image.shape[1:], strict=True)]
    sl = tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))
    patch = image[(slice(None), *sl)]
    pad = [p for s, n in zip(reversed(size), reversed(patch.shape[1:]), strict=True) for p in (0, s - n)]
    return torch.nn.functional.pad(patch, pad), np.asarray(starts, dtype=float)


@torch.no_grad()
def case_features(model: RetrievalModel, item: dict[str, Any], use_truth: bool = True,
                  keep_volume: bool = False) -> CaseFeatures:
    """Preprocess one datalist item (registration included), find its tumour box, run the encoder;
    ``keep_volume`` also keeps the registered image and the tumour mask used (for pictures).

    Raises:
        InputError: no tumour (an empty ground-truth mask, or no mask and a network that finds none
            or has no decoder to find one).
    """
    from pipeline.inference.postprocess import top_component_mask
    from pipeline.inference.predict import predict_volume

    data = model.preprocessing(dict(item))
    image = torch.as_tensor(data["image"]).float()
    where = item.get("image")
    mask = None
    if use_truth and int(data.get("has_label", 1)) and "label" in data:
        mask = np.asarray(data["label"])[0] > 0
        if not mask.any():
            raise InputError(item.get("label"), "the tumour mask is empty: no tumour to embed")
        source = "truth"
    else:
        if not model.has_decoder:
            raise InputError(where, "no tumour mask, and this network (the classifier alone) has no decoder to "
                                    "predict one: give the case a mask, or use a network that segments")
        prob, _ = predict_volume(model.network, image[None].to(model.device), model.predict_cfg)
        top = top_component_mask(prob[0].cpu(), model.predict_cfg.threshold)
        if top is None:
            raise InputError(where, "the network finds no tumour in this scan (no voxel above the threshold): "
                                    "nothing to embed")
        mask = top.numpy().astype(bool)
        source = "predicted"
    lo, hi = tumour_box(mask)
    affine = np.asarray(getattr(data["image"], "affine", np.eye(4)), dtype=float)
    brain = np.asarray(data["brain"])[0] > 0 if "brain" in data else np.ones(mask.shape, bool)
    brain_centre = (affine @ np.append(np.argwhere(brain).mean(0), 1.0))[:3]
    properties = tumour_properties(mask, affine, brain_centre)
    cfg = model.predict_cfg
    k = int(getattr(model.network, "downsampling", 8))
    if cfg.classify == "whole":  # the whole (padded) volume, as this network was trained
        patch, start = _patch(image, [0, 0, 0], [-(-n // k) * k for n in image.shape[1:]])
    else:
        patch, start = _patch(image, (lo + hi) / 2, list(cfg.roi_size))
    model.network.eval()
    levels = [f[0].float().cpu() for f in model.network.encoder_features(patch[None].to(model.device))]
    strides = list(getattr(model.network, "encoder_strides", [2 ** i for i in range(len(levels))]))
    return CaseFeatures(id=str(item.get("id", Path(str(where)).name)), levels=levels, strides=strides,
                        box=(lo - start, hi - start), box_source=source, properties=properties,
                        volume=(image[0].numpy(), mask) if keep_volume else None)


def write_index(path: str | Path, embeddings: np.ndarray, cases: list[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """Write an index: ``<path>.npz`` (embeddings, their per-channel mean and sd) + ``<path>.json``
    (settings and one record per case, same order). Both atomically; loads without pickle."""
    from pipeline.io.imageio import atomic_write, write_text_atomic

    base = Path(str(path).removesuffix(".json").removesuffix(".npz"))
    emb = np.asarray(embeddings, dtype=np.float32)
    mean, sd = emb.mean(0), emb.std(0)
    atomic_write(base.with_suffix(".npz"), lambda tmp: np.savez(tmp, embeddings=emb, mean=mean, sd=sd),
                 ".npz")
    doc = {"format": "plgg_mtl retrieval index 1", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "settings": settings, "cases": cases}
    write_text_atomic(base.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    return base.with_suffix(".json")


def read_index(path: str | Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray, np.ndarray]:
    """``(embeddings (N, C), document, mean (C,), sd (C,))`` of an index written by :func:`write_index`.

    Raises:
        InputError: a missing, unreadable or inconsistent index.
    """
    base = Path(str(path).removesuffix(".json").removesuffix(".npz"))
    js, npz = base.with_suffix(".json"), base.with_suffix(".npz")
    for p in (js, npz):
        if not p.is_file():
            raise InputError(p, "retrieval index file not found (build it with `python -m pipeline retrieval index`)")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
        with np.load(npz, allow_pickle=False) as z:
            emb, mean, sd = z["embeddings"], z["mean"], z["sd"]
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(base, f"not a readable retrieval index ({str(exc).splitlines()[0][:120]})") from None
    if doc.get("format") != "plgg_mtl retrieval index 1" or len(doc.get("cases", [])) != len(emb):
        raise InputError(js, f"not a retrieval index of this version, or its {len(doc.get('cases', []))} records do "
                             f"not match the {len(emb)} embeddings: rebuild it")
    return emb, doc, mean, sd


def standardise(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per-channel standardisation with the index's statistics (a constant channel stays 0)."""
    return (np.asarray(x, dtype=np.float64) - mean) / np.where(sd > 1e-12, sd, 1.0)


def nearest(index_embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean K-nearest neighbours (scikit-learn): ``(distances (Q, k), indices (Q, k))``.
    Both arguments already standardised. Swap in an approximate index here for millions of cases."""
    from sklearn.neighbors import NearestNeighbors

    k = min(int(k), len(index_embeddings))
    nn = NearestNeighbors(n_neighbors=k).fit(index_embeddings)
    dist, idx = nn.kneighbors(np.atleast_2d(queries))
    return dist, idx
