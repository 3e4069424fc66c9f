"""bench/gpu_check.py's shared pieces: the Qwen2 model both processes build (random init,
nothing downloaded), log lines and device syncs."""

from __future__ import annotations

from typing import Any


def log(msg: str) -> None:
    print(msg, flush=True)


def model_config(shape: dict[str, Any], attn: str) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**shape, tie_word_embeddings=True, attn_implementation=attn,
                       use_cache=False)


def build_model(cfg: Any, device: Any, dtype: Any, seed: int) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
