#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test extras.
# torch==2.13.0 goes first so that pip takes the CPU build and never a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU build where available)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "[setup] installing pipeline[dev]"
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, monai, SimpleITK, ignite, nilearn; print(f'[setup] torch {torch.__version__}, monai {monai.__version__}, SimpleITK {SimpleITK.Version_VersionString()}, ignite {ignite.__version__}')"
