"""Import GGUF checkpoints (llama.cpp's format) as Hugging Face checkpoint dirs.

The learner (transformers/DeepSpeed) and the rollout engines (vLLM) both want a plain Hugging
Face dir: safetensors weights, config.json, generation_config.json and the tokenizer files with
the chat template. `import_gguf` makes one from a `.gguf` file with transformers' own GGUF loader,
which dequantises the weights and undoes llama.cpp's Q/K row permutation, so there is no
hand-written conversion here. `ensure_hf_model` is what a job calls with `model.path`: HF dirs
pass through, a `.gguf` is imported once into a cache keyed by name, content and dtype.

End of sequence: the dir's `generation_config.eos_token_id` lists the GGUF's EOS plus the token
that ends an assistant turn in the chat template (found by rendering one), so transformers
`generate` and vLLM (which adds generation_config's EOS ids to its stop ids) both stop at the end
of the assistant turn even where the GGUF's EOS is a different (document-end) token.

Heavy imports (torch, transformers) happen inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
GGUF_MAGIC = b"GGUF"
# A marker only our own temporary dirs carry, so a crashed import's leftovers can be found.
_TMP_INFIX = ".nebula-import-tmp-"
log = logging.getLogger(__name__)


class ModelImportError(ValueError):
    """A GGUF file that cannot be imported (not a GGUF, unsupported architecture, ...)."""


def supported_architectures() -> list[str]:
    """GGUF `general.architecture` values transformers can load (both of its GGUF loaders)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections
    try:  # the newer loader (transformers >= 5.x) has its own, separate table
        from transformers.integrations.gguf import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return sorted(archs)


def read_gguf_metadata(src: str | Path) -> dict[str, Any]:
    """The GGUF file's metadata (no tensor data); ModelImportError naming the file if it is
    missing, unreadable or not a GGUF."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    try:
        with src.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelImportError(f"cannot read {src}: {e}") from e
    if magic != GGUF_MAGIC:
        raise ModelImportError(f"{src} is not a GGUF file (it does not start with b'GGUF')")
    try:
        # transformers' own header reader takes ~15 ms; gguf.GGUFReader parses every
        # tokenizer array into Python objects (~4 s for a 49k vocab), so it is the fallback.
        from transformers.integrations.gguf import read_gguf_metadata as _read

        metadata, _ = _read(str(src))
        return dict(metadata)
    except ImportError:  # pragma: no cover - older transformers
        pass
    except Exception as e:  # noqa: BLE001 - any parse error means a corrupt/truncated file
        raise ModelImportError(f"cannot read GGUF metadata of {src}: {e}") from e
    try:  # pragma: no cover - older transformers
        import gguf

        reader = gguf.GGUFReader(str(src))
        return {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # noqa: BLE001  # pragma: no cover
        raise ModelImportError(f"cannot read GGUF metadata of {src}: {e}") from e


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """Id of the special token the chat template puts right after an assistant message
    (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3), or None (no template, or it fails)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "NEBULA_SENTINEL_7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
            tokenize=False)
    except Exception:  # noqa: BLE001 - templates may demand things we do not supply
        return None
    if not isinstance(text, str) or sentinel not in text:
        return None
    rest = text[text.rindex(sentinel) + len(sentinel):]
    specials = sorted(((t.content, i) for i, t in tokenizer.added_tokens_decoder.items()
                       if t.special), key=lambda ci: -len(ci[0]))  # longest match first
    for content, token_id in specials:
        if content and rest.startswith(content):
            return int(token_id)
    return None


