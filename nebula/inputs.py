"""What can be checked of a job's inputs without a model or a service: every input path
exists, every dataset parses, and every row carries the fields its reader needs (the prompt,
the reference its verifier scores against, the metadata a verifier reads, a preference pair's
two responses).

The job service runs this at submission when it shares the jobs' filesystem (the embedded
Ray head), so a typo is a 422 naming the field instead of a job that fails minutes later;
`nebula run` and `nebula eval` run it in their preflight, so both say the same thing.
Tokenizer-dependent checks (prompt lengths, chat-template options) stay in the preflight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from nebula.config.data import DatasetConfig

# Row fields (passed as metadata) a verifier cannot score without.
VERIFIER_NEEDS: dict[str, tuple[str, ...]] = {
    "ifeval": ("instruction_id_list",),
    "reasoning_gym": ("task", "entry"),
}

# Verifiers that need each row's reference, unless the row passes one of these fields as
# metadata instead (the others, plug-ins included, decide for themselves).
REFERENCE_NEEDED: dict[str, tuple[str, ...]] = {"exact": (), "math": ("answer",),
                                                "regex": ("pattern",)}

ROWS_REPORTED = 5  # bad rows listed per dataset; the count says how many there were


def problem(field: str, message: str, kind: str) -> dict[str, str]:
    """One error entry, as the API's 422 bodies list them."""
    return {"field": field, "message": message, "type": kind}


def _datasets(node: Any, loc: str = "") -> Iterator[tuple[str, DatasetConfig]]:
    """(dotted field, dataset) of every DatasetConfig in a config tree."""
    if isinstance(node, DatasetConfig):
        yield loc, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _datasets(getattr(node, name), f"{loc}.{name}" if loc else name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _datasets(item, f"{loc}.{i}")


def _missing_paths(cfg: BaseModel, datasets: set[str]) -> list[dict[str, str]]:
    """Input paths that do not exist, except the `datasets` fields (dataset_problems reports
    those, with more detail)."""
    from nebula.config.paths import input_paths

    out = []
    model = getattr(cfg, "model", None)
    for loc, value in input_paths(cfg):
        field = ".".join(map(str, loc))
        if field in datasets:
            continue
        if loc[-1] == "import_dir":
            continue  # an output: where a .gguf is imported to
        if loc == ("model", "path") and getattr(model, "toy", None) is not None:
            continue  # a toy model is built there if absent
        p = Path(value)
        if value.lower().endswith((".gguf", ".jsonl", ".json", ".parquet")):
            ok, what = p.is_file(), "file"
        else:
            ok, what = p.exists(), "path"
        if not ok:
            out.append(problem(field, f"{what} not found: {value}", "missing_path"))
    return out


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == []


def _row_problems(d: DatasetConfig, row: dict[str, Any], fields: tuple[str, ...],
                  scored: bool) -> Iterator[tuple[str, str]]:
    """(config field under the dataset's naming it, or "", message) for each thing `row`
    lacks: its prompt, the `fields` its stages read, and (`scored`) what its verifier reads."""
    if _empty(row.get(d.prompt_field)):
        yield ".prompt_field", f"missing prompt field {d.prompt_field!r}"
    for name in fields:
        if _empty(row.get(name)):
            yield ("", f"missing field {name!r}") if name != d.reference_field else \
                (".reference_field", f"missing reference field {name!r}")
    if not scored:
        return
    verifier = str((row.get(d.verifier_field) if d.verifier_field else None) or d.verifier)
    alt = REFERENCE_NEEDED.get(verifier)
    if alt is not None and d.reference_field not in fields and _empty(row.get(d.reference_field)) \
            and all(a not in d.metadata_fields or _empty(row.get(a)) for a in alt):
        yield ".reference_field", (f"missing reference field {d.reference_field!r}, which "
                                   f"verifier {verifier!r} needs")
    for need in VERIFIER_NEEDS.get(verifier, ()):
        if need in d.metadata_fields and _empty(row.get(need)):
            yield ".metadata_fields", (f"missing field {need!r}, which verifier {verifier!r} "
                                       "needs")


def _unpassed_metadata(field: str, d: DatasetConfig, rows: list[dict[str, Any]]
                       ) -> list[dict[str, str]]:
    """A verifier of these rows reads a field the config does not pass as metadata."""
    verifiers = {str((r.get(d.verifier_field) if d.verifier_field else None) or d.verifier)
                 for r in rows}
    return [problem(f"{field}.metadata_fields", f"verifier {v!r} needs the row field "
                    f"{need!r} of {d.path} passed as metadata", "dataset")
            for v in sorted(verifiers) for need in VERIFIER_NEEDS.get(v, ())
            if need not in d.metadata_fields]


def dataset_problems(field: str, d: DatasetConfig, fields: tuple[str, ...] = (),
                     scored: bool = True) -> list[dict[str, str]]:
    """Errors of one dataset at config field `field`: unreadable, empty, or rows lacking their
    prompt, the `fields` a stage reads, or (`scored`) what their verifier reads."""
    from nebula.prompts import read_rows

    if not Path(d.path).is_file():
        return [problem(f"{field}.path", f"dataset file not found: {d.path}", "missing_path")]
    try:
        rows = read_rows(d)
    except Exception as e:  # noqa: BLE001 - whatever `datasets` cannot parse
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = "parquet" if d.path.endswith(".parquet") else "jsonl"
        return [problem(f"{field}.path", f"cannot read {d.path} as {kind}: "
                        f"{type(e).__name__}: {first}"[:1000], "dataset")]
    if not rows:
        return [problem(f"{field}.path", f"{d.path}: no rows", "dataset")]
    out = _unpassed_metadata(field, d, rows) if scored else []
    bad = 0
    for i, row in enumerate(rows):
        found = list(_row_problems(d, row, fields, scored))
        bad += bool(found)
        if found and bad <= ROWS_REPORTED:
            out += [problem(field + sub, f"{d.path} row {i}: {m}", "dataset_row")
                    for sub, m in found]
    if bad > ROWS_REPORTED:
        out.append(problem(f"{field}.path", f"{d.path}: {bad} rows lack fields (the first "
                           f"{ROWS_REPORTED} are listed)", "dataset_row"))
    return out


def input_problems(cfg: BaseModel) -> list[dict[str, str]]:
    """Every error of a job's (JobConfig) or eval job's (EvalJobConfig) inputs found without
    a model: missing paths, unreadable datasets, rows without their fields. A dataset's
    verifier needs are checked where its verdicts count: eval sets, and training prompts
    when a stage's advantages use the verifier's rewards."""
    from nebula.algo import algorithm

    datasets = list(_datasets(cfg))
    out = _missing_paths(cfg, {f"{loc}.path" for loc, _ in datasets})
    algos = [algorithm(st, cfg) for st in getattr(cfg, "stages", [])]  # type: ignore[arg-type]
    rewarded = any(a.online and a.uses_verdicts for a in algos)
    for field, d in datasets:
        fields = tuple(dict.fromkeys(f for a in algos for f in a.row_fields(d)))
        scored = field.startswith("datasets.") and (rewarded or not algos
                                                   or not field.startswith("datasets.train."))
        out += dataset_problems(field, d, fields, scored)
    return out


class InputError(ValueError):
    """Bad inputs of a job, every one listed (`problems`, as input_problems gives them)."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))


def check_inputs(cfg: BaseModel) -> None:
    """Raise InputError listing every problem input_problems finds."""
    problems = input_problems(cfg)
    if problems:
        raise InputError(problems)
