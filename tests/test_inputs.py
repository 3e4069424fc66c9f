"""nebula.inputs: what the service checks of a job's inputs at submission (and `nebula run`
and `nebula eval` in their preflight), on real files: missing paths, unreadable datasets,
rows without the fields their stage or verifier reads, each named by its config field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nebula.config.job import JobConfig
from nebula.config.load import load_model
from nebula.evaluation import EvalJobConfig
from nebula.inputs import ROWS_REPORTED, InputError, check_inputs, input_problems


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _job(tmp: Path, **over: Any) -> JobConfig:
    data: dict[str, Any] = {
        "name": "inputs", "output_dir": str(tmp / "out"),
        "model": {"path": str(tmp / "model"), "toy": {}},
        "datasets": {"train": [{"path": _jsonl(tmp / "train.jsonl",
                                               [{"prompt": "1+1=", "answer": "2"}] * 3)}],
                     "eval": {"path": _jsonl(tmp / "held.jsonl",
                                             [{"prompt": "2+2=", "answer": "4"}])}},
        "stages": [{"type": "grpo", "steps": 1}],
    }
    data.update(over)
    return load_model(JobConfig, data)


def _fields(problems: list[dict[str, str]]) -> dict[str, str]:
    return {p["field"]: p["message"] for p in problems}


def test_a_good_job_has_no_problems_and_a_toy_model_path_may_not_exist_yet(tmp_path: Path
                                                                          ) -> None:
    cfg = _job(tmp_path)
    assert not Path(cfg.model.path).exists()
    assert input_problems(cfg) == []
    check_inputs(cfg)


def test_missing_paths_are_named_by_field(tmp_path: Path) -> None:
    cfg = _job(tmp_path, model={"path": str(tmp_path / "nowhere")},
               teachers=[{"name": "t", "path": str(tmp_path / "teacher.gguf")}],
               datasets={"train": [{"path": str(tmp_path / "gone.jsonl")}]})
    got = _fields(input_problems(cfg))
    assert got == {
        "model.path": f"path not found: {tmp_path / 'nowhere'}",
        "teachers.0.path": f"file not found: {tmp_path / 'teacher.gguf'}",
        "datasets.train.0.path": f"dataset file not found: {tmp_path / 'gone.jsonl'}",
    }, got
    with pytest.raises(InputError, match=r"model\.path: path not found.*datasets\.train\.0"
                                         r"\.path: dataset file not found"):
        check_inputs(cfg)


def test_rows_lacking_what_their_verifier_reads(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "1"},
            {"prompt": "c", "answer": None}, {"prompt": "d"}]
    held = _jsonl(tmp_path / "bad_held.jsonl", rows)
    cfg = _job(tmp_path, datasets={"train": [{"path": str(tmp_path / "train.jsonl")}],
                                   "eval": {"path": held}})
    _jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    got = [(p["field"], p["message"]) for p in input_problems(cfg)]
    assert got == [
        ("datasets.eval.prompt_field", f"{held} row 1: missing prompt field 'prompt'"),
        ("datasets.eval.reference_field", f"{held} row 2: missing reference field 'answer', "
                                          "which verifier 'math' needs"),
        ("datasets.eval.reference_field", f"{held} row 3: missing reference field 'answer', "
                                          "which verifier 'math' needs"),
    ], got


def test_verifier_metadata_and_per_row_verifiers(tmp_path: Path) -> None:
    rows = [{"prompt": "say hi", "answer": "", "v": "ifeval", "instruction_id_list": ["x"]},
            {"prompt": "say ho", "answer": "", "v": "ifeval"},
            {"prompt": "2+2=", "answer": "4", "v": "math"}]
    path = _jsonl(tmp_path / "mixed.jsonl", rows)
    ev = {"kind": "eval", "output_dir": str(tmp_path / "ev"),
          "model": {"path": str(tmp_path / "model"), "toy": {}},
          "datasets": [{"path": path, "verifier_field": "v"}]}
    got = _fields(input_problems(load_model(EvalJobConfig, ev)))
    assert got == {"datasets.0.metadata_fields": "verifier 'ifeval' needs the row field "
                   f"'instruction_id_list' of {path} passed as metadata"}, got
    ev["datasets"][0]["metadata_fields"] = ["instruction_id_list"]
    got = _fields(input_problems(load_model(EvalJobConfig, ev)))
    assert got == {"datasets.0.metadata_fields": f"{path} row 1: missing field "
                   "'instruction_id_list', which verifier 'ifeval' needs"}, got


def test_stage_datasets_need_what_their_algorithm_reads(tmp_path: Path) -> None:
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                              {"prompt": "p", "chosen": "a"}])
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "q"}])
    cfg = _job(tmp_path, stages=[{"type": "sft", "steps": 1, "dataset": {"path": sft}},
                                 {"type": "dpo", "steps": 1, "dataset": {"path": prefs}}])
    got = [(p["field"], p["message"]) for p in input_problems(cfg)]
    assert got == [("stages.0.dataset.reference_field",
                    f"{sft} row 1: missing reference field 'answer'"),
                   ("stages.1.dataset", f"{prefs} row 1: missing field 'rejected'")], got
    # An SFT stage without its own dataset trains on datasets.train.0's references.
    train = _jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "answer": ""}])
    cfg = _job(tmp_path, stages=[{"type": "sft", "steps": 1}],
               datasets={"train": [{"path": train}]})
    assert _fields(input_problems(cfg)) == {
        "datasets.train.0.reference_field": f"{train} row 0: missing reference field 'answer'"}


def test_pure_distillation_needs_no_reference_but_rewards_do(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "answer": ""}])
    teacher = str(tmp_path / "model")
    Path(teacher).mkdir()
    opd = {"type": "opd", "steps": 1, "teacher": "t", "alpha": 0.0}
    over = {"teachers": [{"name": "t", "path": teacher}], "datasets": {"train": [{"path": train}]}}
    cfg = _job(tmp_path, stages=[opd], **over)
    assert input_problems(cfg) == []
    cfg = _job(tmp_path, stages=[{**opd, "alpha": 0.5}], **over)
    assert _fields(input_problems(cfg)) == {"datasets.train.0.reference_field": (
        f"{train} row 0: missing reference field 'answer', which verifier 'math' needs")}


def test_unreadable_empty_and_many_bad_rows(tmp_path: Path) -> None:
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    cfg = _job(tmp_path, datasets={"train": [{"path": str(garbled)}]})
    (p,) = input_problems(cfg)
    assert p["field"] == "datasets.train.0.path" and p["type"] == "dataset"
    assert p["message"].startswith(f"cannot read {garbled} as jsonl: "), p

    many = _jsonl(tmp_path / "many.jsonl", [{"prompt": "p"}] * 12 + [{"prompt": "p",
                                                                      "answer": "1"}])
    cfg = _job(tmp_path, datasets={"train": [{"path": many}]})
    got = input_problems(cfg)
    assert len(got) == ROWS_REPORTED + 1, got
    assert got[-1] == {"field": "datasets.train.0.path", "type": "dataset_row", "message":
                       f"{many}: 12 rows lack fields (the first {ROWS_REPORTED} are listed)"}


def test_preflight_reads_each_dataset_once(tmp_path: Path, monkeypatch: Any) -> None:
    """Inside rows_read_once (a job's preflight: field checks, then tokenizing) a dataset file
    is parsed once; outside it every call reads the file again (nothing kept)."""
    import datasets

    from nebula.config.job import DatasetConfig
    from nebula.prompts import read_rows, rows_read_once

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "reference": "1"}\n{"prompt": "b", "reference": "2"}\n')
    calls = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or load(*a, **k))
    d = DatasetConfig(path=str(path))
    with rows_read_once():
        assert read_rows(d) == read_rows(d)
        assert len(read_rows(d.model_copy(update={"limit": 1}))) == 1
    assert len(calls) == 2  # one per (file, limit)
    read_rows(d)
    assert len(calls) == 3
