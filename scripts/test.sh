#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: specs formatted, generated code current,
# ruff, mypy --strict, the documentation site (warnings are errors), and the
# test suite (which also runs every example of the documentation).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vmsd fmt --check
.venv/bin/vmsd compile --check
.venv/bin/ruff check .
.venv/bin/mypy
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
.venv/bin/mkdocs build --strict --site-dir "$site"
.venv/bin/python -m pytest "$@"
