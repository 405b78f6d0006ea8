#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the bundled specs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vmsd demo
