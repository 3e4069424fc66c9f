"""jsonl/parquet in and out through `datasets` (as `nebula.prompts` reads job datasets).

A file is parquet when it ends in `.parquet`, else JSON lines (`.jsonl`, or `.json` with one
object a line or one array of objects). Errors name the file, and for JSON the line.
Output keeps every column of the kept rows, in their order; its format follows its suffix, so
`dedup in.jsonl out.parquet` also converts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from nebula.curation import CurationError

SUFFIXES = (".jsonl", ".json", ".parquet")


def _kind(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise CurationError(f"{path}: unknown format (give a {', '.join(SUFFIXES)} file)")
    return "parquet" if path.suffix == ".parquet" else "json"


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file first fails to parse, as 'line N: ...', or None."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.read(1)
            while first.isspace():
                first = f.read(1)
            if first == "[":  # one JSON array: not line-oriented
                return None
            f.seek(0)
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {n}: not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(value, dict):
                    return f"line {n}: not a JSON object"
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    return None


def read_dataset(path: str | Path) -> Any:
    """The file as a `datasets.Dataset`; a missing, unreadable or malformed file is a
    CurationError naming it."""
    p = Path(path)
    if not p.exists():
        raise CurationError(f"{p}: file not found")
    if not p.is_file():
        raise CurationError(f"{p}: not a file")
    kind = _kind(p)
    try:
        with p.open("rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise CurationError(f"{p}: cannot read: {e.strerror}") from None
    import datasets

    datasets.disable_progress_bars()
    if empty:
        return datasets.Dataset.from_list([])
    # datasets logs a failed parse (with its traceback) before raising: the error below says
    # it once, naming the line.
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many kinds
        where = _bad_json_line(p) if kind == "json" else None
        if where:
            raise CurationError(f"{p} {where}") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CurationError(f"{p}: cannot read as {kind}: {msg}") from None
    finally:
        log.setLevel(level)


def read_rows(path: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """(the dataset, its rows as dicts)."""
    ds = read_dataset(path)
    return ds, ds.to_list()


def write_rows(ds: Any, keep: Sequence[int], out: str | Path) -> Path:
    """Write the rows `keep` of `ds` to `out` (format from its suffix), atomically."""
    out = Path(out)
    kind = _kind(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sub = ds.select(list(keep))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if kind == "parquet":
            sub.to_parquet(str(tmp))
        elif len(sub):
            sub.to_json(str(tmp), lines=True, force_ascii=False)
        else:
            tmp.write_text("")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CurationError(f"{out}: cannot write: {e.strerror or e}") from None
    return out


def dumps(value: Any, depth: int = 0) -> str:
    """JSON with objects holding containers expanded (two levels), a list of containers one
    item a line, and everything else compact: a report of 10k clusters stays 10k lines."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and depth < 2 and any(isinstance(v, (dict, list))
                                                     for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        items = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(obj) + "\n")
    except OSError as e:
        raise CurationError(f"{path}: cannot write: {e.strerror or e}") from None
    return path
