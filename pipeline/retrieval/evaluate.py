"""The retrieval study's evaluation: how well a case's K nearest neighbours predict its properties.

Leave-one-out over a labelled set: each case queries all the others; the class and every location
descriptor of :data:`pipeline.retrieval.index.PROPERTIES` are predicted by the majority of the K neighbours
(a tie goes to the label of the nearest neighbour among the tied ones) and scored by accuracy; the
linear size by the neighbours' mean, scored by RMSE (mm). K = 1 .. ``kmax``; the paper reports K = 5.

Box distortion (the paper's robustness check): the index keeps the exact boxes' embeddings and each
query is embedded with a distorted box (:func:`pipeline.retrieval.index.distort_box`), averaged over
``draws`` independent draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.retrieval.index import PROPERTIES, CaseFeatures, distort_box, nearest, standardise

__all__ = ["vote", "loo_neighbours", "score_neighbours", "evaluate_model", "write_report", "METRICS"]

#: Reported metrics: accuracy of the class and of each descriptor, RMSE of the linear size.
METRICS: tuple[str, ...] = ("class", *PROPERTIES, "size_rmse_mm")


def vote(labels: Sequence[Any]) -> Any:
    """Majority label of neighbours given nearest first; a tie goes to the nearest tied label.
    ``None`` labels (unknown) do not vote; ``None`` when nobody votes."""
    known = [v for v in labels if v is not None]
    if not known:
        return None
    counts: dict[Any, int] = {}
    for v in known:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    return next(v for v in known if counts[v] == best)


def loo_neighbours(index: np.ndarray, queries: np.ndarray, kmax: int) -> np.ndarray:
    """``(N, kmax)`` indices of each query's nearest cases in ``index`` (same order, standardised),
    the query's own case excluded (leave-one-out)."""
    _, idx = nearest(index, queries, min(kmax + 1, len(index)))
    out = np.empty((len(index), min(kmax, len(index) - 1)), dtype=int)
    for i, row in enumerate(idx):
        others = [j for j in row if j != i]
        out[i] = others[: out.shape[1]]
    return out


def score_neighbours(neighbours: np.ndarray, truth: dict[str, list[Any]], sizes: np.ndarray) -> dict[str, list[float]]:
    """Per metric of :data:`METRICS`, its value for K = 1 .. ``neighbours.shape[1]``.

    Args:
        neighbours: ``(N, kmax)`` neighbour indices, nearest first.
        truth: property name -> the N cases' values (``None``: unknown, not scored, does not vote).
        sizes: ``(N,)`` linear sizes (mm).
    """
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for k in range(1, neighbours.shape[1] + 1):
        for name, values in truth.items():
            hits = [vote([values[j] for j in neighbours[i, :k]]) == v for i, v in enumerate(values) if v is not None]
            out[name].append(float(np.mean(hits)) if hits else float("nan"))
        guess = sizes[neighbours[:, :k]].mean(1)
        out["size_rmse_mm"].append(float(np.sqrt(np.mean((guess - sizes) ** 2))))
    return out


def evaluate_model(cases: Sequence[CaseFeatures], classes: Sequence[int | None], level: int = -1, kmax: int = 10,
                   draws: int = 3, seed: int = 0) -> dict[str, Any]:
    """Leave-one-out K-NN scores of one network's embeddings, with exact and distorted query boxes.

    Returns ``{"exact": {metric: [K=1..]}, "distorted": {...}, "embeddings": (N, C) exact}``.
    """
    exact = np.stack([c.embedding(level) for c in cases])
    mean, sd = exact.mean(0), exact.std(0)
    index = standardise(exact, mean, sd)
    truth: dict[str, list[Any]] = {"class": [None if c is None or c < 0 else int(c) for c in classes]}
    for p in PROPERTIES:
        truth[p] = [c.properties[p] for c in cases]
    sizes = np.asarray([c.properties["size_mm"] for c in cases], dtype=float)
    result = {"exact": score_neighbours(loo_neighbours(index, index, kmax), truth, sizes), "embeddings": exact}
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(draws):
        queries = np.stack([c.embedding(level, distort_box(*c.box, rng)) for c in cases])
        runs.append(score_neighbours(loo_neighbours(index, standardise(queries, mean, sd), kmax), truth, sizes))
    result["distorted"] = {m: list(np.mean([r[m] for r in runs], axis=0)) for m in METRICS}
    return result


