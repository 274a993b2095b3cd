#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU, tiny volumes; real-scan tests skip when
# ../shared/data/real is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# -n auto: one pytest-xdist worker per core (2 on the CI machine), whole files per worker so a
# module's fixtures are built once; tests/conftest.py gives each worker its share of the threads
python -m pytest -q -ra -n auto --dist loadfile "$@"
