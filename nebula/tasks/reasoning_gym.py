"""Train/eval jsonl files from a reasoning-gym task, scored by the `reasoning_gym` verifier.

    python -m nebula.tasks.reasoning_gym leg_counting --train 2000 --eval 128 --seed 0 \
        --out data/legs --task-kwargs '{"min_animals": 2, "max_animals": 3}'

Rows: {"prompt", "answer", "task", "entry", "task_kwargs"}:
- prompt: the task's question, then a blank line and `instruction` when one is given (a plain
  string; the job applies the chat template and its dataset.system_prompt);
- answer: the oracle answer (the reference);
- task, task_kwargs (JSON string): what the verifier rebuilds the scorer from;
- entry: JSON string of the reasoning-gym entry ({"question", "answer", "metadata"}) that
  `score_answer` reads. JSON strings, not nested objects, because the job reads rows through
  Arrow, which would coerce differently shaped per-row metadata into one schema.

A job reads them with
    dataset: {path: DIR/train.jsonl, verifier: reasoning_gym,
              metadata_fields: [task, entry, task_kwargs]}

Disjointness: reasoning-gym seeds item i of a dataset with `seed + i`, so eval is drawn
from `seed + EVAL_SEED_OFFSET` (RNG streams far from the train ones). Eval is drawn first:
`--eval` distinct questions, the same whatever `--train` is. Train rows whose question is an
eval question are dropped and more are drawn instead, so a task with few distinct questions
(1-digit sums: 200) still gets its full eval set and trains on the rest. A set comes out short,
with a warning, only when the task runs out of questions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

from nebula.tasks.synthetic import write_jsonl

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_000_000
_DRAW_FACTOR = 4  # entries drawn per wanted row at most, to replace dropped duplicates


def _row(task: str, entry: dict[str, Any], kwargs_json: str, instruction: str
         ) -> dict[str, str]:
    question = str(entry["question"])
    return {
        "prompt": question.rstrip() + (f"\n\n{instruction}" if instruction else ""),
        "answer": str(entry["answer"]),
        "task": task,
        "entry": _stored_entry(entry),
        "task_kwargs": kwargs_json,
    }


def _stored_entry(entry: dict[str, Any]) -> str:
    """The JSON the verifier gets back as the entry to score against."""
    return json.dumps({"question": str(entry["question"]), "answer": entry["answer"],
                       "metadata": entry.get("metadata", {})}, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """Sets become lists; other non-JSON values (Fractions, ...) their str. `_draws` checks
    that the stored entry still scores its own answer."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def _draws(task: str, n: int, seed: int, task_kwargs: dict[str, Any] | None
           ) -> Iterator[dict[str, Any]]:
    """Up to `n` entries of `task` from `seed`, generated one by one as they are consumed.

    ValueError when an entry, after the JSON round trip the rows go through, no longer scores
    its own answer as correct (such a task cannot be trained through these files)."""
    import reasoning_gym  # lazy: importing every task module takes a second

    if n <= 0:
        return
    ds = reasoning_gym.create_dataset(task, size=n, seed=seed, **(task_kwargs or {}))
    for i in range(n):
        entry = ds[i]
        stored = json.loads(_stored_entry(entry))
        if ds.score_answer(str(entry["answer"]), stored) < 1.0:
            raise ValueError(f"{task} entry {i} (seed {seed}) does not score its own answer "
                             "after the JSON round trip; this task is not supported")
        yield entry


def generate(task: str, n: int, seed: int, task_kwargs: dict[str, Any] | None = None
             ) -> list[dict[str, Any]]:
    """`n` reasoning-gym entries of `task` (config `task_kwargs`) from `seed`."""
    return list(_draws(task, n, seed, task_kwargs))


def _take(task: str, n: int, seed: int, task_kwargs: dict[str, Any] | None, kwargs_json: str,
          instruction: str, exclude: set[str], distinct: bool) -> list[dict[str, str]]:
    """`n` rows whose question is not in `exclude` (and not repeated, if `distinct`), drawing
    up to `_DRAW_FACTOR` times as many entries; fewer (with a warning) if the task runs out."""
    rows: list[dict[str, str]] = []
    if n <= 0:
        return rows
    seen = set(exclude)
    for entry in _draws(task, n * _DRAW_FACTOR + 100, seed, task_kwargs):
        row = _row(task, entry, kwargs_json, instruction)
        if row["prompt"] in seen:
            continue
        if distinct:
            seen.add(row["prompt"])
        rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        log.warning("%s (seed %d): only %d rows with a question %s (wanted %d)", task, seed,
                    len(rows), "distinct and not in eval" if distinct else "not in eval", n)
    return rows


def build_rows(task: str, n_train: int, n_eval: int, seed: int = 0,
               task_kwargs: dict[str, Any] | None = None, instruction: str = ""
               ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows. Eval: `n_eval` distinct questions from `seed + EVAL_SEED_OFFSET`,
    drawn first so that it does not depend on `n_train`. Train: `n_train` rows from `seed`
    whose question is not an eval question (train may repeat a question of a small task)."""
    kwargs_json = json.dumps(task_kwargs or {}, sort_keys=True)
    held = _take(task, n_eval, seed + EVAL_SEED_OFFSET, task_kwargs, kwargs_json, instruction,
                 set(), distinct=True)
    train = _take(task, n_train, seed, task_kwargs, kwargs_json, instruction,
                  {r["prompt"] for r in held}, distinct=False)
    return train, held


def write_split(task: str, out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0,
                task_kwargs: dict[str, Any] | None = None, instruction: str = ""
                ) -> tuple[Path, Path]:
    """Write out_dir/train.jsonl and out_dir/eval.jsonl; returns their paths."""
    train, held = build_rows(task, n_train, n_eval, seed, task_kwargs, instruction)
    out = Path(out_dir)
    paths = out / "train.jsonl", out / "eval.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], held)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nebula.tasks.reasoning_gym",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("task", help="reasoning-gym dataset name, e.g. leg_counting")
    p.add_argument("--train", type=int, required=True, help="train rows")
    p.add_argument("--eval", type=int, required=True, help="eval rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task-kwargs", default="{}", help="JSON object: the task's config")
    p.add_argument("--instruction", default="",
                   help="text put after every question (after a blank line)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kwargs = json.loads(a.task_kwargs)
    except ValueError as e:
        p.error(f"--task-kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error("--task-kwargs must be a JSON object")
    try:
        train, held = write_split(a.task, a.out, a.train, a.eval, a.seed, kwargs, a.instruction)
    except (ValueError, TypeError, AssertionError) as e:  # unknown task, bad config
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for path in (train, held):
        print(f"{path}: {sum(1 for _ in path.open())} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
