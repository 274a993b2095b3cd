"""The experiment's tables: per-run results, per-case results, the summary with paired tests, a plot.

Reads what each finished run of :mod:`pipeline.experiment.runner` left in ``DIR/runs/<arm>/split<k>/``
(``run.json`` from the runner, ``validation.json`` from training, ``metrics.json`` and
``cases.csv`` from the evaluation on the split's test cases) and writes, atomically:

- ``results.csv``: one row per arm x split (:data:`RESULT_COLUMNS`);
- ``cases.csv``: one row per test case per arm per split (id, split, arm, Dice, class probabilities);
- ``summary.json`` / ``summary.md``: per arm mean and sd over splits (beside the reference studies'
  numbers), and per single-task arm the paired comparison with the multi-task arm
  (:func:`pipeline.evaluation.paired_stats.paired_comparison`) over splits and over pooled test cases;
- ``summary.png``: per-split test figures of both arms joined by a line per split, and the
  per-case differences as a box plot.

The single-task arm's own task decides the compared metric: test Dice for ``seg`` (does the class
branch help the segmentation?, the pLGG study), balanced accuracy for ``cls`` (does the
segmentation branch help the classifier?, the related study). Over cases, the classification
comparison uses the probability each arm gives the true class (balanced accuracy has no per-case
value).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from pipeline.evaluation.paired_stats import mean_sd, paired_comparison
from pipeline.io.imageio import atomic_write, write_text_atomic
from pipeline.training.history import HISTORY_FILE, best_validation

__all__ = ["RESULT_COLUMNS", "collect_run", "write_reports", "REFERENCE"]

RESULT_COLUMNS = [
    "arm", "split", "split_name", "status", "val_dice", "val_balanced_accuracy", "best_epoch", "epochs",
    "test_dice", "test_dice_sd", "test_dice_min", "test_hd95_mm", "test_surface_dice", "test_lesion_dice",
    "test_lesion_hd95_mm", "test_lesions_tp", "test_lesions_fn", "test_lesions_fp", "test_box_ap25",
    "test_box_sensitivity_fp1", "test_head_box_ap25", "test_head_box_sensitivity_fp1", "test_accuracy",
    "test_balanced_accuracy", "test_auc", "test_ece", "n_test", "n_test_with_mask", "n_test_with_class", "postprocessing", "seconds", "error",
]
ARM_METRICS = ["val_dice", "test_dice", "test_hd95_mm", "test_surface_dice", "test_lesion_dice", "test_lesion_hd95_mm",
               "test_box_ap25", "test_box_sensitivity_fp1", "test_head_box_ap25", "test_head_box_sensitivity_fp1",
               "val_balanced_accuracy", "test_accuracy", "test_balanced_accuracy", "test_auc"]
# the single-task arm -> the metric of its own task (per split, per case)
COMPARED = {"seg": ("test_dice", "dice"), "cls": ("test_balanced_accuracy", "p_true")}
REFERENCE = {
    "seg": {"source": "pLGG dMTL study, single-task, mean of 6 repeated 70/15/15 splits",
            "val_dice": 0.767, "test_dice": 0.743},
    "mtl": {"source": "pLGG dMTL study, multi-task, mean of 6 repeated 70/15/15 splits",
            "val_dice": 0.788, "test_dice": 0.773},
    "cls": {"source": "related study, classifier alone, 5-fold cross-validation (mean +- sd over folds)",
            "test_accuracy": "0.9587 +- 0.0101"},
    "mtl (related study)": {"source": "related study, multi-task, 5-fold cross-validation (mean +- sd over folds)",
                            "test_accuracy": "0.9599 +- 0.0070"},
}


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def collect_run(run_dir: Path, arm: str, split: int, split_name: str, class_names: list[str]
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run's row of ``results.csv`` and its rows of ``cases.csv`` (empty when not evaluated)."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").is_file() else {}
    row: dict[str, Any] = {"arm": arm, "split": split, "split_name": split_name,
                           "status": info.get("status", "pending"), "epochs": info.get("epochs"),
                           "seconds": info.get("seconds"), "error": info.get("error", "")}
    best = best_validation(run_dir / HISTORY_FILE)
    if row["epochs"] is None and (run_dir / HISTORY_FILE).is_file():  # an older run.json: the last validated epoch
        history = json.loads((run_dir / HISTORY_FILE).read_text(encoding="utf-8")).get("history", [])
        row["epochs"] = max((int(h["epoch"]) for h in history), default=None)
    if best:
        row.update(val_dice=_num(best.get("val_mean_dice")), val_balanced_accuracy=_num(best.get("val_balanced_accuracy")),
                   best_epoch=best.get("epoch"))
    cases: list[dict[str, Any]] = []
    metrics_file = run_dir / "metrics.json"
    if row["status"] != "complete" or not metrics_file.is_file():
        return row, cases
    m = json.loads(metrics_file.read_text(encoding="utf-8"))
    row.update(test_dice=_num(m.get("dice")), test_dice_sd=_num(m.get("dice_std")), test_dice_min=_num(m.get("dice_min")),
               test_accuracy=_num(m.get("accuracy")), test_balanced_accuracy=_num(m.get("balanced_accuracy")),
               test_auc=_num(m.get("auc")), test_ece=_num(m.get("ece")), n_test=m.get("n_cases"),
               test_hd95_mm=_num(m.get("hd95_mm")), test_surface_dice=_num(m.get("surface_dice")),
               test_lesion_dice=_num(m.get("lesion_dice")), test_lesion_hd95_mm=_num(m.get("lesion_hd95_mm")),
               test_lesions_tp=m.get("lesions_tp"), test_lesions_fn=m.get("lesions_fn"),
               test_lesions_fp=m.get("lesions_fp"), test_box_ap25=_num(m.get("det_ap_iou0.25")),
               test_box_sensitivity_fp1=_num(m.get("det_sensitivity_fp1")),
               test_head_box_ap25=_num(m.get("det_head_ap_iou0.25")),
               test_head_box_sensitivity_fp1=_num(m.get("det_head_sensitivity_fp1")),
               n_test_with_mask=m.get("n_with_mask"), n_test_with_class=m.get("n_with_class"),
               postprocessing=m.get("postprocessing"))
    with (run_dir / "cases.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            case: dict[str, Any] = {"id": r["id"], "split": split, "arm": arm, "dice": _num(r.get("dice")),
                                    "hd95_mm": _num(r.get("hd95_mm")), "surface_dice": _num(r.get("surface_dice")),
                                    "lesion_dice": _num(r.get("lesion_dice")),
                                    "lesion_hd95_mm": _num(r.get("lesion_hd95_mm")),
                                    **{k: _num(r.get(k)) for k in ("lesions_tp", "lesions_fn", "lesions_fp")},
                                    "pred_volume_vox": _num(r.get("pred_volume_vox")),
                                    "true_volume_vox": _num(r.get("true_volume_vox")),
                                    "true_class": r.get("true_class", ""), "predicted_class": r.get("predicted_class", "")}
            for name in class_names:
                case[f"p_{name}"] = _num(r.get(f"p_{name}"))
            t = r.get("true_class")
            case["p_true"] = case.get(f"p_{t}") if t else None
            cases.append(case)
    return row, cases


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()


def _clean(obj: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def summarise(rows: list[dict[str, Any]], cases: list[dict[str, Any]], arms: list[str], seed: int = 0
              ) -> dict[str, Any]:
    """``summary.json``'s content: per-arm statistics and the paired comparisons (see module doc)."""
    done = [r for r in rows if r["status"] == "complete"]
    summary: dict[str, Any] = {"arms": {}, "comparisons": [], "paired": None, "reference": REFERENCE}
    for arm in arms:
        arm_rows = [r for r in done if r["arm"] == arm]
        entry: dict[str, Any] = {"n_splits": len(arm_rows), "n_planned": sum(1 for r in rows if r["arm"] == arm)}
        for metric in ARM_METRICS:
            mean, sd, n = mean_sd([r.get(metric) for r in arm_rows])
            entry[f"{metric}_mean"], entry[f"{metric}_sd"] = mean, sd
        entry["n_test_cases_scored"] = sum(int(r.get("n_test_with_mask") or 0) for r in arm_rows)
        entry["pooled_cases"] = _pooled([c for c in cases if c["arm"] == arm and c.get("dice") is not None])
        summary["arms"][arm] = entry
    if "mtl" in arms:
        for single in (a for a in ("seg", "cls") if a in arms):
            metric, case_metric = COMPARED[single]
            by_split = {(r["arm"], r["split"]): r for r in done}
            splits = sorted({r["split"] for r in done if (single, r["split"]) in by_split and ("mtl", r["split"]) in by_split})
            on_splits = paired_comparison([by_split[(single, k)].get(metric) for k in splits],
                                          [by_split[("mtl", k)].get(metric) for k in splits], seed=seed)
            on_splits["splits"] = splits
            by_case = {(c["arm"], c["split"], c["id"]): c for c in cases}
            keys = sorted({(k, c["id"]) for c in cases for k in [c["split"]]
                           if (single, k, c["id"]) in by_case and ("mtl", k, c["id"]) in by_case})
            on_cases = paired_comparison([by_case[(single, k, i)].get(case_metric) for k, i in keys],
                                         [by_case[("mtl", k, i)].get(case_metric) for k, i in keys], seed=seed)
            del on_cases["differences"]  # in cases.csv already; the summary stays readable
            comparison = {
                "single_task_arm": single, "multi_task_arm": "mtl", "metric": metric, "case_metric": case_metric,
                "mean_difference": on_splits["mean_difference"], "ci95": on_splits["ci95"],
                "splits": on_splits, "cases": on_cases,
                "tests": "splits: Wilcoxon signed-rank (two-sided; exact null distribution without ties or zero "
                         "differences, exact permutation test with them up to 13 pairs, normal approximation "
                         "beyond) and paired t-test on the per-split "
                         f"differences mtl - {single} of {metric}; cases: Wilcoxon signed-rank on the per-case "
                         f"differences of {case_metric} pooled over splits (a case in several test sets counts "
                         "once per split, so these pairs are not independent: read it as descriptive). "
                         "ci95: percentile bootstrap of the mean per-split difference.",
            }
            summary["comparisons"].append(comparison)
        if summary["comparisons"]:
            summary["paired"] = summary["comparisons"][0]
    return summary


