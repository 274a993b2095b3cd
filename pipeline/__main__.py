"""`python -m pipeline <command> ...`: the steps that are not a MONAI bundle workflow.

Each command lives in its own module, which exposes ``main(argv) -> int``; this file only
dispatches, so importing one command never pulls in the others' dependencies.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.io.errors import DEBUG_ENV, InputError, InputErrors, debug_requested

COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("pipeline.data.phantom.build", "build the synthetic cohort (MNI152 anatomy, class-dependent tumours)"),
    "validate": ("pipeline.data.datalist", "check every entry of a datalist (JSON or CSV) and report all problems"),
    "split": ("pipeline.data.splits", "write seeded patient-level splits (ratio or k-fold) to a JSON file"),
    "score": ("pipeline.evaluation.score", "native-space Dice and class accuracy of an inference run against ground truth"),
    "prepare": ("pipeline.data.prepare", "register a whole datalist to the atlas (cached, resumable, QC pictures)"),
    "onnx": ("pipeline.models.onnx_export", "export trained weights to ONNX, dynamic batch and spatial axes, checked by ONNX Runtime"),
    "retrieval": ("pipeline.retrieval.cli", "similar-case retrieval: index a datalist, query a scan, evaluate K-NN (Pisov et al.)"),
    "experiment": ("pipeline.experiment.runner", "the study's protocol: repeated splits / k-fold, single- vs multi-task, paired tests"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: python -m pipeline [--debug] <command> [options]\n\ncommands:\n" + "\n".join(lines)
            + f"\n\nexit status: 0 done, 1 some cases failed, 2 bad command, option, datalist or file (one line "
              f"naming the file and the reason; --debug or {DEBUG_ENV}=1 adds the Python traceback)")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``<module>.main(rest)``; user errors print one clear message and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        import os

        os.environ[DEBUG_ENV] = "1"  # also reaches the bundle subprocesses an experiment starts
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except (InputError, InputErrors) as exc:
        if debug_requested():
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
