"""Mixed precision and ``torch.compile`` from config: the autocast dtype a run resolves,
and a compiled training run through the bundle whose checkpoints load into an uncompiled network,
resume with compile on, and export to TorchScript. The compiled runs use the ``aot_eager`` backend:
it goes through ``torch.compile``'s wrapping (the ``_orig_mod.`` keys, MetaTensor conversion) without
inductor's minute-long C++ code generation on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.runtime.precision import amp_kwargs, resolve_amp_dtype
from tests.helpers import ROOT
from tests.helpers import TINY as BASE

CONFIGS = "bundles/plgg_mtl/configs"
TINY = {**BASE, "batch_size": 2, "compile": True, "compile_kwargs": {"backend": "aot_eager"}}


def test_amp_dtype_names():
    assert resolve_amp_dtype("float16", "cuda") == "float16" and resolve_amp_dtype("bfloat16", "cpu") == "bfloat16"
    assert amp_kwargs("bfloat16") == {"dtype": torch.bfloat16} and amp_kwargs("float16") == {"dtype": torch.float16}
    native = torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8
    expected = "bfloat16" if native else "float16"
    assert resolve_amp_dtype("auto", "cuda") == expected
    with pytest.raises(ValueError, match="amp_dtype"):
        resolve_amp_dtype("float8", "cuda")


def bundle(command: list[str], configs: list, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", *command, "--config_file", repr([str(c) for c in configs])]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=env, timeout=600)


@pytest.mark.slow
def test_compiled_training_checkpoints_resume_and_export(tmp_path):
    from monai.bundle import ConfigParser

    from pipeline.data.phantom.build import make_cohort
    from pipeline.models.weights import load_network

    datalist = make_cohort(tmp_path / "cohort", cases=6, seed=3, spacing=6.0, space="atlas").datalist
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(TINY), encoding="utf-8")
    configs = [ROOT / CONFIGS / "train.json", ROOT / "configs/demo.json", overlay]
    run = tmp_path / "run"
    first = bundle(["run", "training"], configs, datalist=datalist, output_dir=run, epochs=1)
    assert first.returncode == 0, first.stderr[-3000:]
    second = bundle(["run", "training"], configs, datalist=datalist, output_dir=run, epochs=2)
    assert second.returncode == 0, second.stderr[-3000:]
    epochs = [h["epoch"] for h in json.loads((run / "validation.json").read_text(encoding="utf-8"))["history"]]
    assert epochs == [1, 2], "the second run resumes at epoch 2 instead of starting again"
    for path in [run / "models" / "model.pt", *run.glob("models/checkpoint_epoch=*.pt")]:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        keys = list(saved.get("network", saved))
        assert keys and not any("_orig_mod" in k for k in keys), path
    os.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config([str(ROOT / CONFIGS / "inference.json"), str(ROOT / "configs/demo.json"), str(overlay)])
    plain = load_network(parser.get_parsed_content("network_def"), run / "models" / "model.pt")
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    newest = sorted(run.glob("models/checkpoint_epoch=*.pt"))[-1]  # a resumable checkpoint evaluates too
    split = run / "split.json"
    evaluated = bundle(["run"], [ROOT / CONFIGS / "train.json", ROOT / CONFIGS / "evaluate.json", *configs[1:]],
                       datalist=datalist, output_dir=run, split_file=split, ckpt=newest, eval_dir=tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))["n_cases"] >= 1
    bogus = tmp_path / "bogus.json"  # the setting reaches torch.compile: an unknown backend fails the run
    bogus.write_text(json.dumps({"compile_kwargs": {"backend": "no_such_backend"}}), encoding="utf-8")
    failed = bundle(["run", "training"], [*configs, bogus], datalist=datalist, output_dir=tmp_path / "bogus", epochs=1)
    assert failed.returncode != 0 and "no_such_backend" in failed.stderr
    ts = tmp_path / "model.ts"
    export = bundle(["ckpt_export", "network_def"], [ROOT / CONFIGS / "inference.json", ROOT / "configs/demo.json",
                                                    overlay], filepath=ts, ckpt_file=run / "models" / "model.pt",
                    meta_file=ROOT / CONFIGS / "metadata.json")
    assert export.returncode == 0 and ts.is_file(), export.stderr[-2000:]
    x = torch.randn(1, 1 + plain.coord_channels, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x)[0], plain(x)[0], atol=1e-5)
