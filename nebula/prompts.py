"""Prompt rows from local jsonl/parquet datasets, formatted and tokenized once.

Formatting follows what vLLM and TRL do, so a model sees the prompts it was tuned on:

* Chat prompts (a list of {role, content} messages, or plain text with the chat template on)
  are rendered by the tokenizer's chat template with `add_generation_prompt` and the
  dataset's `chat_template_kwargs` (e.g. `enable_thinking`), then tokenized without adding
  special tokens: the template writes its own BOS where the model wants one, so none is
  doubled.
* Plain text without a template is tokenized with the tokenizer's special tokens (BOS where
  the tokenizer adds one), as vLLM does for a text prompt.

The ids made here are the ids the engine generates from and the learner trains on: rollout
sends them to the engine as token ids and records them in the trajectory unchanged.
"""

from __future__ import annotations

import contextlib
import json
import random
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nebula.config.job import DatasetConfig, ModelConfig


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
    templated: bool = False  # the prompt went through the chat template

    @property
    def prompt_id(self) -> str:
        return str(self.index)


_READ: ContextVar[dict[tuple[str, int | None], list[dict[str, Any]]] | None] = ContextVar(
    "nebula_dataset_rows", default=None)


@contextlib.contextmanager
def rows_read_once() -> Iterator[None]:
    """Inside the block each dataset file is parsed once: a preflight checks every row's
    fields, then tokenizes the same rows. Outside it nothing is kept (a long-lived process,
    the API, holds no dataset in memory)."""
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def read_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """The rows of a jsonl/parquet dataset (its first `limit`); read-only."""
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    cache = _READ.get()
    key = (str(path.resolve()), cfg.limit)
    if cache is not None and key in cache:
        return cache[key]
    import datasets

    datasets.disable_progress_bars()
    kind = "parquet" if path.suffix == ".parquet" else "json"
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    rows = list(ds)
    if cache is not None:
        cache[key] = rows
    return rows


def context_len(model: ModelConfig) -> int:
    """Tokens of context (prompt + completion) the engines allocate: `model.max_model_len`, or
    the checkpoint's `max_position_embeddings`. Refuses a max_model_len the model cannot do."""
    cfg_file = Path(model.path) / "config.json"
    native: int | None = None
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        native = data.get("max_position_embeddings") or (data.get("text_config") or {}).get(
            "max_position_embeddings")
    elif model.toy is not None:
        native = model.toy.max_position
    if model.max_model_len is not None:
        if native is not None and model.max_model_len > native:
            raise DatasetError(f"model.max_model_len: {model.max_model_len} is more than the "
                               f"{native} positions of {model.path}")
        return model.max_model_len
    if native is None:
        raise DatasetError(f"model.max_model_len: {cfg_file} has no max_position_embeddings; "
                           "set model.max_model_len")
    return int(native)


def check_template_options(cfg: DatasetConfig, tokenizer: Any, model: str = "the model"
                           ) -> None:
    """Refuse chat options the tokenizer cannot honour, before any row is read: a template
    asked for where there is none, or a `chat_template_kwargs` key the template never reads
    (a misspelt `enable_thinking` would otherwise be ignored silently)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: any of them may read the key
        template = "\n".join(template.values())
    if cfg.chat_template == "always" and not template:
        raise DatasetError(f"{cfg.path}: chat_template=always but the tokenizer of {model} has "
                           "no chat template")
    for key in cfg.chat_template_kwargs:
        if key != "add_generation_prompt" and key not in template:
            raise DatasetError(f"{cfg.path}: chat_template_kwargs.{key}: the chat template of "
                               f"{model} does not use this option")


def uses_template(raw: Any, tokenizer: Any, cfg: DatasetConfig) -> bool:
    """Whether a prompt goes through the chat template: chat messages always, plain text
    with chat_template always, or auto when the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return not isinstance(raw, str) or cfg.chat_template == "always" or (
        cfg.chat_template == "auto" and has_template)


