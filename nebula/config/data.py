"""Datasets a job reads (prompts of RL and SFT stages, preference rows of DPO)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from nebula.config.verifier import Strict


class DatasetConfig(Strict):
    """Local jsonl/parquet rows read with `datasets`."""

    path: str = Field(..., description="A .jsonl/.json or .parquet file.")
    prompt_field: str = Field("prompt", description="Field with the prompt: a string, or a "
                              "list of chat messages ({role, content}).")
    reference_field: str = Field("answer", description="Field with the reference answer.")
    verifier: str = Field("math", description="Verifier that scores responses to these prompts.")
    verifier_field: str | None = Field(None, description="Per-row verifier name (overrides "
                                       "`verifier` where present).")
    metadata_fields: list[str] = Field(default_factory=list,
                                       description="Row fields passed to the verifier as metadata.")
    domain: str | None = Field(None, description="Domain tag of every row (MOPD routing).")
    domain_field: str | None = Field(None, description="Per-row domain tag field.")
    chat_template: Literal["auto", "never", "always"] = Field(
        "auto", description="Apply the tokenizer's chat template to plain-text prompts (as one "
        "user message): auto = when it has one. Chat-message prompts always use it. Plain text "
        "without the template is tokenized with the tokenizer's special tokens (BOS where it "
        "adds one), as vLLM and TRL do; templated text carries its own, so no BOS is doubled.")
    system_prompt: str | None = Field(
        None, description="A system message put before every templated prompt that has none.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra options of the chat template, e.g. "
        "{enable_thinking: false} for Qwen3; unknown options are refused when the template "
        "does not use them.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")
