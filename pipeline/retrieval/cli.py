"""``python -m pipeline retrieval index | query | evaluate``: similar-case retrieval from a trained network.

- ``index``: embed every case of a datalist (box from its mask, else from the predicted tumour) and
  write ``INDEX.npz`` + ``INDEX.json`` (embedding, id, class, volume, linear size, location).
- ``query``: embed a new scan (registered to the atlas like any input; its tumour from the network, or
  ``--mask``), return its K nearest cases: ``neighbours.csv`` / ``.json`` and ``neighbours.png`` (the
  query's tumour beside its neighbours', three orthogonal slices each).
- ``evaluate``: the retrieval study's leave-one-out evaluation of one or more networks
  (:mod:`pipeline.retrieval.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.errors import InputError
from pipeline.io.filecheck import file_sha256
from pipeline.retrieval.index import (
    PROPERTIES,
    CaseFeatures,
    case_features,
    load_model,
    nearest,
    read_index,
    standardise,
    write_index,
)

__all__ = ["main", "save_neighbour_picture"]

TRAIN = "bundles/plgg_mtl/configs/train.json"


def _items(datalist: str, class_names: list[str], brain_mask: str | None, ids: list[str] | None = None) -> list[dict]:
    from pipeline.data.datalist import load_datalist, to_monai_dicts

    dl = load_datalist(datalist).with_classes(class_names)
    cases = dl.subset(ids) if ids else list(dl.cases)
    if not cases:
        raise InputError(datalist, "the datalist has no case")
    items = to_monai_dicts(cases)
    for item in items:
        if brain_mask:
            item["brain"] = brain_mask
    return items


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InputError(None, f"--set needs KEY=VALUE, got {kv!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _split_ids(split_file: str | None, part: str, index: int) -> list[str] | None:
    if not split_file:
        return None
    from pipeline.data.splits import load_splits

    splits = load_splits(split_file)
    if not 0 <= index < len(splits):
        raise InputError(split_file, f"split index {index} out of range (the file has {len(splits)})")
    return [i for p in part.split("+") for i in splits[index][p]]


def _embed_all(model: Any, items: list[dict], use_truth: bool, tag: str) -> list[CaseFeatures]:
    out, t0 = [], time.time()
    for n, item in enumerate(items, 1):
        out.append(case_features(model, item, use_truth=use_truth))
        print(f"[retrieval {tag}] {n}/{len(items)} {item['id']}: box from {out[-1].box_source}, "
              f"{out[-1].properties['volume_ml']:.1f} mL ({time.time() - t0:.0f} s)", flush=True)
    return out


def _cmd_index(args: argparse.Namespace) -> int:
    overlays = [TRAIN, *args.overlays]
    work = Path(args.work or Path(args.out).parent / "retrieval_cache")
    model = load_model(overlays, args.ckpt, work, args.device,
                       {"already_registered": args.already_registered, **args.overrides})
    items = _items(args.datalist, model.class_names, model.brain_mask)
    feats = _embed_all(model, items, not args.predicted_box, "index")
    emb = np.stack([f.embedding(args.level) for f in feats])
    cases = [{"id": f.id, "image": it["image"], "label": it.get("label"), "class": it["class"],
              "class_name": model.class_names[it["class"]] if it["class"] >= 0 else None,
              "box_source": f.box_source, **f.properties} for f, it in zip(feats, items, strict=True)]
    settings = {"overlays": overlays, "ckpt": str(Path(args.ckpt).resolve()), "ckpt_sha256": file_sha256(args.ckpt),
                "level": args.level, "class_names": model.class_names, "datalist": str(Path(args.datalist).resolve()),
                "already_registered": args.already_registered, "embedding_dim": int(emb.shape[1])}
    path = write_index(args.out, emb, cases, settings)
    print(f"[retrieval index] {len(cases)} case(s), {emb.shape[1]}-dim embeddings -> {path} (+ .npz)")
    return 0


def _slices(image: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.asarray(image.shape) // 2
    x, y, z = centre
    return [(image[:, :, z].T, mask[:, :, z].T), (image[:, y, :].T, mask[:, y, :].T), (image[x, :, :].T, mask[x, :, :].T)]


def save_neighbour_picture(path: Path, panels: list[tuple[np.ndarray, np.ndarray, str]]) -> Path:
    """One row per case (query first): axial, coronal and sagittal slices through its tumour's
    centroid, tumour outline in red. Arrays ``(H, W, D)`` on the atlas grid (shown with the grid's
    first axis left to right and the last one upwards, the same way for every row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io.imageio import atomic_write

    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3 * len(panels)), squeeze=False)
    for row, (image, mask, title) in zip(axes, panels, strict=True):
        for ax, (img, m) in zip(row, _slices(image, mask), strict=True):
            ax.imshow(img, cmap="gray", origin="lower")
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_axis_off()
        row[0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), ".png")
    plt.close(fig)
    return path


