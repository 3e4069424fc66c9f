"""`nebula verify FILE.jsonl`: one item per line in, one JSON result per line out, in order.

A bad line (not JSON, missing field, unknown verifier) becomes an error result for that
line; the other lines are still verified.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from nebula.clients.verifier import ERROR, Item, ItemResult

CHUNK = 256


def parse_line(lineno: int, line: str, known: set[str]) -> Item | ItemResult:
    def err(reason: str, verifier: str = "") -> ItemResult:
        return ItemResult(id=str(lineno), verifier=verifier, status=ERROR,
                          reason=f"line {lineno}: {reason}")

    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as e:
        return err(f"not valid JSON ({e.msg} at char {e.pos})")
    if not isinstance(row, dict):
        return err("must be a JSON object")
    name = row.get("verifier")
    if not isinstance(name, str) or not name:
        return err("field 'verifier' is missing or not a string")
    if name not in known:
        return err(f"unknown verifier {name!r}; available: {', '.join(sorted(known))}", name)
    response = row.get("response")
    if not isinstance(response, str):
        return err("field 'response' is missing or not a string", name)
    reference = row.get("reference", "")
    if not isinstance(reference, str):
        reference = json.dumps(reference)
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        return err("field 'metadata' must be a JSON object", name)
    return Item(verifier=name, response=response, reference=reference, metadata=metadata,
                id=str(row.get("id", lineno)))


def verify_lines(lines: Iterable[str], known: set[str], verify_chunk: Any) -> Iterator[ItemResult]:
    """Yield one result per non-blank line, in order; verify_chunk(list[Item]) -> results."""
    pending: list[Item | ItemResult] = []

    def flush() -> Iterator[ItemResult]:
        items = [p for p in pending if isinstance(p, Item)]
        results = iter(verify_chunk(items) if items else [])
        for p in pending:
            yield next(results) if isinstance(p, Item) else p
        pending.clear()

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        pending.append(parse_line(lineno, line, known))
        if len(pending) >= CHUNK:
            yield from flush()
    yield from flush()
