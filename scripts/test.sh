#!/usr/bin/env bash
# Set up (the package, and the browser the dashboard tests drive), then run lint (ruff), types
# (mypy) and the whole test suite, real-model quality and browser tests included (pass
# -m "not slow" to skip those in a quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser.sh
.venv/bin/ruff check llmprune tests scripts
.venv/bin/mypy
.venv/bin/pytest "$@"