def _fmt(metric: str, v: float) -> str:
    return f"{v:.2f}" if metric == "size_rmse_mm" else f"{v:.3f}"


def write_report(out: str | Path, results: dict[str, dict[str, Any]], sizes_ml: Sequence[float],
                 classes: Sequence[int | None], class_names: Sequence[str], report_k: int = 5,
                 info: dict[str, Any] | None = None) -> str:
    """Write ``retrieval.csv`` (every model, box, metric, K), ``retrieval.json``, ``retrieval.md``
    (the K = ``report_k`` table), ``retrieval_vs_k.png`` and ``embeddings_tsne.png`` into ``out``.
    Returns the Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io.imageio import atomic_write, write_text_atomic

    out = Path(out)
    rows = [{"model": m, "box": b, "metric": metric, "k": k + 1, "value": v}
            for m, r in results.items() for b in ("exact", "distorted") for metric in METRICS
            for k, v in enumerate(r[b][metric])]
    csv = "model,box,metric,k,value\n" + "".join(f"{r['model']},{r['box']},{r['metric']},{r['k']},{r['value']:.6f}\n"
                                                 for r in rows)
    write_text_atomic(out / "retrieval.csv", csv)
    header = "| model | box | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |"
    lines = [f"Leave-one-out K-NN over {len(sizes_ml)} cases, K = {report_k}: accuracy of the neighbours' majority "
             "for the class and each location descriptor, RMSE (mm) of their mean linear size. "
             "Distorted: query boxes scaled by 2**N(0, 1/3) and shifted by size x N(0, 0.1) per axis.", "",
             header, "|" + " --- |" * (len(METRICS) + 2)]
    for m, r in results.items():
        for b in ("exact", "distorted"):
            vals = [_fmt(metric, r[b][metric][min(report_k, len(r[b][metric])) - 1]) for metric in METRICS]
            lines.append(f"| {m} | {b} | " + " | ".join(vals) + " |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "retrieval.md", table)
    doc = {"info": info or {}, "report_k": report_k,
           "results": {m: {b: r[b] for b in ("exact", "distorted")} for m, r in results.items()}}
    write_text_atomic(out / "retrieval.json", json.dumps(doc, indent=1) + "\n")

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, METRICS, strict=False):
        for i, (m, r) in enumerate(results.items()):
            ks = np.arange(1, len(r["exact"][metric]) + 1)
            ax.plot(ks, r["exact"][metric], "-o", ms=3, color=colours[i % len(colours)], label=f"{m}")
            ax.plot(ks, r["distorted"][metric], "--", color=colours[i % len(colours)], label=f"{m}, distorted box")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("K")
        ax.axvline(report_k, color="0.8", lw=0.8)
    axes.flat[0].legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    atomic_write(out / "retrieval_vs_k.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"), ".png")
    plt.close(fig)

    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    size = 10 + 140 * np.asarray(sizes_ml, float) / max(float(np.max(sizes_ml)), 1e-9)
    cls = np.asarray([-1 if c is None else c for c in classes])
    for ax, (m, r) in zip(axes[0], results.items(), strict=True):
        e = r["embeddings"]
        z = standardise(e, e.mean(0), e.std(0))
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=0).fit_transform(z)
        for c, name in enumerate(class_names):
            sel = cls == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size[sel], alpha=0.7, label=name)
        if (cls < 0).any():
            ax.scatter(xy[cls < 0, 0], xy[cls < 0, 1], s=size[cls < 0], c="0.6", label="unknown")
        ax.set_title(f"{m}: t-SNE of the embeddings")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, title="class (size: volume)")
    fig.tight_layout()
    atomic_write(out / "embeddings_tsne.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"), ".png")
    plt.close(fig)
    return table
