"""`nebula data`: curation of jsonl/parquet datasets (dedup, decontaminate, filter, stats).

The work is done by `nebula.curation` (imported only when a command runs); this module
reads the files, calls it, writes the kept rows and a JSON report. Bad input (a missing or
unreadable file, a row without the field) ends the command with a message naming the file
and row, and exit code 2.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

data_app = typer.Typer(help="Data curation of jsonl/parquet datasets: dedup, decontaminate, "
                       "filter, stats.", no_args_is_help=True)

Src = Annotated[Path, typer.Argument(help="input .jsonl/.json/.parquet file")]
Out = Annotated[Path, typer.Argument(help="output file (.jsonl/.parquet: format from suffix)")]
Field = Annotated[Optional[str], typer.Option(
    help="text field (default: 'prompt', else 'messages' - a chat list, read as its contents)")]
Report = Annotated[Optional[Path], typer.Option(
    help="JSON report path (default: OUT with suffix .report.json)")]
Threshold = Annotated[float, typer.Option(
    "--threshold", help="near-dup: estimated Jaccard similarity at or above which rows are dups")]
NumPerm = Annotated[int, typer.Option(help="MinHash permutations")]
Shingle = Annotated[str, typer.Option(help="MinHash shingles: 'char' (character n-grams of "
                                      "the normalised text) or 'word' (word n-grams)")]
ShingleSize = Annotated[Optional[int], typer.Option(
    help="n of the shingles (default: 5 for char, 3 for word)")]
Evals = Annotated[Optional[list[Path]], typer.Option(
    "--eval", help="eval set file to decontaminate against (repeat for several)")]
Ngram = Annotated[int, typer.Option(help="n of the word n-grams (Tülu 3: 8; 13 is GPT-3's)")]
Overlap = Annotated[float, typer.Option(
    "--overlap", help="remove a row when more than this share of an eval item's tokens lie in "
    "n-grams shared with it (Tülu 3: 0.5; 0: any shared n-gram)")]
Tokenizer = Annotated[Optional[Path], typer.Option(
    help="checkpoint/tokenizer dir: count its tokens (default: whitespace words)")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Bad input and bad options end the command with a message, not a traceback."""
    from nebula.curation import CurationError

    try:
        yield
    except (CurationError, ValueError) as e:
        _fail(str(e))


def _report_path(out: Path, report: Optional[Path]) -> Path:
    return report if report is not None else out.with_name(out.with_suffix("").name
                                                           + ".report.json")


def _minhash(threshold: float, num_perm: int, shingle: str, shingle_size: Optional[int]) -> Any:
    from nebula.curation.dedup import MinHashParams

    if shingle not in ("char", "word"):
        raise ValueError(f"--shingle: 'char' or 'word', not {shingle!r}")
    size = shingle_size if shingle_size is not None else (5 if shingle == "char" else 3)
    return MinHashParams(threshold=threshold, num_perm=num_perm,
                         shingle=shingle, shingle_size=size)  # type: ignore[arg-type]


def _load(src: Path, field: Optional[str]) -> tuple[Any, list[dict[str, Any]], str]:
    from nebula.curation.io import read_rows
    from nebula.curation.text import resolve_field

    ds, rows = read_rows(src)
    if not rows:
        raise ValueError(f"{src}: no rows")
    return ds, rows, resolve_field(ds.column_names, field, str(src))


def _eval_index(evals: list[Path], ngram: int, eval_field: Optional[str]) -> Any:
    from nebula.curation.decontam import EvalIndex
    from nebula.curation.text import field_texts

    index = EvalIndex(ngram)
    for path in evals:
        _, rows, name = _load(path, eval_field)
        index.add(str(path), field_texts(rows, name, str(path)))
    return index


def _response_fields(columns: list[str], field: str, given: Optional[list[str]],
                     prompt_only: bool, src: Path) -> list[str]:
    from nebula.curation.text import response_fields_of

    if prompt_only:
        return []
    if given:
        for name in given:
            if name not in columns:
                raise ValueError(f"{src}: no field {name!r} (fields: {', '.join(columns)})")
        return list(given)
    return [f for f in response_fields_of(columns) if f != field]


@data_app.command("dedup")
def dedup_cmd(
    src: Src, out: Out, field: Field = None,
    mode: Annotated[str, typer.Option(help="exact | near | both (exact, then near)")] = "both",
    threshold: Threshold = 0.8, num_perm: NumPerm = 128, shingle: Shingle = "char",
    shingle_size: ShingleSize = None, report: Report = None,
) -> None:
    """Remove exact and near (MinHash LSH) duplicates, keeping each cluster's first row."""
    with _errors():
        from nebula.curation.dedup import dedup
        from nebula.curation.io import write_json, write_rows

        if mode not in ("exact", "near", "both"):
            raise ValueError(f"--mode: exact, near or both, not {mode!r}")
        params = _minhash(threshold, num_perm, shingle, shingle_size)
        ds, rows, name = _load(src, field)
        res = dedup(rows, name, mode, params, str(src))  # type: ignore[arg-type]
        write_rows(ds, res.keep, out)
        rep = write_json({"input": str(src), "output": str(out), "field": name, "mode": mode,
                          **res.report()}, _report_path(out, report))
    near = f", near duplicates -{res.near_removed}" if res.params else ""
    typer.echo(f"{src}: {res.rows} rows -> {len(res.keep)} (exact duplicates "
               f"-{res.exact_removed}{near}); wrote {out}, report {rep}")


