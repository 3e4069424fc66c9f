"""A hosted teacher: a causal LM that scores completion tokens (log-probs, optional top-k).

`tokenizer_fingerprint` and `weights_version` are light (no torch); torch and transformers are
imported when a `HostedTeacher` is built, so clients can import this module cheaply.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nebula.clients.teacher import tokenizer_fingerprint  # noqa: F401 - part of the contract

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.teacher import TeacherModelConfig

# Special tokens that take part in the fingerprint. The pad token does not: it never reaches the
# teacher (the service pads with its own mask), and students often set pad = eos ad hoc.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TeacherLoadError(RuntimeError):
    """A teacher could not be loaded; the message names the config field."""


@dataclass(frozen=True)
class SeqScore:
    """Teacher scores of one sequence's completion tokens (arrays are read-only)."""

    logprobs: np.ndarray  # float32 [C]
    top_ids: np.ndarray | None = None  # int32 [C, k]
    top_logprobs: np.ndarray | None = None  # float32 [C, k]

    @property
    def top_k(self) -> int:
        return 0 if self.top_ids is None else int(self.top_ids.shape[1])

    def with_top_k(self, k: int) -> SeqScore:
        """The same scores with top-k cut to the first k (k=0 drops it)."""
        if k == self.top_k:
            return self
        if k == 0:
            return SeqScore(self.logprobs)
        if self.top_ids is None or k > self.top_k:
            raise ValueError(f"have top-{self.top_k}, asked for top-{k}")
        return SeqScore(self.logprobs, _frozen(self.top_ids[:, :k]),
                        _frozen(self.top_logprobs[:, :k]))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def weights_version(path: str | Path) -> str:
    """Short sha256 of a checkpoint's config.json and weight files (names and contents)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()[:12]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TeacherLoadError("device is cuda but no CUDA GPU is visible")
    return device


def resolve_backend(backend: str, device: str) -> str:
    """`auto`: vllm on cuda when vLLM is installed, else transformers."""
    if backend != "auto":
        return backend
    if device.startswith("cuda"):
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return "vllm"
    return "transformers"


class HostedTeacher:
    """One teacher model held in memory; `score` is blocking (run it off the event loop)."""

    def __init__(self, cfg: TeacherModelConfig, field: str = "teacher") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.name = cfg.name
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise TeacherLoadError(f"{field}.path: no checkpoint at {path} (config.json missing)")
        try:
            self.device = resolve_device(cfg.device)
        except TeacherLoadError as e:
            raise TeacherLoadError(f"{field}.device: {e}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loader error, reported with the field
            raise TeacherLoadError(f"{field}.path: cannot load the tokenizer of {path}: {e}") from e
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.backend = resolve_backend(cfg.backend, self.device)
        self.vllm: Any = None
        self.model: Any = None
        try:
            if self.backend == "vllm":
                from transformers import AutoConfig

                from teacher.vllm_backend import VLLMScorer

                mcfg = AutoConfig.from_pretrained(path)
                text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
                self.vllm = VLLMScorer(path, cfg.dtype, self.device,
                                       getattr(text_cfg, "max_position_embeddings", None))
                self.vocab_size = int(text_cfg.vocab_size)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
                self.model = model.to(self.device).eval()
                mcfg = self.model.config
                text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
                out_emb = self.model.get_output_embeddings()
                self.vocab_size = int(out_emb.weight.shape[0] if out_emb is not None
                                      else text_cfg.vocab_size)
        except Exception as e:  # noqa: BLE001
            raise TeacherLoadError(f"{field}.path: cannot load the model at {path} with "
                                   f"{self.backend}: {e}") from e
        self.max_positions: int | None = getattr(text_cfg, "max_position_embeddings", None)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.version = cfg.version or (weights_version(path)
                                       + ("" if cfg.dtype == "float32" else f"-{cfg.dtype}"))
        self.max_batch_tokens = cfg.max_batch_tokens
        self._pad_id = 0
        self.forward_passes = 0
        params = inspect.signature(self.model.forward).parameters if self.model else {}
        self._logits_to_keep = "logits_to_keep" in params
        self._position_ids = "position_ids" in params

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "vocab_size": self.vocab_size,
                "tokenizer_fingerprint": self.fingerprint}

    # -- scoring -------------------------------------------------------------------------------

    def score(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]], top_k: Sequence[int] | int = 0,
              max_batch_sequences: int | None = None) -> list[SeqScore]:
        """Scores of (prompt_ids, completion_ids) pairs, in order. Sequences are sorted by length
        and cut into forward passes of at most `max_batch_tokens` padded tokens (and
        `max_batch_sequences` sequences); each pass right-pads with an attention mask, so a
        sequence's scores do not depend on what it is batched with (up to float rounding)."""
        n = len(seqs)
        ks = [int(top_k)] * n if isinstance(top_k, int) else [int(k) for k in top_k]
        lengths = [len(p) + len(c) for p, c in seqs]
        order = sorted(range(n), key=lambda i: -lengths[i])
        out: list[SeqScore | None] = [None] * n
        cap = max_batch_sequences or n or 1
        chunk: list[int] = []
        for i in order:
            if chunk and ((len(chunk) + 1) * lengths[chunk[0]] > self.max_batch_tokens
                          or len(chunk) >= cap):
                self._score_chunk(seqs, ks, chunk, out)
                chunk = []
            chunk.append(i)
        if chunk:
            self._score_chunk(seqs, ks, chunk, out)
        return out  # type: ignore[return-value]

    def _score_chunk(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]], ks: list[int],
                     idx: list[int], out: list[SeqScore | None]) -> None:
        scores = self.forward([seqs[i] for i in idx], max(ks[i] for i in idx))
        for i, s in zip(idx, scores):
            out[i] = s.with_top_k(ks[i])

    def forward(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]],
                top_k: int = 0) -> list[SeqScore]:
        """One forward pass over the (right-padded) batch. Every prompt must be non-empty."""
        import torch

        self.forward_passes += 1
        lens = [(len(p), len(c)) for p, c in seqs]
        if any(p < 1 or c < 1 for p, c in lens):
            raise ValueError("every sequence needs a non-empty prompt and completion")
        if self.vllm is not None:
            return [SeqScore(_frozen(t), None if i is None else _frozen(i),
                             None if v is None else _frozen(v))
                    for t, i, v in self.vllm.forward(seqs, top_k)]
        b, t = len(seqs), max(p + c for p, c in lens)
        ids = torch.full((b, t), self._pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            n = len(p) + len(c)
            ids[i, :n] = torch.from_numpy(np.concatenate([p, c]).astype(np.int64))
            mask[i, :n] = 1
        first = min(p for p, _ in lens) - 1  # first position whose logits are needed
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = t - first
        if self._position_ids:
            kwargs["position_ids"] = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                **kwargs).logits
            offset = t - logits.shape[1]
            results = []
            for i, ((n_p, n_c), (_, c)) in enumerate(zip(lens, seqs)):
                start = n_p - 1 - offset
                lp = torch.log_softmax(logits[i, start:start + n_c].float(), -1)
                target = torch.from_numpy(np.array(c, dtype=np.int64)).to(lp.device)
                tok = lp.gather(1, target.unsqueeze(1)).squeeze(1)
                if top_k > 0:
                    top_v, top_i = lp.topk(top_k, dim=-1)
                    results.append(SeqScore(_frozen(tok.cpu().numpy()),
                                            _frozen(top_i.to(torch.int32).cpu().numpy()),
                                            _frozen(top_v.cpu().numpy())))
                else:
                    results.append(SeqScore(_frozen(tok.cpu().numpy())))
        return results

    def check_sequence(self, prompt: np.ndarray, completion: np.ndarray) -> str | None:
        """Why (prompt, completion) cannot be scored, or None."""
        if len(completion) == 0:
            return "empty completion_ids"
        if len(prompt) == 0:
            return ("empty prompt_ids (the first completion token must be predicted from at "
                    "least one prompt token)")
        for field, arr in (("prompt_ids", prompt), ("completion_ids", completion)):
            bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
            if bad.size:
                j = int(bad[0])
                return (f"{field}[{j}] = {int(arr[j])} is outside the vocabulary of teacher "
                        f"{self.name!r} [0, {self.vocab_size})")
        n = len(prompt) + len(completion)
        if self.max_positions is not None and n > self.max_positions:
            return (f"length {n} ({len(prompt)} prompt + {len(completion)} completion tokens) "
                    f"exceeds the max positions ({self.max_positions}) of teacher {self.name!r}")
        return None
