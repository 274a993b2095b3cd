"""A tiny bundle run shared by the tests of overlays: cohort, one epoch of training, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from test_inference import CONFIGS, TINY, TRAIN, bundle


def train_and_evaluate(tmp_path: Path, configs: list, seed: int, extra: dict | None = None, name: str = "run",
                       datalist: Path | None = None) -> tuple[Path, Path, Path, str]:
    """Train ``train.json`` + ``configs`` (the tiny overlay replaces the string ``"TINY"`` in them)
    for one epoch on a fresh 8-case phantom cohort (or ``datalist``), then evaluate it.

    Returns ``(datalist, run folder, tiny overlay, training output)``; asserts both commands succeed.
    """
    from pipeline.data.phantom import make_cohort

    if datalist is None:
        datalist = make_cohort(tmp_path / "cohort", cases=8, seed=seed, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / f"tiny_{name}.json"
    overlay.write_text(json.dumps({**TINY, **(extra or {})}), encoding="utf-8")
    files = [overlay if c == "TINY" else c for c in configs]
    run = tmp_path / name
    done = bundle(["run", "training"], [TRAIN, *files], datalist=datalist, output_dir=run, epochs=1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trained = done.stdout + done.stderr
    done = bundle(["run"], [TRAIN, f"{CONFIGS}/evaluate.json", *files], datalist=datalist, output_dir=run)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return datalist, run, overlay, trained