def _pooled(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and minimum of each case metric over the pooled test cases of an arm (with k-fold,
    every case once: the cross-validated figure)."""
    out: dict[str, Any] = {"n": len(cases)}
    for key in ("dice", "hd95_mm", "surface_dice", "lesion_dice", "lesion_hd95_mm"):
        mean, sd, _ = mean_sd([c.get(key) for c in cases])
        values = [c[key] for c in cases if c.get(key) is not None]
        out[key] = {"mean": mean, "sd": sd, "min": min(values) if values else None,
                    "max": max(values) if values else None}
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and 0 < abs(v) < 10 ** -digits:
        return f"{v:.1e}"  # a small p-value stays readable instead of 0.000
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary_markdown(summary: dict[str, Any], rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The human-readable ``summary.md``."""
    lines = [f"# Experiment: {info.get('kind', '')} splits, arms {', '.join(summary['arms'])}", "",
             f"Datalist `{info.get('datalist')}`, overlays {info.get('overlays')}, seed {info.get('seed')}, "
             f"epochs {info.get('epochs') or 'from the overlays'}.", "", "## Per run", "",
             "| arm | split | status | val Dice (best epoch) | best epoch | test Dice (sd) | HD95 mm | surface Dice "
             "| lesion Dice | lesion HD95 mm | lesions TP / FN / FP | mask boxes AP (IoU 0.25) / sens. at 1 FP "
             "| test bal. acc. | test AUC | test cases scored (mask / class) | min |", "|" + " --- |" * 16]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['split']} | {r['status']} | {_fmt(r.get('val_dice'))} | {_fmt(r.get('best_epoch'))} "
                     f"| {_fmt(r.get('test_dice'))} ({_fmt(r.get('test_dice_sd'))}) | {_fmt(r.get('test_hd95_mm'), 1)} "
                     f"| {_fmt(r.get('test_surface_dice'))} | {_fmt(r.get('test_lesion_dice'))} "
                     f"| {_fmt(r.get('test_lesion_hd95_mm'), 1)} | {_fmt(r.get('test_lesions_tp'))} / "
                     f"{_fmt(r.get('test_lesions_fn'))} / {_fmt(r.get('test_lesions_fp'))} "
                     f"| {_fmt(r.get('test_box_ap25'))} / {_fmt(r.get('test_box_sensitivity_fp1'))} "
                     f"| {_fmt(r.get('test_balanced_accuracy'))} "
                     f"| {_fmt(r.get('test_auc'))} | {_fmt(r.get('n_test_with_mask'))} / {_fmt(r.get('n_test_with_class'))} "
                     f"| {_fmt((r.get('seconds') or 0) / 60, 1)} |")
    lines += ["", "## Per arm: mean (sd) over splits", "",
              "| arm | splits | val Dice | test Dice | test HD95 mm | test surface Dice | test lesion Dice "
              "| test lesion HD95 mm | test accuracy | test bal. acc. | test AUC | reference |",
              "|" + " --- |" * 12]
    for arm, a in summary["arms"].items():
        refs = [REFERENCE[arm]] if arm in REFERENCE else []
        if arm == "mtl" and "cls" in summary["arms"]:
            refs.append(REFERENCE["mtl (related study)"])
        ref_txt = "; ".join(", ".join(f"{k} {v}" for k, v in r.items() if k != "source") + f" ({r['source']})"
                            for r in refs)
        lines.append(f"| {arm} | {a['n_splits']}/{a['n_planned']} | "
                     + " | ".join(f"{_fmt(a[f'{m}_mean'])} ({_fmt(a[f'{m}_sd'])})"
                                  for m in ("val_dice", "test_dice", "test_hd95_mm", "test_surface_dice",
                                            "test_lesion_dice", "test_lesion_hd95_mm", "test_accuracy",
                                            "test_balanced_accuracy", "test_auc"))
                     + f" | {ref_txt} |")
    lines += ["", "## Per arm: every test case pooled (k-fold: each case once)", "",
              "| arm | cases | Dice mean (sd) [min] | HD95 mm | surface Dice | lesion Dice | lesion HD95 mm |",
              "|" + " --- |" * 7]
    for arm, a in summary["arms"].items():
        pooled = a.get("pooled_cases") or {"n": 0}
        if not pooled["n"]:
            continue
        d = pooled["dice"]
        lines.append(f"| {arm} | {pooled['n']} | {_fmt(d['mean'])} ({_fmt(d['sd'])}) [{_fmt(d['min'])}] | "
                     + " | ".join(f"{_fmt(pooled[k]['mean'], 1 if k.endswith('mm') else 3)}"
                                  for k in ("hd95_mm", "surface_dice", "lesion_dice", "lesion_hd95_mm")) + " |")
    for c in summary["comparisons"]:
        s, k = c["splits"], c["cases"]
        lines += ["", f"## Multi-task minus single-task ({c['single_task_arm']}) on {c['metric']}", "",
                  f"- per split (n = {s['n']}): differences {', '.join(_fmt(d) for d in s['differences'])}; mean "
                  f"{_fmt(s['mean_difference'])}, 95 % bootstrap CI [{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]; "
                  f"mtl better in {s['n_positive']}, worse in {s['n_negative']}",
                  f"- Wilcoxon signed-rank over splits: p = {_fmt(s['wilcoxon_p'])} ({s['wilcoxon_method']}); paired "
                  f"t-test: t = {_fmt(s['ttest_t'])}, p = {_fmt(s['ttest_p'])}. With {s['n']} splits the smallest "
                  f"p the exact Wilcoxon test can give is {_fmt(s['smallest_possible_p'])}: only a large, consistent "
                  "effect can reach p < 0.05.",
                  f"- over pooled test cases ({c['case_metric']}, n = {k['n']}): mean difference "
                  f"{_fmt(k['mean_difference'])}, Wilcoxon p = {_fmt(k['wilcoxon_p'])} ({k['wilcoxon_method']})",
                  "", c["tests"]]
    return "\n".join(lines) + "\n"


