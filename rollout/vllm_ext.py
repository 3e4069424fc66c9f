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

        Returns the number of tensors in the blob. Tensors missing from the blob keep their
        values (e.g. a tied `lm_head.weight`, which vLLM's Qwen2 skips anyway).
        """
        from safetensors.torch import load

        tensors = load(bytes(blob))
        self.model_runner.model.load_weights(weights=iter(tensors.items()))
        return len(tensors)

    def weights_checksum(self) -> float:
        """Sum of all parameters in float64 (tests: did an update reach the worker?)."""
        import torch

        total = torch.zeros((), dtype=torch.float64)
        for p in self.model_runner.model.parameters():
            total += p.detach().double().sum()
        return float(total)
