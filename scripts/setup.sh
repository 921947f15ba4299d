#!/usr/bin/env bash
# Create .venv and install llmprune with its test tools.
#
# torch: on a machine without an NVIDIA GPU this installs the pinned CPU build
# (torch==2.13.0, which these machines serve from local disk in seconds) instead of letting pip
# pull the multi-GB CUDA build; with a GPU (nvidia-smi works) it installs the normal build.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"
  else
    spec="torch==2.13.0"
  fi
  echo "setup: installing $spec"
  # shellcheck disable=SC2086
  python -m pip install --quiet $spec
fi

python -m pip install --quiet -e '.[dev]'
python -c "import torch, transformers; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
