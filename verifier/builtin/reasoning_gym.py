"""`reasoning_gym`: score a response with reasoning-gym's own `score_answer` for its task.

Item fields (rows written by `nebula.tasks.reasoning_gym` carry all of them; list
`task`, `entry` and `task_kwargs` in the dataset's `metadata_fields`):
- metadata.task (required): the reasoning-gym dataset name, e.g. "leg_counting".
- metadata.entry (required): the generated entry as a JSON object or a JSON string of one,
  {"question", "answer", "metadata"}; `score_answer(answer, entry)` reads it. When it has no
  "answer", the item's reference is used.
- metadata.task_kwargs (optional): the dataset config the rows were made with (object or JSON
  string). A few tasks' scoring reads its config (decimal_arithmetic, time_intervals,
  puzzle24, polynomial_equations), so the scorer is built with the same kwargs.

Answer extraction (ours: reasoning-gym scores an already extracted answer string). The
answer is the content of the last `<answer>...</answer>` span when the response has one (an
`<answer>` left open at the end of the text runs to the end), else the last number in the
response (an integer or decimal, optionally signed, commas as thousands separators). Why:
SmolLM2-135M-Instruct never wrote <answer> tags in bench/real_task_probe.py, whatever the
system prompt or instruction asked, but it ends arithmetic answers with the number ("The
answer to this arithmetic problem is 11."), so the tags alone gave 0 % and the last number
14-41 %; a model that does follow reasoning-gym's tag convention is scored on its tag. No tag
and no number scores 0 ("no answer found"). metadata.answer_format picks another extractor
per item (`EXTRACTORS`): "tags" (the tag only), "last_number" (ignore tags), "answer_line" (the
rest of the line after the last "Answer:"). Wrapping `**`, `$`, backticks, quotes and a
trailing period are removed from a tagged or "Answer:" answer.

reward = the task's score in [0, 1] (some tasks give partial credit, e.g. spell_backward for a
correct prefix); passed = the score is 1. Scoring is pure Python and deterministic; the
reasoning-gym import (~1 s, every task module) happens once per pool worker, and scorers are
cached per (task, kwargs).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

from verifier.api import Outcome, Verifier, VerifierInputError, VerifyInput

_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]\s*\**\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_WRAPPERS = ("**", "$", "`", '"', "'")


def _clean(answer: str) -> str:
    """Strip markdown/LaTeX wrappers and a sentence's final period around an answer."""
    answer = answer.strip()
    changed = True
    while changed and answer:
        changed = False
        if answer.endswith(".") and not answer.endswith(".."):
            answer, changed = answer[:-1].rstrip(), True
        for w in _WRAPPERS:
            if len(answer) >= 2 * len(w) and answer.startswith(w) and answer.endswith(w):
                answer, changed = answer[len(w):-len(w)].strip(), True
        if answer.startswith("**") and not answer.endswith("**"):  # "**Answer:** 12" leftovers
            answer, changed = answer[2:].strip(), True
    return answer


def extract_tag(text: str) -> str | None:
    """The last <answer>...</answer> span (an unclosed final <answer> runs to the end)."""
    spans = _TAG.findall(text)
    return _clean(spans[-1]) if spans else None


def extract_answer_line(text: str) -> str | None:
    """The rest of the line after the last "Answer:" (or "answer is:")."""
    found = _ANSWER_LINE.findall(text)
    return _clean(found[-1]) if found else None


def extract_last_number(text: str) -> str | None:
    """The last integer or decimal in the text (commas as thousands separators kept)."""
    found = _NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def extract_tag_or_last_number(text: str) -> str | None:
    tagged = extract_tag(text)
    return tagged if tagged is not None else extract_last_number(text)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "tags": extract_tag,
    "answer_line": extract_answer_line,
    "last_number": extract_last_number,
    "tags_or_last_number": extract_tag_or_last_number,
}
DEFAULT_FORMAT = "tags_or_last_number"


def _json_field(md: dict[str, Any], key: str, required: bool) -> dict[str, Any]:
    value = md.get(key)
    if value in (None, ""):
        if required:
            raise VerifierInputError(f"metadata.{key} is required by the reasoning_gym verifier")
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise VerifierInputError(f"metadata.{key} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise VerifierInputError(f"metadata.{key} must be a JSON object, got "
                                 f"{type(value).__name__}")
    return value


@functools.lru_cache(maxsize=64)
def _scorer(task: str, kwargs_json: str) -> Callable[[str | None, dict[str, Any]], float]:
    """`score_answer` of `task` built with the rows' config (size/seed do not affect scoring)."""
    from reasoning_gym.factory import DATASETS, create_dataset  # lazy: ~1 s, every task

    if task not in DATASETS:
        raise VerifierInputError(f"metadata.task: unknown reasoning-gym task {task!r}")
    kwargs = {**json.loads(kwargs_json), "size": 1, "seed": 0}
    try:
        return create_dataset(task, **kwargs).score_answer
    except (TypeError, ValueError, AssertionError) as e:
        raise VerifierInputError(f"metadata.task_kwargs are invalid for {task}: "
                                 f"{type(e).__name__}: {e}") from e


class ReasoningGymVerifier(Verifier):
    name = "reasoning_gym"
    version = "1"
    description = ("reasoning-gym task scored by its score_answer (metadata.task, .entry); "
                   "answer: the last <answer></answer> span, else the last number.")

    def verify(self, item: VerifyInput) -> Outcome:
        md = item.metadata or {}
        task = md.get("task")
        if not isinstance(task, str) or not task:
            raise VerifierInputError("metadata.task (the reasoning-gym task name) is required")
        entry = _json_field(md, "entry", required=True)
        task_kwargs = _json_field(md, "task_kwargs", required=False)
        if entry.get("answer") is None:
            if not item.reference:
                raise VerifierInputError("metadata.entry.answer or the reference is required")
            entry = {**entry, "answer": item.reference}
        fmt = md.get("answer_format") or DEFAULT_FORMAT
        extract = EXTRACTORS.get(fmt) if isinstance(fmt, str) else None
        if extract is None:
            raise VerifierInputError(f"metadata.answer_format must be one of "
                                     f"{', '.join(EXTRACTORS)}, got {fmt!r}")
        score_fn = _scorer(task, json.dumps(task_kwargs, sort_keys=True))
        answer = extract(item.response or "")
        if answer is None:
            return Outcome(0.0, False, f"no answer found ({fmt})", {"extracted": None})
        try:
            score = float(score_fn(answer, entry))
        except KeyError as e:  # the task read an entry field the item does not carry
            raise VerifierInputError(f"metadata.entry lacks {e} needed by {task}") from e
        except Exception as e:  # noqa: BLE001 - a scorer choking on odd text is a wrong answer
            return Outcome(0.0, False, f"{task} could not score the answer: "
                           f"{type(e).__name__}: {e}", {"extracted": answer[:200]})
        score = min(max(score, 0.0), 1.0)
        passed = score >= 1.0
        reason = "" if passed else f"answer {answer[:80]!r} scored {score:.3g}"
        return Outcome(score, passed, reason, {"extracted": answer[:200]})
