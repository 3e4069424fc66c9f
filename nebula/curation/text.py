"""The text of a row's fields, normalisation, word tokens and n-grams.

Fields follow the repo's dataset rows (`nebula/config/data.py`, `nebula/prompts.py`): the
prompt is `prompt` (a string or a list of chat messages `{role, content}`), a chat row may
instead hold a `messages` list; SFT rows carry their target in `response` / `completion`,
preference rows in `chosen` / `rejected` (strings or lists of messages). A list of messages
reads as its contents joined by newlines (no chat template).

Normalisation (used by exact dedup, MinHash shingles and decontamination alike):
lowercase (`str.lower`), every Unicode punctuation character (categories P*: . , ! ? ' " -
( ) [ ] _ / : ; and the like; *not* symbols such as + = < > $ ^) replaced by a space, runs
of whitespace collapsed to one space, ends stripped. Word tokens are the normalised text
split on spaces. So "Hello,  World!" and "hello world" normalise alike, while "2+3" and
"2-3" do not ("2+3" vs "2 3").
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from typing import Any, Iterable, Sequence

from nebula.curation import CurationError

PROMPT_FIELD = "prompt"        # DatasetConfig.prompt_field's default
MESSAGES_FIELD = "messages"    # chat rows
RESPONSE_FIELDS = ("response", "completion", "chosen", "rejected")  # SFT and preference rows
PROMPT_ROLES = ("system", "user", "tool")  # message roles that count as the prompt


@functools.cache
def _punct_table() -> dict[int, str]:
    return {cp: " " for cp in range(sys.maxunicode + 1)
            if unicodedata.category(chr(cp)).startswith("P")}


# ASCII fast path: bytes.translate with the same mapping restricted to ASCII.
_ASCII_TABLE = bytes(32 if unicodedata.category(chr(b)).startswith("P") else b
                     for b in range(128)) + bytes(range(128, 256))


def _spaced(text: str) -> str:
    """Lowercased, punctuation replaced by spaces (whitespace not yet collapsed)."""
    low = text.lower()
    if low.isascii():
        return low.encode().translate(_ASCII_TABLE).decode()
    return low.translate(_punct_table())


def normalize(text: str) -> str:
    """The normalised text (module doc): lowercase, punctuation -> space, whitespace
    collapsed."""
    return " ".join(_spaced(text).split())


def words(text: str) -> list[str]:
    """Word tokens of the normalised text."""
    return _spaced(text).split()


def ngram_hashes(tokens: Sequence[Any], n: int) -> set[int]:
    """Hashes of the n-grams (consecutive n-tuples) of `tokens`; empty when there are fewer
    than n. Python's `hash` of a tuple: stable within one process only (string hashing is
    salted per process), which is all an in-memory index needs."""
    if len(tokens) < n:
        return set()
    return set(map(hash, zip(*(tokens[k:] for k in range(n)))))


# -- fields ------------------------------------------------------------------------------

def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def value_text(value: Any, where: str, field: str, roles: Iterable[str] | None = None) -> str:
    """The text of a field's value: a string as it is, a list of chat messages as their
    contents joined by newlines (only messages of `roles` when given)."""
    if isinstance(value, str):
        return value
    if _is_messages(value):
        keep = None if roles is None else set(roles)
        return "\n".join(_content_text(m.get("content")) for m in value
                         if keep is None or m.get("role") in keep)
    raise CurationError(f"{where}: field {field!r} must be a string or a list of chat messages "
                        f"({{role, content}}), not {type(value).__name__}")


def row_value(row: dict[str, Any], field: str, where: str) -> Any:
    value = row.get(field)
    if value is None:
        raise CurationError(f"{where}: missing field {field!r}")
    return value


def row_text(row: dict[str, Any], field: str, where: str) -> str:
    """The text of `row[field]` (see `value_text`); a row without it is an error naming it."""
    return value_text(row_value(row, field, where), where, field)


def resolve_field(columns: Iterable[str], field: str | None, source: str) -> str:
    """The text field of a file: `field` when given (it must be a column), else `prompt`,
    else `messages`."""
    cols = list(columns)
    if field is not None:
        if field not in cols:
            raise CurationError(f"{source}: no field {field!r} (fields: {', '.join(cols)})")
        return field
    for name in (PROMPT_FIELD, MESSAGES_FIELD):
        if name in cols:
            return name
    raise CurationError(f"{source}: no {PROMPT_FIELD!r} or {MESSAGES_FIELD!r} field (fields: "
                        f"{', '.join(cols)}); name the text field with --field")


def response_fields_of(columns: Iterable[str]) -> list[str]:
    """The response fields (SFT `response`/`completion`, preference `chosen`/`rejected`) a
    file has."""
    cols = set(columns)
    return [f for f in RESPONSE_FIELDS if f in cols]


def field_texts(rows: Iterable[dict[str, Any]], field: str, source: str = "rows") -> list[str]:
    """The text of `field` in every row; a row without it is an error naming source and row
    (rows count from 0)."""
    return [row_text(row, field, f"{source} row {i}") for i, row in enumerate(rows)]


def split_texts(row: dict[str, Any], field: str, response_fields: Sequence[str], where: str,
                assistant_turns: bool = True) -> list[str]:
    """The texts of a training row that decontamination checks, each n-grammed on its own:
    the prompt (of a chat list: its system/user/tool turns, and with `assistant_turns` its
    assistant turns as the response), then every response field the row has."""
    value = row_value(row, field, where)
    if isinstance(value, str):
        out = [value]
    else:
        out = [value_text(value, where, field, PROMPT_ROLES)]
        if assistant_turns:
            out.append(value_text(value, where, field, ("assistant",)))
    for name in response_fields:
        if row.get(name) is not None:
            out.append(value_text(row[name], where, name))
    return out
