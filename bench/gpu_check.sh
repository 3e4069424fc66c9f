#!/usr/bin/env bash
# One-GPU check of the learner's MFU, one weight sync and peak memory (bench/gpu_check.py).
# Needs torch + transformers only. `bench/gpu_check.sh --dry-run` runs it on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
