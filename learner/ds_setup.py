"""Building blocks of `DSLearnerEngine`'s set-up: the Hugging Face model as the learner trains
it, and the generated DeepSpeed config. torch/transformers are imported inside functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.job import LearnerConfig


def torch_dtype(dtype: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None


def load_hf_model(model_path: str, dtype: str) -> Any:
    """The causal LM of `model_path` in `dtype`, with the segment attention for packed rows
    (`learner.logprobs`; plain sdpa otherwise)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from learner.logprobs import use_segment_attention

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_path, **{key: torch_dtype(dtype)})
    use_segment_attention(model)
    return model


def prepare_trained_model(model: Any, cfg: LearnerConfig,
                          mlp_tile_tokens: int | None = None) -> None:
    """Training-time switches of the model the engine trains: no KV cache, and with
    `cfg.activation_checkpointing` transformers' gradient checkpointing of every decoder layer
    (non-reentrant: works with keyword inputs and ZeRO-3, and the backward recomputes each
    layer from its saved input), plus, with `mlp_tile_tokens`, tiled MLPs (`tile_mlps`)."""
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mlp_tile_tokens:
            tile_mlps(model, int(mlp_tile_tokens))


def ds_config(cfg: LearnerConfig, dtype: str, default_optimizer: bool,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed config of one optimizer step per `train_batch` call (the engine does the
    micro-batching and the accumulation itself: gradient_accumulation_steps 1 and
    `set_gradient_accumulation_boundary`). bf16/fp16 keep fp32 master weights, gradients and
    Adam states in DeepSpeed's optimizer wrappers. `extra` is merged over it."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.grad_clip),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
    }
    if default_optimizer:
        # torch's AdamW: DeepSpeed's own CPU Adam would compile an op first. Fused (CPU and
        # CUDA kernels): the loop implementation allocates temporaries the size of each
        # parameter (2 x the embedding; under bf16, of the one flat fp32 master tensor).
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": float(cfg.lr), "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": float(cfg.weight_decay), "torch_adam": True, "fused": True}}
    return merge(config, extra or {})


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursively for nested dicts."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tile_mlps(model: Any, tile_tokens: int) -> int:
    """Run each decoder layer's MLP over at most `tile_tokens` tokens at a time, each tile
    under non-reentrant checkpoint, when autograd records in training mode. Meant for
    activation checkpointing: when the backward pass recomputes a layer, its MLP's
    [tokens, intermediate] activations (gate, up, act, act*up: ~2/3 of what a recomputed layer
    holds) would exist for the whole micro-batch at once; tiled, for one tile (as in
    DeepSpeed's TiledMLP / ALST), at the cost of one more MLP forward per layer. Exact: the MLP
    is per token. The module's `forward` is swapped on the instance, so parameter names and
    ZeRO-3's hooks (on the projections) are unchanged. Returns the number of MLPs tiled."""
    import torch
    from torch.utils.checkpoint import checkpoint

    layers = getattr(model.get_decoder(), "layers", None) or []
    count = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        inner = mlp.forward

        def forward(x: Any, _inner: Any = inner, _mlp: Any = mlp) -> Any:
            tokens = x.shape[:-1].numel()
            if tokens <= tile_tokens or not (torch.is_grad_enabled() and _mlp.training):
                return _inner(x)
            flat = x.reshape(tokens, x.shape[-1])
            out = [checkpoint(_inner, t, use_reentrant=False) for t in flat.split(tile_tokens)]
            return torch.cat(out).view(*x.shape[:-1], -1)

        mlp.forward = forward
        count += 1
    return count