def summary_plot(summary: dict[str, Any], rows: list[dict[str, Any]], cases: list[dict[str, Any]], path: Path) -> None:
    """``summary.png``: paired per-split points joined by lines, and per-case differences (box plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    comps = summary["comparisons"] or [None]
    fig, axes = plt.subplots(len(comps), 2, figsize=(9, 3.8 * len(comps)), squeeze=False)
    for (ax_l, ax_r), c in zip(axes, comps, strict=True):
        if c is None:  # no pair of arms to compare: each arm's test Dice per split
            arms = sorted({r["arm"] for r in rows})
            for i, arm in enumerate(arms):
                vals = [r["test_dice"] for r in rows if r["arm"] == arm and r.get("test_dice") is not None]
                ax_l.plot([i] * len(vals), vals, "o")
            ax_l.set_xticks(range(len(arms)), arms)
            ax_l.set_ylabel("test Dice")
            ax_r.axis("off")
            continue
        single, metric, case_metric = c["single_task_arm"], c["metric"], c["case_metric"]
        by = {(r["arm"], r["split"]): r.get(metric) for r in rows if r["status"] == "complete"}
        for k in c["splits"]["splits"]:
            a, b = by.get((single, k)), by.get(("mtl", k))
            if a is not None and b is not None:
                ax_l.plot([0, 1], [a, b], "-o", color="tab:blue" if b >= a else "tab:red", alpha=0.8)
                ax_l.annotate(f"split {k}", (1.02, b), fontsize=7, va="center")
        ax_l.set_xticks([0, 1], [f"{single} (single-task)", "mtl (multi-task)"])
        ax_l.set_xlim(-0.3, 1.4)
        ax_l.set_ylabel(metric.replace("_", " "))
        ax_l.set_title(f"per split (p = {_fmt(c['splits']['wilcoxon_p'])}, Wilcoxon)", fontsize=9)
        by_case = {(x["arm"], x["split"], x["id"]): x.get(case_metric) for x in cases}
        diffs = [by_case[("mtl", k, i)] - by_case[(single, k, i)] for (arm, k, i) in by_case
                 if arm == single and by_case.get(("mtl", k, i)) is not None and by_case[(arm, k, i)] is not None]
        if diffs:
            ax_r.boxplot(diffs, widths=0.4, showfliers=False)  # every case is drawn below
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(diffs))
            ax_r.plot(1 + jitter, diffs, ".", alpha=0.6)
        ax_r.axhline(0, color="grey", lw=0.8)
        ax_r.set_xticks([1], [f"mtl - {single}"])
        ax_r.set_ylabel(f"per-case difference of {case_metric}")
        ax_r.set_title(f"{len(diffs)} test cases over splits", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_reports(out_dir: Path, rows: list[dict[str, Any]], cases: list[dict[str, Any]], arms: list[str],
                  class_names: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.csv``, ``cases.csv``, ``summary.json``, ``summary.md`` and ``summary.png``
    in ``out_dir`` (each atomically) and return the summary."""
    write_text_atomic(out_dir / "results.csv", _csv(rows, RESULT_COLUMNS))
    case_cols = ["id", "split", "arm", "dice", "hd95_mm", "surface_dice", "lesion_dice", "lesion_hd95_mm",
                 "lesions_tp", "lesions_fn", "lesions_fp", "pred_volume_vox", "true_volume_vox", "true_class",
                 "predicted_class",
                 *[f"p_{n}" for n in class_names]]
    write_text_atomic(out_dir / "cases.csv", _csv(cases, case_cols))
    summary = summarise(rows, cases, arms, seed=int(info.get("seed") or 0))
    summary = {"experiment": info, **summary}
    write_text_atomic(out_dir / "summary.json", json.dumps(_clean(summary), indent=1))
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary, rows, info))
    summary_plot(summary, rows, cases, out_dir / "summary.png")
    return summary
