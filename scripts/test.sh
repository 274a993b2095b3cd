#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU, tiny volumes; real-scan tests skip when
# ../shared/data/real is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -ra "$@"
