"""Statistics of a dataset: rows, length percentiles, duplicates, contamination.

Lengths are the field's tokens with a tokenizer, else whitespace words (`filters`);
percentiles are nearest-rank (the smallest length with at least p% of rows at or below it).
Exact duplicates are the rows exact dedup removes; near duplicates the further rows MinHash
dedup removes after them (`dedup`, mode "both"); contaminated rows are those decontamination
against the eval sets removes (`decontam`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from nebula.curation.decontam import TULU3_THRESHOLD, EvalIndex, decontaminate
from nebula.curation.dedup import MinHashParams, dedup
from nebula.curation.filters import token_lengths
from nebula.curation.text import field_texts

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of ascending values (0 for none)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return int(sorted_values[rank - 1])


def length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    s = sorted(lengths)
    out: dict[str, Any] = {f"p{p}": percentile(s, p) for p in PERCENTILES}
    out["max"] = s[-1] if s else 0
    out["mean"] = round(sum(s) / len(s), 2) if s else 0.0
    return out


def dataset_stats(rows: Sequence[dict[str, Any]], field: str = "prompt", tokenizer: Any = None,
                  params: MinHashParams | None = None, index: EvalIndex | None = None,
                  response_fields: Sequence[str] = (), threshold: float = TULU3_THRESHOLD,
                  source: str = "rows") -> dict[str, Any]:
    """The statistics of rows as a JSON-able dict (module doc)."""
    texts = field_texts(rows, field, source)
    d = dedup(rows, field, "both", params or MinHashParams(), source)
    out: dict[str, Any] = {
        "file": source, "field": field, "rows": len(texts),
        "length_unit": "tokens" if tokenizer is not None else "words",
        "length": length_stats(token_lengths(texts, tokenizer)),
        "exact_duplicates": d.exact_removed,
        "near_duplicates": d.near_removed,
        "near": d.params.to_json() if d.params else None,
    }
    if index is not None:
        c = decontaminate(rows, index, field, response_fields, threshold, source)
        out["contaminated"] = len(c.contaminated)
        out["contamination"] = {"ngram": c.ngram, "threshold": threshold,
                                "eval": c.report()["eval"]}
    return out