def _with_system(messages: list[dict[str, Any]], cfg: DatasetConfig) -> list[dict[str, Any]]:
    """The messages with the dataset's system prompt first, unless they have one."""
    if cfg.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def format_prompt(raw: Any, tokenizer: Any, cfg: DatasetConfig, where: str
                  ) -> tuple[str, list[int]]:
    """(text, token ids) of one prompt (see the module doc for the rules)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(raw, str):
        if not uses_template(raw, tokenizer, cfg):
            # vLLM's text-prompt path: the tokenizer's own special tokens (BOS) are added.
            return raw, list(tokenizer(raw, add_special_tokens=True)["input_ids"])
        messages: list[dict[str, Any]] = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and all(isinstance(m, dict) and "role" in m for m in raw):
        messages = list(raw)
    else:
        raise DatasetError(f"{where}: field {cfg.prompt_field!r} must be a string or a list "
                           "of chat messages ({role, content})")
    if not has_template:
        raise DatasetError(f"{where}: field {cfg.prompt_field!r} holds chat messages but the "
                           "tokenizer has no chat template; give plain-text prompts or a model "
                           "with a template")
    messages = _with_system(messages, cfg)
    kwargs = dict(cfg.chat_template_kwargs)
    add_gen = bool(kwargs.pop("add_generation_prompt", True))
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_gen, **kwargs)
    # The template wrote any BOS itself: adding special tokens here would double it.
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompt_rows(cfg: DatasetConfig, tokenizer: Any, max_prompt_tokens: int | None = None
                     ) -> list[PromptRow]:
    """Every row of the dataset, formatted and tokenized. `max_prompt_tokens` (the context
    length minus `rollout.max_tokens`) refuses a row whose prompt leaves no room."""
    check_template_options(cfg, tokenizer)
    rows = []
    for i, row in enumerate(read_rows(cfg)):
        where = f"{cfg.path} row {i}"
        if cfg.prompt_field not in row:
            raise DatasetError(f"{where}: missing prompt field {cfg.prompt_field!r}")
        if cfg.reference_field not in row:
            raise DatasetError(f"{where}: missing reference field {cfg.reference_field!r}")
        text, ids = format_prompt(row[cfg.prompt_field], tokenizer, cfg, where)
        if not ids:
            raise DatasetError(f"{where}: field {cfg.prompt_field!r} is empty")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise DatasetError(f"{where}: prompt has {len(ids)} tokens, but the context leaves "
                               f"room for {max_prompt_tokens} (model.max_model_len minus "
                               "rollout.max_tokens)")
        ref = row[cfg.reference_field]
        verifier = row.get(cfg.verifier_field) if cfg.verifier_field else None
        domain = row.get(cfg.domain_field) if cfg.domain_field else None
        rows.append(PromptRow(
            index=i, prompt_text=text, prompt_ids=ids,
            reference=ref if isinstance(ref, str) else json.dumps(ref),
            verifier=verifier or cfg.verifier, domain=domain or cfg.domain or "",
            metadata={k: row.get(k) for k in cfg.metadata_fields},
            templated=uses_template(row[cfg.prompt_field], tokenizer, cfg),
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


@dataclass
class PreferenceRow:
    """One preference pair: the formatted prompt and the chosen / rejected response ids."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _response_ids(raw: Any, prompt_raw: Any, prompt_ids: list[int], tokenizer: Any,
                  cfg: DatasetConfig, where: str, field_name: str) -> list[int]:
    """Token ids of a response: plain text -> its tokens + EOS (as SFT targets); chat
    messages -> the chat template's rendering of prompt + response minus the prompt's, so the
    template's own turn markers end it."""
    if isinstance(raw, str):
        if not raw:
            raise DatasetError(f"{where}: field {field_name!r} is empty")
        return list(tokenizer(raw, add_special_tokens=False)["input_ids"]) + \
            [tokenizer.eos_token_id]
    if not (isinstance(raw, list) and raw and all(isinstance(m, dict) and "role" in m
                                                  for m in raw)):
        raise DatasetError(f"{where}: field {field_name!r} must be a non-empty string or a list "
                           "of chat messages ({role, content})")
    messages = _with_system([{"role": "user", "content": prompt_raw}]
                            if isinstance(prompt_raw, str) else list(prompt_raw), cfg)
    kwargs = {k: v for k, v in cfg.chat_template_kwargs.items() if k != "add_generation_prompt"}
    text = tokenizer.apply_chat_template(messages + list(raw), tokenize=False, **kwargs)
    full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if full[:len(prompt_ids)] != prompt_ids:
        raise DatasetError(f"{where}: the chat template renders prompt + {field_name!r} with a "
                           "different prompt prefix than the prompt alone; give plain-text "
                           "responses")
    return full[len(prompt_ids):]


def load_preference_rows(cfg: DatasetConfig, tokenizer: Any, chosen_field: str,
                         rejected_field: str, max_tokens: int | None = None
                         ) -> list[PreferenceRow]:
    """Every (prompt, chosen, rejected) row, formatted and tokenized like prompts; a row
    without either response, or longer than `max_tokens`, is an error naming the row."""
    check_template_options(cfg, tokenizer)
    out = []
    for i, row in enumerate(read_rows(cfg)):
        where = f"{cfg.path} row {i}"
        for name in (cfg.prompt_field, chosen_field, rejected_field):
            if row.get(name) is None:
                raise DatasetError(f"{where}: missing field {name!r}")
        _, ids = format_prompt(row[cfg.prompt_field], tokenizer, cfg, where)
        chosen, rejected = (_response_ids(row[f], row[cfg.prompt_field], ids, tokenizer, cfg,
                                          where, f) for f in (chosen_field, rejected_field))
        longest = len(ids) + max(len(chosen), len(rejected))
        if max_tokens is not None and longest > max_tokens:
            raise DatasetError(f"{where}: prompt + response has {longest} tokens, more than "
                               f"the model's {max_tokens}-token context")
        out.append(PreferenceRow(i, ids, chosen, rejected))
    if not out:
        raise DatasetError(f"{cfg.path}: no rows")
    return out
