"""Config of the teacher-logprob service (`python -m teacher`, on-policy distillation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from nebula.config.verifier import Strict


class TeacherModelConfig(Strict):
    """One hosted teacher: a Hugging Face causal LM checkpoint."""

    name: str = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients ask for (unique within the service).",
    )
    path: str = Field(..., description="Hugging Face checkpoint dir (config, weights, tokenizer).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights and forward dtype; log-probs are always float32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the forward runs; auto picks cuda when a GPU is visible."
    )
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="What computes the log-probs: transformers (a forward pass), vllm "
        "(prompt log-probs; batching and CUDA kernels of vLLM), auto = vllm on cuda when vLLM "
        "is installed, else transformers."
    )
    version: str | None = Field(
        None,
        description="Teacher version reported with every answer and part of the cache key "
        "(default: a short sha256 of the checkpoint's config and weight files).",
    )
    max_batch_tokens: int = Field(
        16384, gt=0,
        description="Most padded tokens (sequences x longest length) in one forward pass; bigger "
        "batches are split. Bounds the logits memory (about tokens x vocab x 4 bytes). A single "
        "sequence longer than this still runs, alone.",
    )


class TeacherServiceConfig(Strict):
    """The teacher-logprob gRPC service."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50061, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; none disables it."
    )
    teachers: list[TeacherModelConfig] = Field(
        ..., min_length=1, description="The hosted teachers (at least one; names unique)."
    )
    batch_wait_ms: float = Field(
        5.0, ge=0,
        description="Dynamic batching window: sequences for one teacher that arrive within this "
        "time of the first are merged into one forward pass.",
    )
    max_batch_sequences: int = Field(
        64, gt=0, description="Sequences that close the batching window early, and the most "
        "in one forward pass (a batch is length-sorted, then cut into passes). A request's "
        "sequences are never split across batches."
    )
    cache_entries: int = Field(
        4096, ge=0, description="LRU cache of per-sequence results, in sequences; 0 disables it."
    )
    max_top_k: int = Field(
        64, gt=0, description="Largest top_k a request may ask for (bounds response size)."
    )
    max_message_mb: int = Field(64, gt=0, description="Largest gRPC message accepted, MiB.")

    @field_validator("teachers")
    @classmethod
    def _names_unique(cls, teachers: list[TeacherModelConfig]) -> list[TeacherModelConfig]:
        seen: set[str] = set()
        for t in teachers:
            if t.name in seen:
                raise ValueError(f"duplicate teacher name {t.name!r}")
            seen.add(t.name)
        return teachers