def _fix_special_ids(model: Any, tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Make bos/eos/pad agree between config, generation_config and tokenizer, and make
    generation stop at the end of an assistant turn (see module doc)."""
    cfg, gen = model.config, model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok_id = getattr(tokenizer, name, None)
        if getattr(cfg, name, None) is None and tok_id is not None:
            setattr(cfg, name, int(tok_id))
        if getattr(gen, name, None) is None and getattr(cfg, name, None) is not None:
            setattr(gen, name, getattr(cfg, name))
    eos: list[int] = []
    candidates = [cfg.eos_token_id, tokenizer.eos_token_id,
                  # llama.cpp's end-of-turn / end-of-message keys, when the GGUF has them
                  metadata.get("tokenizer.ggml.eot_token_id"),
                  metadata.get("tokenizer.ggml.eom_token_id"),
                  _end_of_turn_id(tokenizer)]
    for c in candidates:
        for i in (c if isinstance(c, (list, tuple)) else [c]):
            if i is not None and int(i) not in eos:
                eos.append(int(i))
    if eos:
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen._from_model_config = False  # deliberate, not a copy to be re-derived from config.json


def _normalise_modes(path: Path) -> None:
    # mkdtemp makes 0700 dirs and safetensors may write 0600 files; a shared model cache
    # must be readable by the other users' processes (workers may run as another uid).
    path.chmod(0o755)
    for p in path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise FileExistsError(f"output path exists and is not a directory: {out}")
        if any(out.iterdir()):
            raise FileExistsError(f"output dir {out} is not empty (use overwrite=True / --overwrite)")


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32", *,
                overwrite: bool = False) -> Path:
    """Turn the GGUF file `src` into a Hugging Face checkpoint dir at `out`; return `out`.

    Weights are dequantised to `dtype` ("float32", "bfloat16" or "float16"). The dir is written
    next to `out` under a temporary name and renamed at the end, so `out` is either absent or
    complete; a failure removes the temporary dir. An existing non-empty `out` is refused
    (FileExistsError) unless `overwrite`. A missing `src` raises FileNotFoundError; a file that
    is not a GGUF, or of an architecture transformers cannot load, ModelImportError; both before
    anything is written.
    """
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    metadata = read_gguf_metadata(src)
    arch = str(metadata.get("general.architecture", "?"))
    _check_out(out, overwrite)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        # dequantize=True: with the `kernels` package installed transformers would otherwise
        # keep packed GGUF blocks in GgufLinear modules, which cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=_torch_dtype(dtype),
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input file
        if "not supported" in str(e):
            raise ModelImportError(
                f"{src}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader "
                f"(supported: {', '.join(supported_architectures())})") from e
        raise ModelImportError(f"{src}: transformers cannot load this GGUF ({arch}): "
                               f"{type(e).__name__}: {e}") from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense now; drop the GGUF quantization marker
        quantizer.remove_quantization_config(model)
    _fix_special_ids(model, tokenizer, metadata)
    if not tokenizer.chat_template and metadata.get("tokenizer.chat_template"):
        tokenizer.chat_template = metadata["tokenizer.chat_template"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_INFIX}", dir=out.parent))
    trash: Path | None = None
    try:
        model.save_pretrained(tmp)  # a tied lm_head is left out of the safetensors
        tokenizer.save_pretrained(tmp)  # writes chat_template.jinja next to tokenizer.json
        _normalise_modes(tmp)
        if out.exists():  # overwrite (checked above): move the old one aside, then swap
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, trash / "old")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return out


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Architecture, parameter count (tied tensors once), vocab and dtype of a HF dir, read
    from config.json and the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    params = 0
    dtypes: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= int(d)
                params += n
                dtypes.add(str(sl.get_dtype()))
    return {"architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
            "model_type": cfg.get("model_type"), "parameters": params,
            "vocab_size": cfg.get("vocab_size"), "dtype": ",".join(sorted(dtypes)),
            "path": str(path)}


def gguf_fingerprint(src: str | Path) -> str:
    """sha256 of the whole file (≈ 1 GB/s here: 0.1 s for the 98 MB SmolLM2 GGUF), so a file
    replaced in place under the same name is imported again."""
    h = hashlib.sha256()
    with Path(src).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$NEBULA_MODEL_CACHE, or ~/.cache/nebula/models."""
    env = os.environ.get("NEBULA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nebula" / "models"


def ensure_hf_model(path: str, import_dir: str | None = None, dtype: str = "float32") -> str:
    """A Hugging Face dir for `path`: `path` itself unless it is a `.gguf` file, which is
    imported once into `import_dir` (default `default_cache_dir()`) as
    `<stem>-<sha256[:16]>-<dtype>` and reused after.

    Safe across processes: an fcntl lock per key makes one caller import while the others wait,
    and the rename at the end of `import_gguf` means nobody sees a half-written dir.
    """
    import fcntl

    if not str(path).lower().endswith(".gguf"):
        return path  # a HF dir (or hub id): the loaders report their own errors
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    cache = Path(import_dir) if import_dir else default_cache_dir()
    key = f"{src.stem}-{gguf_fingerprint(src)[:16]}-{dtype}"
    target = cache / key
    if (target / "config.json").is_file():  # complete: the dir only appears by rename
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if (target / "config.json").is_file():  # another process imported it meanwhile
            return str(target)
        for stale in cache.glob(f".{key}{_TMP_INFIX}*"):  # a killed importer's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        import_gguf(src, target, dtype, overwrite=True)  # overwrite: a dir without config.json
        log.info("imported %s to %s in %.1f s", src, target,
                                         time.monotonic() - t0)
    return str(target)
