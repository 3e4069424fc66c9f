"""Prompt rows from local jsonl/parquet datasets, formatted and tokenized once.

Plain-text prompts are used as they are; chat-message prompts (a list of {role, content})
go through the tokenizer's chat template, so a checkpoint with no chat template still
trains on plain prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nebula.config.job import DatasetConfig


class DatasetError(ValueError):
    pass


@dataclass
class PromptRow:
    index: int
    prompt_text: str
    prompt_ids: list[int]
    reference: str
    verifier: str
    domain: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        return str(self.index)


def _read_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    import datasets

    datasets.disable_progress_bars()
    kind = "parquet" if path.suffix == ".parquet" else "json"
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return list(ds)


def format_prompt(raw: Any, tokenizer: Any, mode: str, where: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(raw, list):  # chat messages
        if not has_template:
            raise DatasetError(f"{where}: chat-message prompt but the tokenizer has no chat "
                               "template; give plain-text prompts or a model with a template")
        return tokenizer.apply_chat_template(raw, tokenize=False, add_generation_prompt=True)
    if not isinstance(raw, str):
        raise DatasetError(f"{where}: prompt must be a string or a list of chat messages")
    if mode == "always" or (mode == "auto" and has_template):
        if not has_template:
            raise DatasetError(f"{where}: chat_template=always but the tokenizer has none")
        return tokenizer.apply_chat_template([{"role": "user", "content": raw}], tokenize=False,
                                             add_generation_prompt=True)
    return raw


def load_prompt_rows(cfg: DatasetConfig, tokenizer: Any, max_prompt_tokens: int | None = None
                     ) -> list[PromptRow]:
    rows = []
    for i, row in enumerate(_read_rows(cfg)):
        where = f"{cfg.path} row {i}"
        if cfg.prompt_field not in row:
            raise DatasetError(f"{where}: missing prompt field {cfg.prompt_field!r}")
        if cfg.reference_field not in row:
            raise DatasetError(f"{where}: missing reference field {cfg.reference_field!r}")
        text = format_prompt(row[cfg.prompt_field], tokenizer, cfg.chat_template, where)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            raise DatasetError(f"{where}: prompt has {len(ids)} tokens; the model's limit "
                               f"leaves room for {max_prompt_tokens}")
        ref = row[cfg.reference_field]
        verifier = row.get(cfg.verifier_field) if cfg.verifier_field else None
        domain = row.get(cfg.domain_field) if cfg.domain_field else None
        rows.append(PromptRow(
            index=i, prompt_text=text, prompt_ids=list(ids),
            reference=ref if isinstance(ref, str) else json.dumps(ref),
            verifier=verifier or cfg.verifier, domain=domain or cfg.domain or "",
            metadata={k: row.get(k) for k in cfg.metadata_fields},
        ))
    if not rows:
        raise DatasetError(f"{cfg.path}: no rows")
    return rows


class PromptOrder:
    """The t-th prompt of an endless, per-epoch reshuffled order (same on every worker)."""

    def __init__(self, rows: list[PromptRow], seed: int) -> None:
        self.rows, self.seed = rows, seed
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, ticket: int) -> PromptRow:
        epoch, pos = divmod(ticket, len(self.rows))
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms = {epoch: perm}
        return self.rows[perm[pos]]