def _cmd_query(args: argparse.Namespace) -> int:
    from pipeline.io.imageio import write_text_atomic

    emb, doc, mean, sd = read_index(args.index)
    s = doc["settings"]
    work = Path(args.work or Path(args.out) / "cache")
    model = load_model(s["overlays"], s["ckpt"], work, args.device,
                       {"already_registered": args.already_registered, **args.overrides})
    if file_sha256(s["ckpt"]) != s["ckpt_sha256"]:
        raise InputError(s["ckpt"], "the checkpoint changed since the index was built: rebuild the index")
    item = {"id": Path(args.image).name.split(".")[0], "image": str(Path(args.image).resolve()), "class": -1,
            "has_label": int(args.mask is not None), "has_class": 0}
    if args.mask:
        item["label"] = str(Path(args.mask).resolve())
    if model.brain_mask:
        item["brain"] = model.brain_mask
    q = case_features(model, item, use_truth=args.mask is not None, keep_volume=True)
    dist, idx = nearest(standardise(emb, mean, sd), standardise(q.embedding(s["level"])[None], mean, sd), args.k)
    rows = [{"rank": r + 1, "distance": round(float(d), 4), **{k: doc["cases"][j][k] for k in
             ("id", "class_name", "volume_ml", "size_mm", *PROPERTIES, "image")}}
            for r, (d, j) in enumerate(zip(dist[0], idx[0], strict=True))]
    out = Path(args.out)
    cols = list(rows[0])
    write_text_atomic(out / "neighbours.csv", ",".join(cols) + "\n" + "".join(
        ",".join(json.dumps(r[c]) if isinstance(r[c], str) else str(r[c]) for c in cols) + "\n" for r in rows))
    write_text_atomic(out / "neighbours.json", json.dumps({"query": {"image": item["image"], "box_source": q.box_source,
                                                                     **q.properties}, "neighbours": rows}, indent=1) + "\n")
    panels = [(*q.volume, f"query {item['id']}: {q.properties['volume_ml']:.1f} mL, {q.properties['region']}, "
                          f"{q.properties['hemisphere']} (box from {q.box_source})")]
    stored = bool(s.get("already_registered"))  # the indexed images: registered like when they were indexed
    nb_model = model if stored == args.already_registered else load_model(
        s["overlays"], s["ckpt"], work, args.device, {"already_registered": stored, **args.overrides})
    for r, j in zip(rows, idx[0], strict=True):
        c = doc["cases"][j]
        nb = {"id": c["id"], "image": c["image"], "class": -1, "has_label": int(bool(c.get("label"))), "has_class": 0}
        if c.get("label"):
            nb["label"] = c["label"]
        if model.brain_mask:
            nb["brain"] = model.brain_mask
        panels.append(_panel(nb_model, nb, f"#{r['rank']} {c['id']} (d = {r['distance']:.2f}): {c['class_name']}, "
                                        f"{c['volume_ml']:.1f} mL, {c['region']}, {c['hemisphere']}", bool(c.get("label"))))
    save_neighbour_picture(out / "neighbours.png", panels)
    for r in rows:
        print(f"  #{r['rank']} {r['id']}  d={r['distance']:.3f}  {r['class_name']}  {r['volume_ml']:.1f} mL  "
              f"{r['region']} {r['hemisphere']}")
    print(f"[retrieval query] {len(rows)} neighbour(s) -> {out / 'neighbours.csv'}, neighbours.png")
    return 0


