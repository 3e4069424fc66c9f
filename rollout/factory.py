"""Build the rollout engine a job config asks for."""

from __future__ import annotations

import os
from typing import Any

from nebula.config.job import JobConfig
from nebula.prompts import context_len


def engine_options(cfg: JobConfig) -> dict[str, Any]:
    """The engine's keyword arguments beyond model, dtype and seed (pure: tests read them).

    vLLM: context length (`model.max_model_len`), cache dir, `rollout.tensor_parallel_size`,
    `rollout.gpu_memory_utilization` (GPU only), `rollout.enforce_eager` (None: on for CPU,
    off on GPU) and NCCL weight transfer with `learner.weight_sync: nccl`; the engine turns
    them into vLLM's arguments for the device it finds (`rollout.engine.vllm_engine_kwargs`).
    `rollout.resources` is placement, done by the runner."""
    rc = cfg.rollout
    if rc.engine != "vllm":
        return {"kv_cache_gb": rc.kv_cache_gb}
    cache = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(cfg.output_dir, ".vllm-cache")
    kwargs: dict[str, Any] = {
        "cache_root": cache, "max_model_len": context_len(cfg.model),
        "kv_cache_gb": rc.kv_cache_gb, "tensor_parallel_size": rc.tensor_parallel_size,
        "gpu_memory_utilization": rc.gpu_memory_utilization, "enforce_eager": rc.enforce_eager}
    if cfg.weight_sync_mode() == "nccl":
        kwargs["weight_transfer"] = "nccl"
    return kwargs


def make_engine(cfg: JobConfig, seed: int) -> Any:
    from rollout.engine import create_engine

    return create_engine(cfg.rollout.engine, cfg.model.path, dtype=cfg.rollout_dtype(),
                         seed=seed, **engine_options(cfg))