@data_app.command("decontaminate")
def decontaminate_cmd(
    src: Src, out: Out, eval: Evals = None, ngram: Ngram = 8, overlap: Overlap = 0.5,
    field: Field = None,
    eval_field: Annotated[Optional[str], typer.Option(
        help="text field of the eval sets (default: 'prompt', else 'messages')")] = None,
    response_field: Annotated[Optional[list[str]], typer.Option(
        help="response field(s) of the training rows also checked (default: those of "
        "response, completion, chosen, rejected the file has)")] = None,
    prompt_only: Annotated[bool, typer.Option(
        "--prompt-only", help="check only the prompt (no response fields or assistant turns)")
    ] = False,
    report: Report = None,
) -> None:
    """Remove training rows that share n-grams with eval items (Tülu 3's 8-gram rule)."""
    with _errors():
        from nebula.curation.decontam import decontaminate
        from nebula.curation.io import write_json, write_rows

        if not eval:
            raise ValueError("give at least one --eval FILE")
        index = _eval_index(eval, ngram, eval_field)
        ds, rows, name = _load(src, field)
        responses = _response_fields(ds.column_names, name, response_field, prompt_only, src)
        res = decontaminate(rows, index, name, responses, overlap, str(src),
                            assistant_turns=not prompt_only)
        write_rows(ds, res.keep, out)
        rep = write_json({"input": str(src), "output": str(out), "field": name,
                          "response_fields": responses, **res.report()},
                         _report_path(out, report))
    typer.echo(f"{src}: {res.rows} rows -> {len(res.keep)} ({len(res.contaminated)} "
               f"contaminated: {ngram}-gram overlap > {overlap:g} with "
               f"{', '.join(str(e) for e in eval)}); wrote {out}, report {rep}")


@data_app.command("filter")
def filter_cmd(
    src: Src, out: Out, field: Field = None, tokenizer: Tokenizer = None,
    min_tokens: Annotated[Optional[int], typer.Option(help="drop rows with fewer tokens")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="drop rows with more tokens")] = None,
    lang: Annotated[Optional[str], typer.Option(
        help="keep rows whose language (langdetect) is one of these ISO codes, e.g. en or en,de")
    ] = None,
    predicate: Annotated[Optional[str], typer.Option(
        help="keep rows for which pkg.module:func(row) is true")] = None,
    report: Report = None,
) -> None:
    """Keep rows within token-length bounds, in given languages, passing a predicate."""
    with _errors():
        from nebula.curation.filters import filter_rows, load_predicate, load_tokenizer
        from nebula.curation.io import write_json, write_rows

        if min_tokens is None and max_tokens is None and not lang and predicate is None:
            raise ValueError("give at least one of --min-tokens, --max-tokens, --lang, "
                             "--predicate")
        pred = load_predicate(predicate) if predicate else None
        tok = load_tokenizer(str(tokenizer)) if tokenizer is not None else None
        ds, rows, name = _load(src, field)
        langs = [x.strip() for x in lang.split(",") if x.strip()] if lang else None
        res = filter_rows(rows, name, min_tokens, max_tokens, tok, langs, pred, str(src))
        write_rows(ds, res.keep, out)
        rep = write_json({"input": str(src), "output": str(out), "predicate": predicate,
                          "tokenizer": str(tokenizer) if tokenizer else None, **res.report()},
                         _report_path(out, report))
    reasons = ", ".join(f"{k} -{v}" for k, v in res.report()["by_reason"].items()) or "none"
    typer.echo(f"{src}: {res.rows} rows -> {len(res.keep)} (removed: {reasons}); "
               f"wrote {out}, report {rep}")


@data_app.command("stats")
def stats_cmd(
    src: Src, field: Field = None, tokenizer: Tokenizer = None, eval: Evals = None,
    ngram: Ngram = 8, overlap: Overlap = 0.5,
    threshold: Threshold = 0.8, num_perm: NumPerm = 128, shingle: Shingle = "char",
    shingle_size: ShingleSize = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the "
                                                     "statistics to this JSON file")] = None,
) -> None:
    """Rows, length percentiles, exact and near duplicates, contamination against --eval."""
    with _errors():
        from nebula.curation.filters import load_tokenizer
        from nebula.curation.io import write_json
        from nebula.curation.stats import dataset_stats

        params = _minhash(threshold, num_perm, shingle, shingle_size)
        tok = load_tokenizer(str(tokenizer)) if tokenizer is not None else None
        index = _eval_index(eval, ngram, None) if eval else None
        ds, rows, name = _load(src, field)
        responses = _response_fields(ds.column_names, name, None, False, src)
        st = dataset_stats(rows, name, tok, params, index, responses, overlap, str(src))
        if json_out is not None:
            write_json(st, json_out)
    _print_stats(st)


def _print_stats(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{st['file']} ({st['field']})", show_header=True)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_row("rows", f"{st['rows']:,}")
    unit = st["length_unit"]
    for key in ("p50", "p90", "p99", "max", "mean"):
        table.add_row(f"{unit} {key}", str(st["length"][key]))
    pct = (lambda n: f" ({100 * n / st['rows']:.1f}%)") if st["rows"] else (lambda n: "")
    table.add_row("exact duplicates", f"{st['exact_duplicates']:,}{pct(st['exact_duplicates'])}")
    near = st["near"]
    table.add_row(f"near duplicates (J>={near['threshold']:g}, {near['shingle']} "
                  f"{near['shingle_size']}-grams)",
                  f"{st['near_duplicates']:,}{pct(st['near_duplicates'])}")
    if "contaminated" in st:
        c = st["contamination"]
        table.add_row(f"contaminated ({c['ngram']}-gram overlap > {c['threshold']:g})",
                      f"{st['contaminated']:,}{pct(st['contaminated'])}")
        for e in c["eval"]:
            table.add_row(f"  vs {e['file']}", f"{e['rows_matched']:,}")
    Console(width=max(100, Console().width)).print(table)