def _panel(model: Any, item: dict, title: str, has_mask: bool) -> tuple:
    """A case's registered image and tumour mask (its own, or the network's) for the picture."""
    import torch

    from pipeline.inference.postprocess import top_component_mask
    from pipeline.inference.predict import predict_volume

    data = model.preprocessing(dict(item))
    image = torch.as_tensor(data["image"]).float()
    if has_mask:
        mask = np.asarray(data["label"])[0] > 0
    else:
        prob, _ = predict_volume(model.network, image[None].to(model.device), model.predict_cfg)
        top = top_component_mask(prob[0].cpu(), model.predict_cfg.threshold)
        mask = np.zeros(image.shape[1:], bool) if top is None else top.numpy().astype(bool)
    return image[0].numpy(), mask, title


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.retrieval.evaluate import evaluate_model, write_report

    results, feats0, items = {}, None, None
    for spec in args.model:
        if len(spec) < 2:
            raise InputError(None, f"--model needs NAME CKPT [OVERLAY ...], got {spec}")
        name, ckpt, overlays = spec[0], spec[1], spec[2:]
        model = load_model([TRAIN, *overlays], ckpt, Path(args.out) / "cache" / name, args.device,
                           {"already_registered": args.already_registered, **args.overrides})
        items = items or _items(args.datalist, model.class_names, model.brain_mask,
                                _split_ids(args.split_file, args.part, args.split_index))
        feats = _embed_all(model, items, True, f"evaluate {name}")
        feats0 = feats0 or feats
        results[name] = evaluate_model(feats, [it["class"] for it in items], args.level, args.kmax, args.draws, args.seed)
        print(f"[retrieval evaluate] {name}: " + ", ".join(
            f"{m} {results[name]['exact'][m][args.report_k - 1]:.3f}" for m in results[name]["exact"]), flush=True)
    info = {"datalist": args.datalist, "models": [list(m) for m in args.model], "level": args.level,
            "draws": args.draws, "seed": args.seed, "cases": len(items)}
    table = write_report(args.out, results, [f.properties["volume_ml"] for f in feats0], [it["class"] for it in items],
                         model.class_names, args.report_k, info)
    print(table)
    print(f"[retrieval evaluate] -> {Path(args.out) / 'retrieval.md'}, retrieval_vs_k.png, embeddings_tsne.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline retrieval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    common.add_argument("--work", default=None, help="cache folder (registration, atlas brain mask)")
    common.add_argument("--already_registered", action="store_true", help="images already on the atlas grid")
    common.add_argument("--level", type=int, default=-1, help="encoder level: -1 bottleneck, -2 one above, 0 full resolution")
    common.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. registration_cache=RUN/../registration (values parsed as JSON when they can be)")
    a = sub.add_parser("index", parents=[common], help="embed a datalist's cases into an index")
    a.add_argument("--datalist", required=True, help="the cases to index (JSON or CSV datalist)")
    a.add_argument("--ckpt", required=True, help="models/model.pt of a training run")
    a.add_argument("--overlays", nargs="*", default=[], help="the overlays it was trained with, e.g. configs/demo.json")
    a.add_argument("--out", required=True, help="index path (writes OUT.json + OUT.npz)")
    a.add_argument("--predicted_box", action="store_true", help="box from the predicted tumour even where a mask exists")
    b = sub.add_parser("query", parents=[common], help="the K nearest cases of a new scan")
    b.add_argument("--index", required=True, help="an index written by the index command (OUT.json)")
    b.add_argument("--image", required=True, help="a NIfTI scan (registered to the atlas like any input)")
    b.add_argument("--mask", default=None, help="its tumour mask (default: the network's)")
    b.add_argument("--k", type=int, default=5, help="neighbours to return (default 5)")
    b.add_argument("--out", required=True, help="folder for neighbours.csv / .json / .png")
    c = sub.add_parser("evaluate", parents=[common], help="leave-one-out K-NN evaluation of one or more networks")
    c.add_argument("--datalist", required=True, help="cases with classes to evaluate on")
    c.add_argument("--model", nargs="+", action="append", required=True, metavar="ARG",
                   help="NAME CKPT [OVERLAY ...]: a network to evaluate, its model.pt and the overlays it was trained with "
                        "(repeat --model per network)")
    c.add_argument("--out", required=True, help="folder for the evaluation tables and plots")
    c.add_argument("--split_file", default=None, help="evaluate only a part of this split file's split")
    c.add_argument("--split_index", type=int, default=0, help="which split of --split_file (default 0)")
    c.add_argument("--part", default="val+test", help="parts of the split, joined by +")
    c.add_argument("--kmax", type=int, default=10, help="largest K of the precision curves (default 10)")
    c.add_argument("--report_k", type=int, default=5, help="the K of the summary table (default 5)")
    c.add_argument("--draws", type=int, default=3, help="box distortion draws per query")
    c.add_argument("--seed", type=int, default=0, help="seed of the box distortion draws")
    args = p.parse_args(argv)
    args.overrides = _overrides(args.set)
    return {"index": _cmd_index, "query": _cmd_query, "evaluate": _cmd_evaluate}[args.cmd](args)
