"""The `reasoning_gym` verifier (reasoning-gym's score_answer behind our <answer> extraction)
and the train/eval builder, down to rows read by the job loader and scored by the real gRPC
verifier service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("reasoning_gym")

from nebula import assets  # noqa: E402
from nebula.config.job import DatasetConfig  # noqa: E402
from nebula.prompts import load_prompt_rows  # noqa: E402
from nebula.tasks.reasoning_gym import EVAL_SEED_OFFSET, build_rows, main  # noqa: E402
from verifier.api import VerifierInputError, VerifyInput  # noqa: E402
from verifier.builtin.reasoning_gym import (  # noqa: E402
    ReasoningGymVerifier,
    extract_answer_line,
    extract_last_number,
    extract_tag,
    extract_tag_or_last_number,
)
from nebula.clients.verifier import VerifierClient  # noqa: E402
from nebula.clients.verifier import Item  # noqa: E402

LEGS = {"min_animals": 2, "max_animals": 3, "max_instances": 3}
MD_FIELDS = ("task", "entry", "task_kwargs")


@pytest.fixture(scope="module")
def legs() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return build_rows("leg_counting", 60, 20, seed=3, task_kwargs=LEGS,
                      instruction="Give only the final answer between <answer> and </answer> tags.")


def _md(row: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {**{k: row[k] for k in MD_FIELDS}, **extra}


def _verify(row: dict[str, str], response: str, **extra: Any) -> Any:
    return ReasoningGymVerifier().verify(VerifyInput(response, row["answer"], _md(row, **extra)))


def test_correct_passes_wrong_fails(legs: tuple[list, list]) -> None:
    row = legs[0][0]
    ok = _verify(row, f"Each animal has its legs... so <answer>{row['answer']}</answer>")
    assert (ok.reward, ok.passed, ok.details["extracted"]) == (1.0, True, row["answer"])
    wrong = _verify(row, f"<answer>{int(row['answer']) + 1}</answer>")
    assert (wrong.reward, wrong.passed) == (0.0, False) and "scored 0" in wrong.reason
    # No tag: the last number is the answer (what a 135M model writes), unless the item
    # asks for the tag only.
    assert _verify(row, f"2 animals... the answer is {row['answer']}.").passed
    assert not _verify(row, f"The answer is {row['answer']}. Or 1?").passed
    assert _verify(row, f"<answer>{row['answer']}</answer> not 1", answer_format="tags").passed
    tags_only = _verify(row, f"The answer is {row['answer']}.", answer_format="tags")
    assert not tags_only.passed and "no answer found (tags)" in tags_only.reason
    assert _verify(row, f"Answer: {row['answer']}\n(2 kinds)", answer_format="answer_line").passed
    none = _verify(row, "I cannot count legs.")
    assert none.reward == 0.0 and "no answer found" in none.reason


def test_partial_credit_is_the_tasks_own() -> None:
    (row,), _ = build_rows("spell_backward", 1, 0, seed=1)
    half = row["answer"][: len(row["answer"]) // 2] + "#" * 9
    out = _verify(row, f"<answer>{half}</answer>")
    assert 0 < out.reward < 1 and not out.passed


@pytest.mark.parametrize("text, expected", [
    ("<answer>7</answer>", "7"),
    ("<answer> first </answer> then <answer>\n 12 \n</answer>", "12"),  # the last tag
    ("reasoning <ANSWER>5</Answer>", "5"),
    ("<answer>**42**.</answer>", "42"),
    ("<answer>$-3$</answer>", "-3"),
    ("cut off: <answer>19", "19"),  # open tag at the end (stop string or truncation)
    ("<answer></answer>", ""),
    ("no tag at all: 12", None),
])
def test_extract_tag(text: str, expected: str | None) -> None:
    assert extract_tag(text) == expected


def test_other_extractors() -> None:
    assert extract_answer_line("work\n**Answer:** 1,024.\nbye") == "1,024"
    assert extract_answer_line("The answer is: -5") == "-5"
    assert extract_answer_line("no marker") is None
    assert extract_last_number("3 cats and 2 birds = 16 legs, total 1,216.") == "1,216"
    assert extract_last_number("-2.5 and then -7") == "-7"
    assert extract_last_number("none") is None
    assert extract_tag_or_last_number("<answer>12</answer> (not 13)") == "12"
    assert extract_tag_or_last_number("4 - 7 = -3.") == "-3"


def test_extracted_empty_answer_fails_cleanly(legs: tuple[list, list]) -> None:
    out = _verify(legs[0][0], "<answer></answer>")
    assert out.reward == 0.0 and not out.passed


@pytest.mark.parametrize("metadata, field", [
    ({}, "metadata.task"),
    ({"task": "no_such_task", "entry": "{}"}, "metadata.task"),
    ({"task": "leg_counting"}, "metadata.entry"),
    ({"task": "leg_counting", "entry": "{not json"}, "metadata.entry"),
    ({"task": "leg_counting", "entry": "[1]"}, "metadata.entry"),
    ({"task": "leg_counting", "entry": {"answer": "4"}, "task_kwargs": {"bogus": 1}},
     "metadata.task_kwargs"),
    ({"task": "leg_counting", "entry": {"answer": "4"}, "answer_format": "xml"},
     "metadata.answer_format"),
])
def test_bad_metadata_names_the_field(metadata: dict[str, Any], field: str) -> None:
    with pytest.raises(VerifierInputError, match=field.replace(".", r"\.")):
        ReasoningGymVerifier().verify(VerifyInput("<answer>4</answer>", "4", metadata))


def test_reference_stands_in_for_a_missing_entry_answer() -> None:
    v = ReasoningGymVerifier()
    md = {"task": "chain_sum", "entry": {"question": "2 + 2 =", "metadata": {}}}
    assert v.verify(VerifyInput("<answer>4</answer>", "4", md)).passed
    with pytest.raises(VerifierInputError, match="reference"):
        v.verify(VerifyInput("<answer>4</answer>", "", md))


@pytest.mark.parametrize("task, kwargs", [
    ("leg_counting", LEGS),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "max_digits": 2}),
    ("spell_backward", {"max_word_len": 5}),
    ("number_sorting", {"min_numbers": 3, "max_numbers": 4}),
    ("gsm_symbolic", {}),  # entry metadata holds Fractions: stored as strings
])
def test_builder_rows_disjoint_and_scored(task: str, kwargs: dict[str, Any]) -> None:
    train, held = build_rows(task, 80, 20, seed=0, task_kwargs=kwargs)
    assert len(train) == 80 and len(held) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in held}) == len(held)
    for row in train + held:
        assert set(row) == {"prompt", "answer", *MD_FIELDS}
        assert all(isinstance(v, str) for v in row.values())  # Arrow-friendly columns
        assert json.loads(row["task_kwargs"]) == kwargs
        assert _verify(row, f"<answer>{row['answer']}</answer>").passed, row
    assert build_rows(task, 80, 20, seed=0, task_kwargs=kwargs) == (train, held)


def test_small_task_keeps_its_eval_and_trains_on_the_rest() -> None:
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 questions
    train, held = build_rows("chain_sum", 400, 64, seed=0, task_kwargs=tiny)
    assert len(train) == 400 and len(held) == 64
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in train}) <= 200 - 64  # train repeats the other questions
    # The eval set does not depend on the train size.
    assert build_rows("chain_sum", 10, 64, seed=0, task_kwargs=tiny)[1] == held
    # Asking for more than the task has comes back short instead of looping.
    train, held = build_rows("chain_sum", 50, 300, seed=0, task_kwargs=tiny)
    assert 150 < len(held) <= 200 and len(train) < 50
    assert EVAL_SEED_OFFSET > 10**6


def test_cli_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["leg_counting", "--train", "30", "--eval", "10", "--seed", "1",
               "--out", str(tmp_path), "--task-kwargs", json.dumps(LEGS),
               "--instruction", "Answer in <answer></answer> tags."])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["prompt"].endswith("\n\nAnswer in <answer></answer> tags.")
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 10
    assert main(["no_such_task", "--train", "1", "--eval", "1", "--out", str(tmp_path)]) == 2
    assert main(["leg_counting", "--train", "1", "--eval", "1", "--out", str(tmp_path),
                 "--task-kwargs", '{"bogus": 1}']) == 2
    assert "error" in capsys.readouterr().err


def test_rows_through_the_job_loader_and_the_grpc_service(
        tmp_path: Path, verifier_service: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(assets.tokenizer_dir("qwen3"))
    assert main(["leg_counting", "--train", "8", "--eval", "4", "--out", str(tmp_path),
                 "--task-kwargs", json.dumps(LEGS)]) == 0
    cfg = DatasetConfig(path=str(tmp_path / "eval.jsonl"), verifier="reasoning_gym",
                        metadata_fields=list(MD_FIELDS))
    rows = load_prompt_rows(cfg, tok)
    items = [Item(r.verifier, f"<answer>{r.reference}</answer>", r.reference, r.metadata,
                  id=f"ok{r.index}") for r in rows]
    items.append(Item("reasoning_gym", "<answer>0</answer>", rows[0].reference,
                      rows[0].metadata, id="wrong"))
    items.append(Item("reasoning_gym", "<answer>4</answer>", "4", {"entry": "{}"}, id="bad"))
    with VerifierClient(verifier_service["address"]) as client:
        assert "reasoning_gym" in {v["name"] for v in client.list_verifiers()}
        res = {r.id: r for r in client.verify(items)}
    assert all(res[f"ok{r.index}"].passed for r in rows), res
    assert res["wrong"].status == "ok" and not res["wrong"].passed
    assert res["bad"].status == "error" and "metadata.task" in res["bad"].reason
