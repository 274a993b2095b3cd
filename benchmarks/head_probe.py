"""What the class head of a trained multi-task run has to work with: linear probes on its inputs.

For each run of an experiment folder (``python -m pipeline experiment``: ``EXP/splits.json``,
``EXP/runs/<arm>/split<i>/``), every case of the split goes through the run's own preprocessing and
whole-volume prediction (the tumour-centred class patch, as in evaluation), and the class head's input
is recorded: the pooled bottleneck (the embedding) and the predicted tumour's atlas position. Then
L2-regularised logistic regressions (scikit-learn, features standardised on the training cases) are
fitted on the training cases and scored on the test cases, on the position alone, the embedding alone
and both, beside the head's own test balanced accuracy. A probe that beats the head on the same
inputs says the head learns less than its inputs hold (e.g. it learns the training cases by heart
from the embedding's many features); a probe on the embedding near chance says the features carry
little of the class.

    python benchmarks/head_probe.py EXP [EXP ...] [--arm mtl] [--C 1.0] [--out probes.json]

The run's configs and settings are read from its ``command.txt`` (the runner writes it). CPU, a few
seconds per case.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: ``--key value`` settings of the training command that the probe's preprocessing needs too.
KEPT_SETTINGS = ("already_registered", "registration_cache", "registration_settings", "atlas_spacing")


def training_command(run: Path) -> tuple[list[str], dict[str, str]]:
    """``(config files, kept settings)`` of the training line of ``run/command.txt``."""
    for line in (run / "command.txt").read_text(encoding="utf-8").splitlines():
        if " run training " not in line:
            continue
        words = shlex.split(line)
        configs = [str(ROOT / c) if not Path(c).is_absolute() else c
                   for c in ast.literal_eval(words[words.index("--config_file") + 1])]
        settings = {w[2:]: words[i + 1] for i, w in enumerate(words[:-1]) if w[2:] in KEPT_SETTINGS}
        return configs, settings
    raise SystemExit(f"{run / 'command.txt'}: no training command in it")


def head_inputs(run: Path, split: dict, datalist: str) -> dict[str, dict]:
    """Per case of the split: its part, class, the head's input split into embedding and position,
    and the head's logits."""
    import torch

    from pipeline.data.datalist import load_datalist, to_monai_dicts
    from pipeline.inference.predict import predict_raw
    from pipeline.retrieval.index import load_model

    configs, settings = training_command(run)
    overrides = {k: (v == "True" if v in ("True", "False") else v) for k, v in settings.items()}
    model = load_model(configs, run / "models" / "model.pt", run, device="cpu", overrides=overrides)
    net = model.network
    if getattr(net, "classifier", None) is None:
        raise SystemExit(f"{run}: this network has no class head")
    n_emb = int(getattr(net.classifier, "n_features", net.embedding_dim))  # the head's own split of its input
    dl = load_datalist(datalist).with_classes(model.class_names)
    items = {it["id"]: it for it in to_monai_dicts(list(dl.cases))}
    seen: list = []
    hook = net.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    rows = {}
    try:
        for part in ("train", "val", "test"):
            for cid in split[part]:
                item = dict(items[cid])
                if item.get("class") is None:
                    continue
                if model.brain_mask:
                    item["brain"] = model.brain_mask
                data = model.preprocessing(item)
                seen.clear()
                with torch.no_grad():
                    _, logits = predict_raw(net, torch.as_tensor(data["image"]).float()[None], model.predict_cfg)
                # the last passes are the class patch's (one per class flip); the first of them is unflipped
                x = seen[-len(model.predict_cfg.class_flips)][0].numpy()
                rows[cid] = {"part": part, "cls": int(item["class"]), "embedding": x[:n_emb],
                             "position": x[n_emb:], "pred": int(logits[0].argmax())}
    finally:
        hook.remove()
    return rows


def probes(rows: dict[str, dict], c: float) -> dict[str, float]:
    """Test balanced accuracy of the head and of logistic-regression probes on its inputs."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    def part(name: str) -> list[dict]:
        return [r for r in rows.values() if r["part"] == name]

    train, test = part("train"), part("test")
    y_train, y_test = [r["cls"] for r in train], [r["cls"] for r in test]
    out = {"cases_train": len(train), "cases_test": len(test),
           "head": float(balanced_accuracy_score(y_test, [r["pred"] for r in test]))}
    for name, keys in (("position", ["position"]), ("embedding", ["embedding"]), ("both", ["embedding", "position"])):
        x_train = np.array([np.concatenate([r[k] for k in keys]) for r in train])
        x_test = np.array([np.concatenate([r[k] for k in keys]) for r in test])
        if x_train.shape[1] == 0:
            continue
        mean, sd = x_train.mean(0), x_train.std(0) + 1e-6
        probe = LogisticRegression(C=c, max_iter=5000).fit((x_train - mean) / sd, y_train)
        out[f"probe_{name}"] = float(balanced_accuracy_score(y_test, probe.predict((x_test - mean) / sd)))
        out[f"probe_{name}_train"] = float(balanced_accuracy_score(y_train, probe.predict((x_train - mean) / sd)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", help="experiment folders (EXP/splits.json, EXP/runs/<arm>/split<i>)")
    p.add_argument("--arm", default="mtl", help="the arm whose runs are probed")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probes (scikit-learn's C)")
    p.add_argument("--out", help="write every run's figures to this JSON file")
    args = p.parse_args(argv)
    results = []
    print("| experiment | split | train / test cases | head | probe: position | probe: embedding | probe: both |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for exp in map(Path, args.experiments):
        info = json.loads((exp / "splits.json").read_text(encoding="utf-8"))
        for i, split in enumerate(info["splits"]):
            run = exp / "runs" / args.arm / f"split{i}"
            if not (run / "models" / "model.pt").is_file():
                print(f"[probe] {run}: no models/model.pt, skipped", file=sys.stderr)
                continue
            r = probes(head_inputs(run, split, info["datalist"]), args.C)
            results.append({"experiment": str(exp), "split": i, **r})
            cells = [f"{r[k]:.3f}" if k in r else "n/a" for k in ("head", "probe_position", "probe_embedding", "probe_both")]
            print(f"| {exp.name} | {i} | {r['cases_train']} / {r['cases_test']} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
