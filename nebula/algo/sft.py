"""SFT: cross-entropy on the reference (target) tokens of a prompt dataset."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from nebula.algo.base import Algorithm, Example, LossInput
from nebula.config.data import DatasetConfig
from nebula.config.stage import StageConfig


class SFTStage(StageConfig):
    type: Literal["sft"] = "sft"
    dataset: DatasetConfig | None = Field(None, description="SFT rows (default: datasets.train); "
                                          "the target is the reference field.")
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Sequences per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (5% linear warm-up, then "
                      "cosine decay to 10% of it).")


class SFT(Algorithm):
    Config = SFTStage
    online = False
    measured = False

    def dataset(self) -> DatasetConfig:
        return self.stage.dataset or self.job.datasets.train[0]

    def row_fields(self, dataset: DatasetConfig) -> tuple[str, ...]:
        return (dataset.reference_field,) if dataset is self.dataset() else ()  # the target

    def preflight(self, where: str, tokenizer: Any, context_len: int,
                  train_domains: Sequence[str]) -> None:
        from nebula.prompts import load_prompt_rows

        if self.stage.dataset is not None:
            load_prompt_rows(self.stage.dataset, tokenizer, context_len)

    def examples(self, tokenizer: Any) -> list[Example]:
        from nebula.prompts import load_prompt_rows

        eos = tokenizer.eos_token_id
        return [Example([(r.prompt_ids, tokenizer(r.reference, add_special_tokens=False)
                          ["input_ids"] + [eos])])
                for r in load_prompt_rows(self.dataset(), tokenizer)]

    def loss(self, inp: LossInput) -> tuple[Any, dict[str, float]]:
        from nebula.losses.sft import sft_loss

        loss = sft_loss(inp.logprobs, inp.batch.mask, num_tokens=inp.num_tokens)
        return loss, {"loss": float(loss.detach()), "tokens": float(inp.batch.num_tokens)}

    def summarise(self, metrics: dict[str, float]) -> None:
        import math

        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
