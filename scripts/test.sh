#!/usr/bin/env bash
# Set up, then run lint (ruff), types (mypy) and the whole test suite, real-model quality
# tests included (pass -m "not slow" to skip those in a quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check llmprune tests scripts
.venv/bin/mypy
.venv/bin/pytest "$@"
