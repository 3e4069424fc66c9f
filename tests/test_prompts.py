"""Prompt formatting with real tokenizers: SmolLM2's (Llama-style, from the GGUF, with a
default system prompt in its template), Qwen3's (thinking-aware template, no BOS) and Llama 3's
(BOS written by the template). The ids must be those the template renders, with no doubled
BOS, and bad options must fail naming the file, row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nebula import assets
from nebula.config.job import DatasetConfig
from nebula.prompts import DatasetError, load_prompt_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol() -> Any:
    gguf = assets.smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def qwen3() -> Any:
    return transformers.AutoTokenizer.from_pretrained(assets.tokenizer_dir("qwen3"))


@pytest.fixture(scope="module")
def llama3() -> Any:
    return transformers.AutoTokenizer.from_pretrained(assets.tokenizer_dir("llama3"))


def _dataset(tmp_path: Path, rows: list[dict[str, Any]], **cfg: Any) -> DatasetConfig:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetConfig(path=str(path), **cfg)


def _template_ids(tok: Any, messages: list[dict[str, str]], **kw: Any) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", ["smol", "qwen3", "llama3"])
def test_chat_prompt_ids_are_the_templates_rendering(name: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    tok = request.getfixturevalue(name)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = _dataset(tmp_path, [{"prompt": "What is 2 + 3?", "answer": "5"},
                                {"prompt": msgs, "answer": "5"}])
    rows = load_prompt_rows(plain, tok)
    want = _template_ids(tok, msgs)
    assert rows[0].prompt_ids == want  # plain text through the template (chat_template auto)
    assert rows[1].prompt_ids == want  # chat messages
    assert rows[0].prompt_text.endswith(tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)[-20:])
    bos = tok.bos_token_id
    if bos is not None:  # never doubled (SmolLM2's BOS is <|im_start|>, which opens every turn)
        assert rows[0].prompt_ids[:2] != [bos, bos]
    assert "assistant" in tok.decode(rows[0].prompt_ids[-4:])  # ends opening the reply


def test_llama3_bos_once_and_smol_default_system_prompt(smol: Any, llama3: Any,
                                                        tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [{"prompt": "hi", "answer": "x"}])
    ids = load_prompt_rows(ds, llama3)[0].prompt_ids
    assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1
    smol_rows = load_prompt_rows(ds, smol)
    assert "You are a helpful AI assistant named SmolLM" in smol_rows[0].prompt_text
    own = _dataset(tmp_path, [{"prompt": "hi", "answer": "x"}],
                   system_prompt="Answer with a number.")
    text = load_prompt_rows(own, smol)[0].prompt_text
    assert "Answer with a number." in text and "named SmolLM" not in text


def test_plain_text_without_template_gets_the_tokenizers_special_tokens(
        smol: Any, llama3: Any, tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [{"prompt": "Once upon a time", "answer": "x"}],
                  chat_template="never")
    for tok in (smol, llama3):
        row = load_prompt_rows(ds, tok)[0]
        assert row.prompt_text == "Once upon a time"
        assert row.prompt_ids == list(tok("Once upon a time")["input_ids"])  # as vLLM does


def test_qwen3_enable_thinking(qwen3: Any, tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "2+2?"}]
    off = _dataset(tmp_path, [{"prompt": msgs, "answer": "4"}],
                   chat_template_kwargs={"enable_thinking": False})
    row = load_prompt_rows(off, qwen3)[0]
    assert "<think>\n\n</think>" in row.prompt_text
    assert row.prompt_ids == _template_ids(qwen3, msgs, enable_thinking=False)
    on = _dataset(tmp_path, [{"prompt": msgs, "answer": "4"}])
    assert "<think>" not in load_prompt_rows(on, qwen3)[0].prompt_text


def test_bad_input_names_file_row_and_field(smol: Any, tmp_path: Path) -> None:
    # A template option the template never reads (SmolLM2 has no thinking switch).
    ds = _dataset(tmp_path, [{"prompt": "hi", "answer": "x"}],
                  chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(DatasetError, match=r"d\.jsonl: chat_template_kwargs\.enable_thinking"):
        load_prompt_rows(ds, smol)
    # A prompt longer than the context leaves room for.
    ds = _dataset(tmp_path, [{"prompt": "short", "answer": "x"},
                             {"prompt": "word " * 300, "answer": "x"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl row 1: prompt has \d+ tokens, but the "
                                           r"context leaves room for 100"):
        load_prompt_rows(ds, smol, max_prompt_tokens=100)
    # Neither a string nor chat messages.
    ds = _dataset(tmp_path, [{"prompt": 7, "answer": "x"}])
    with pytest.raises(DatasetError, match=r"row 0: field 'prompt' must be a string"):
        load_prompt_rows(ds, smol)


def test_chat_prompt_without_a_template_is_refused(tmp_path: Path) -> None:
    from nebula.toy_model import build_toy_model
    from nebula.config.job import ToyModelConfig

    toy = build_toy_model(tmp_path / "toy", ToyModelConfig())
    tok = transformers.AutoTokenizer.from_pretrained(toy)
    ds = _dataset(tmp_path, [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}])
    with pytest.raises(DatasetError, match=r"row 0: field 'prompt' holds chat messages but the "
                                           "tokenizer has no chat template"):
        load_prompt_rows(ds, tok)
    always = _dataset(tmp_path, [{"prompt": "hi", "answer": "x"}], chat_template="always")
    with pytest.raises(DatasetError, match="chat_template=always but the tokenizer"):
        load_prompt_rows(always, tok)


def test_a_job_with_bad_input_fails_before_anything_starts_or_is_written(tmp_path: Path) -> None:
    """Through JobRunner.run: the error names the row or field, no service or worker starts
    (it fails in seconds, without Ray) and the job's output dir is never created."""
    import yaml

    from nebula.config import load_model
    from nebula.config.job import JobConfig
    from procs import ROOT
    from services.runner import JobRunner

    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n"
                    + json.dumps({"prompt": "1+" * 40 + "2=", "answer": "42"}) + "\n")
    data["model"]["path"] = str(tmp_path / "model")
    data["datasets"] = {"train": [{"path": str(rows), "verifier": "exact"}]}
    data["output_dir"] = str(tmp_path / "out")
    with pytest.raises(DatasetError, match=r"rows\.jsonl row 1: prompt has 82 tokens"):
        JobRunner(load_model(JobConfig, data)).run()
    data["rollout"]["max_tokens"] = 64  # the toy model's whole context
    with pytest.raises(ValueError, match=r"rollout\.max_tokens: 64 completion tokens leave no "
                                         r"room for a prompt"):
        JobRunner(load_model(JobConfig, data)).run()
    assert not (tmp_path / "out").exists()
