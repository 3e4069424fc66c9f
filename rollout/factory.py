"""Build the rollout engine a job config asks for."""

from __future__ import annotations

import os
from typing import Any

from nebula.config.job import JobConfig
from nebula.prompts import context_len


def make_engine(cfg: JobConfig, seed: int) -> Any:
    from rollout.engine import create_engine

    rc = cfg.rollout
    kwargs: dict[str, Any] = {}
    if rc.engine == "vllm":
        cache = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(cfg.output_dir, ".vllm-cache")
        kwargs = {"cache_root": cache, "max_model_len": context_len(cfg.model)}
        if cfg.weight_sync_mode() == "nccl":
            kwargs["weight_transfer"] = "nccl"
    return create_engine(rc.engine, cfg.model.path, dtype=cfg.rollout_dtype(), seed=seed,
                         kv_cache_gb=rc.kv_cache_gb, **kwargs)
