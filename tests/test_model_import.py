"""GGUF import (nebula/model_import.py, `nebula model import`) with the real SmolLM2-135M-Instruct
GGUF: the imported dir equals transformers' own GGUF load, generates sensible text that stops at
the end of the assistant turn, and vLLM produces the same greedy tokens.

The real asset is required: without it the fixtures raise `AssetMissing` (set-up fetches it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from procs import ROOT

NEBULA = [sys.executable, "-m", "services"]
QUESTION = "What is the capital of France?"
HAIKU = "Write a short poem about the sea."
IM_END = 2  # `<|im_end|>` in SmolLM2's vocabulary


def cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(NEBULA + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from nebula.assets import smollm2_gguf

    return smollm2_gguf()  # raises AssetMissing (a failure, not a skip) when absent


@pytest.fixture(scope="module")
def imported(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The one real import of this module, through the CLI."""
    out = tmp_path_factory.mktemp("import") / "smollm2"
    t0 = time.monotonic()
    res = cli(["model", "import", str(gguf_path), str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    yield {"dir": out, "stdout": res.stdout, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def hf(imported: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer) loaded from the imported dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(imported["dir"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(imported["dir"])


def chat_ids(tok: Any, content: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": content}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_cli_import_writes_a_complete_hf_dir(imported: dict[str, Any]) -> None:
    d: Path = imported["dir"]
    out = imported["stdout"]
    assert "LlamaForCausalLM" in out and "134,515,008 parameters" in out
    assert "vocab 49,152" in out and "F32" in out and str(d) in out
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert os.listdir(d.parent) == [d.name]  # the temporary dir was renamed, nothing left over


def test_special_tokens_agree_and_embeddings_stay_tied(imported: dict[str, Any],
                                                       hf: tuple[Any, Any]) -> None:
    from safetensors import safe_open

    model, tok = hf
    cfg = json.loads((imported["dir"] / "config.json").read_text())
    gen = json.loads((imported["dir"] / "generation_config.json").read_text())
    # SmolLM2's GGUF: bos <|im_start|>=1, eos <|im_end|>=2 (ends the assistant turn), pad = eos.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    for ids in (cfg, gen, {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                           "pad_token_id": tok.pad_token_id}):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, IM_END, 2)
    assert tok("hi").input_ids == [6004]  # no BOS added by the tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert cfg["tie_word_embeddings"] is True
    with safe_open(str(imported["dir"] / "model.safetensors"), "pt") as st:
        assert "lm_head.weight" not in set(st.keys())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_equal_transformers_gguf_load(gguf_path: Path, hf: tuple[Any, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = hf
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, QUESTION)])
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    del ref
    # Same float32 tensors through the same code: measured max |diff| = 0.0. 1e-5 leaves room
    # for a different kernel choice, not for a wrong weight (those differ by >> 1e-2).
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_greedy_chat_answer_stops_at_im_end(hf: tuple[Any, Any]) -> None:
    model, tok = hf
    new = hf_greedy(model, chat_ids(tok, QUESTION), 24)
    assert new[-1] == IM_END and IM_END not in new[:-1]  # stopped at the end of the turn
    text = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in text, text


def test_vllm_loads_the_dir_and_matches_hf_greedy(imported: dict[str, Any],
                                                  hf: tuple[Any, Any]) -> None:
    from rollout.engine import VLLMEngine

    model, tok = hf
    prompts = [chat_ids(tok, QUESTION), chat_ids(tok, HAIKU)]
    expected = [hf_greedy(model, p, 24) for p in prompts]
    engine = VLLMEngine(imported["dir"], dtype="float32", max_model_len=512,
                        multiprocessing=False)
    try:
        assert engine.eos_token_id == IM_END
        (paris,), (poem,) = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0,
                                            max_tokens=24)
    finally:
        engine.close()
    # The short answer ends at <|im_end|> in both engines: the whole sequence must match.
    assert paris.completion_ids == expected[0] and paris.finish_reason == "stop"
    assert "Paris" in paris.text
    # The longer one: vLLM's CPU attention/GEMM kernels sum in a different order than torch's,
    # so a near-tie late in a 24-token greedy run could flip; the first 16 must agree.
    assert poem.completion_ids[:16] == expected[1][:16]


def write_gguf(path: Path, arch: str) -> Path:
    """A tiny, well-formed GGUF of architecture `arch`."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_cli_import_rejects_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("definitely not a GGUF file\n")
    unsupported = write_gguf(tmp_path / "alien.gguf", "notamodel")
    missing = tmp_path / "missing.gguf"
    for src, words in ((not_gguf, ["is not a GGUF file"]),
                       (unsupported, ["'notamodel' is not supported", "llama", "qwen2"]),
                       (missing, ["not found"])):
        out = tmp_path / f"out-{src.stem}"
        res = cli(["model", "import", str(src), str(out)], timeout=120)
        assert res.returncode == 2, (src, res.stdout, res.stderr[-2000:])
        assert res.stderr.startswith("error: ") and str(src) in res.stderr, res.stderr
        for w in words:
            assert w in res.stderr, res.stderr
        assert not out.exists()
    # Nothing written next to the outputs either (no temporary dirs left).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alien.gguf", "weights.gguf"]


def test_import_refuses_a_non_empty_out(gguf_path: Path, tmp_path: Path) -> None:
    from nebula.model_import import import_gguf

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        import_gguf(gguf_path, tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        import_gguf(gguf_path, tmp_path / "x", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


_ENSURE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
from nebula.model_import import ensure_hf_model
print(ensure_hf_model(sys.argv[1], import_dir=sys.argv[2]))
"""


def test_ensure_hf_model_imports_once_across_processes(gguf_path: Path, imported: dict[str, Any],
                                                       tmp_path: Path) -> None:
    from nebula.model_import import ensure_hf_model

    hf_dir = str(imported["dir"])
    assert ensure_hf_model(hf_dir) == hf_dir  # a HF dir passes through unchanged
    cache = tmp_path / "cache"
    # Two processes ask at once: one imports, the other waits on the lock and reuses it.
    procs = [subprocess.Popen([sys.executable, "-c", _ENSURE, str(gguf_path), str(cache)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in results]
    # Last line: DeepSpeed (imported by accelerate) may print a warning to stdout first.
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    imports = sum(e.count("nebula.model_import imported") for _, e in results)
    assert imports == 1, [e[-2000:] for _, e in results]
    target = Path(paths.pop())
    assert target.parent == cache and target.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert target.name.endswith("-float32") and (target / "model.safetensors").is_file()
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert ensure_hf_model(str(gguf_path), import_dir=str(cache)) == str(target)
    assert time.monotonic() - t0 < 5  # a hash of 98 MB, no import
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]
