#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: generated code current,
# ruff, mypy --strict, and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vmsd compile --check
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
