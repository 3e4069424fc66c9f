"""Row filters: token-length bounds, language id, a user predicate.

* Length: tokens of the field's text with a model's tokenizer (`AutoTokenizer` of a
  checkpoint dir, no special tokens added, chat messages as their contents joined by newlines,
  no chat template), or whitespace words of the raw text without one. Bounds are inclusive.
* Language: `langdetect` (seeded, so deterministic) on the field's text; a row whose text has
  no detectable language is "unknown" and dropped when languages are asked for.
* Predicate: `pkg.module:func`, called as func(row) -> bool with the row as a dict; rows for
  which it returns false are dropped; an exception is an error naming the row.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from nebula.curation import CurationError
from nebula.curation.text import field_texts

Predicate = Callable[[dict[str, Any]], bool]


def load_tokenizer(path: str) -> Any:
    """`AutoTokenizer.from_pretrained(path)` of a local checkpoint/tokenizer dir."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise CurationError(f"--tokenizer: {path} is not a directory")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loading failure is a usage error here
        raise CurationError(f"--tokenizer: cannot load a tokenizer from {path}: "
                            f"{type(e).__name__}: {e}") from None


def token_lengths(texts: Sequence[str], tokenizer: Any = None, batch: int = 1024) -> list[int]:
    """Tokens per text (the tokenizer's, no special tokens), or whitespace words without
    one."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    out: list[int] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i:i + batch]), add_special_tokens=False)["input_ids"]
        out.extend(len(ids) for ids in enc)
    return out


def detect_language(text: str) -> str:
    """ISO 639-1 code of `text` by langdetect (seeded), or "unknown"."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return "unknown"


def load_predicate(spec: str) -> Predicate:
    """The callable named `pkg.module:func` (a dotted attribute path after the colon),
    importable from sys.path or the current directory."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CurationError(f"--predicate: {spec!r} is not of the form pkg.module:func")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the `nebula` script's path lacks the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001
        raise CurationError(f"--predicate: cannot import module {module_name!r}: "
                            f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CurationError(f"--predicate: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CurationError(f"--predicate: {spec} is not callable")
    return obj


@dataclass
class FilterResult:
    rows: int
    keep: list[int]
    removed: list[dict[str, Any]] = field(default_factory=list)  # {row, reason, ...}
    params: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for r in self.removed:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"rows": self.rows, "kept": len(self.keep), "removed": len(self.removed),
                "by_reason": reasons, **self.params, "removed_rows": self.removed}


def filter_rows(rows: Sequence[dict[str, Any]], field: str = "prompt",
                min_tokens: int | None = None, max_tokens: int | None = None,
                tokenizer: Any = None, languages: Iterable[str] | None = None,
                predicate: Predicate | None = None, source: str = "rows") -> FilterResult:
    """Rows passing every given filter, checked in the order length, language, predicate;
    each dropped row is reported once, with the first filter it failed."""
    texts = field_texts(rows, field, source)
    langs = sorted(set(languages)) if languages else []
    lengths = token_lengths(texts, tokenizer) if (min_tokens is not None or
                                                  max_tokens is not None) else None
    keep: list[int] = []
    removed: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if lengths is not None:
            n = lengths[i]
            if min_tokens is not None and n < min_tokens:
                removed.append({"row": i, "reason": "too_short", "tokens": n})
                continue
            if max_tokens is not None and n > max_tokens:
                removed.append({"row": i, "reason": "too_long", "tokens": n})
                continue
        if langs:
            lang = detect_language(texts[i])
            if lang not in langs:
                removed.append({"row": i, "reason": "language", "language": lang})
                continue
        if predicate is not None:
            try:
                ok = predicate(row)
            except Exception as e:  # noqa: BLE001 - the user's code: name the row
                raise CurationError(f"{source} row {i}: predicate raised "
                                    f"{type(e).__name__}: {e}") from None
            if not ok:
                removed.append({"row": i, "reason": "predicate"})
                continue
        keep.append(i)
    params = {"field": field, "min_tokens": min_tokens, "max_tokens": max_tokens,
              "length_unit": "tokens" if tokenizer is not None else "words",
              "languages": langs or None}
    return FilterResult(rows=len(texts), keep=keep, removed=removed, params=params)
