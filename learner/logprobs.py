"""Per-token log-probs of a causal LM without full-vocabulary logits for a whole micro-batch.

The decoder runs once over the micro-batch's rows (padded or packed, `learner.packing`) and
gives the final hidden states. Only the positions that predict a completion token are kept
([M, H]); the LM head, log_softmax(logits / temperature), the gathered log-prob of the next
token and, when asked, the log-probs at the teacher's top-k ids and the entropy are computed
`chunk` positions at a time, each chunk under non-reentrant `torch.utils.checkpoint`: the
backward pass recomputes a chunk's logits instead of keeping them, so at most one chunk's
[chunk, V] float32 logits (and their gradient) exist at any time, in either pass. This is the
idea of torchtitan's chunked loss and Liger's fused linear cross-entropy, kept in autograd so
that any loss (GRPO, distillation) can sit on top. The results are scattered back to the
micro-batch's [S, T] per-token layout (0 at the positions not computed).

DeepSpeed: the whole computation runs inside the engine's forward (the wrapped model's
`forward` is swapped for the duration of the call), so the engine's backward prologue
(ZeRO's gradient bookkeeping) fires on the log-prob outputs before any parameter gradient,
exactly as with the model's own forward; the LM head is called as a module, so ZeRO-3 gathers
its (possibly tied) weight through its hooks, in the forward and in the recomputation.

Attention for packed rows: transformers builds a block-diagonal causal mask from the
`position_ids` (correct, but attention then costs (sum of lengths)^2 instead of the sum of
squares). `use_segment_attention(model)` installs an attention function that runs each packed
sequence as its own causal block (same sdpa kernel), used when the model has it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from learner.packing import MicroBatch

SEGMENT_ATTENTION = "nebula_segments"
_SEQ_LENS_KWARG = "nebula_seq_lens"


@dataclass
class TokenLogProbs:
    """Log-probs of one micro-batch in its `Batch`'s per-token layout."""

    token: torch.Tensor             # [S, T] float32, log-prob of each position's next token
    top: torch.Tensor | None        # [S, T, k] float32, log-probs at the teacher's top-k ids
    entropy: torch.Tensor | None    # [S, T] float32, entropy of the tempered distribution (no grad)


def _segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa, but a packed row (`nebula_seq_lens` given) runs one causal block per sequence."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seq_lens = kwargs.pop(_SEQ_LENS_KWARG, None)
    if seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    outs, start = [], 0
    for n in seq_lens:
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:start + n], key[:, :, start:start + n],
            value[:, :, start:start + n], None, dropout=dropout, scaling=scaling,
            is_causal=True, **kwargs)
        outs.append(out)  # [1, n, heads, head_dim]
        start += n
    return torch.cat(outs, dim=1), None


def use_segment_attention(model: Any) -> None:
    """Give `model` (a Hugging Face causal LM using sdpa) the segment attention above. The
    name is registered with transformers; masks are sdpa's, so the model stays correct for any
    other input. Models on another attention implementation are left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", SEGMENT_ATTENTION):
        return
    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)


def _check_supported(hf: Any) -> None:
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, name, None) not in (None, 1.0):
            # Those models post-process lm_head's output; the chunked head would skip that.
            raise NotImplementedError(f"{type(hf).__name__}: {name} is not supported by the "
                                      "chunked log-prob computation")


def _chunk_fn(head: torch.nn.Module, temperature: float, with_entropy: bool) -> Callable:
    def run(h: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits = head(h).float()
        if temperature != 1.0:
            # In place: the linear layer's backward does not need its output.
            logits = logits.div_(temperature)
        lse = torch.logsumexp(logits, dim=-1)
        token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        top = None if top_ids is None else logits.gather(-1, top_ids) - lse.unsqueeze(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():  # a metric: H = lse - sum_v p_v * z_v
                p = (logits - lse.unsqueeze(-1)).exp_()
                entropy = lse - torch.einsum("cv,cv->c", p, logits)
                del p
        return token, top, entropy
    return run


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  top_ids: torch.Tensor | None = None, temperature: float = 1.0,
                  chunk: int = 1024, with_entropy: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden [M, H] final hidden states -> ([M] log-prob of `targets`, [M, k] log-probs at
    `top_ids`, [M] entropy), `chunk` rows at a time; each chunk is checkpointed when autograd
    records, so its logits are recomputed in the backward pass instead of kept."""
    run = _chunk_fn(head, float(temperature), with_entropy)
    chunk = max(int(chunk), 1)
    grad = torch.is_grad_enabled()
    tokens, tops, ents = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        args = (hidden[s:e], targets[s:e], None if top_ids is None else top_ids[s:e])
        tok, top, ent = (checkpoint(run, *args, use_reentrant=False) if grad else run(*args))
        tokens.append(tok)
        tops.append(top)
        ents.append(ent)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    token = torch.cat(tokens) if tokens else empty
    top = None
    if top_ids is not None:
        top = torch.cat(tops) if tops else empty.view(0, top_ids.shape[-1])
    entropy = (torch.cat(ents) if ents else empty) if with_entropy else None
    return token, top, entropy


def _scored_forward(hf: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                    seq_lens: list[int] | None, src: torch.Tensor, targets: torch.Tensor,
                    top_ids: torch.Tensor | None, temperature: float, chunk: int,
                    with_entropy: bool) -> dict[str, torch.Tensor]:
    """Decoder + chunked head at the `src` positions; a dict of tensors (what DeepSpeed's
    output hooks walk)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if seq_lens is not None:
        if hf.config._attn_implementation == SEGMENT_ATTENTION:
            # A mask of ones keeps transformers from building the block-diagonal mask the
            # segment attention does not need; the sequence lengths delimit the blocks.
            kwargs["attention_mask"] = torch.ones_like(input_ids)
            kwargs[_SEQ_LENS_KWARG] = seq_lens
        # else: no mask, and transformers detects the packing from the position ids.
    decoder = hf.get_decoder()
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src)
    token, top, entropy = head_logprobs(hf.get_output_embeddings(), hidden, targets, top_ids,
                                        temperature, chunk, with_entropy)
    out = {"token": token}
    if top is not None:
        out["top"] = top
    if entropy is not None:
        out["entropy"] = entropy
    return out


@contextlib.contextmanager
def _forward_swapped(module: torch.nn.Module, fn: Callable) -> Iterator[None]:
    """`module.forward` is `fn` inside the block (an instance attribute shadows the method)."""
    module.forward = fn
    try:
        yield
    finally:
        del module.forward


def _is_engine(model: Any) -> bool:
    """A DeepSpeed engine (or any wrapper) holding the Hugging Face model as `.module`."""
    return isinstance(getattr(model, "module", None), torch.nn.Module)


def micro_batch_logprobs(model: Any, mb: MicroBatch, temperature: float = 1.0,
                         chunk: int = 1024, with_top: bool = False,
                         with_entropy: bool = False) -> TokenLogProbs:
    """Log-probs (float32) of the tokens of `mb` at the positions that predict a completion
    token, in `mb.batch`'s [S, T] layout (0 elsewhere).

    `model` is a Hugging Face causal LM whose logits are `lm_head(last_hidden_state)` (Llama,
    Qwen2/3, Mistral, ...), or a DeepSpeed engine wrapping one. `chunk` positions of
    full-vocabulary logits exist at a time. With `with_top`, also the log-probs at the batch's
    teacher top-k ids ([S, T, k]); with `with_entropy`, the entropy of the tempered
    distribution ([S, T], no gradient).
    """
    hf = model.module if _is_engine(model) else model
    _check_supported(hf)
    top_ids = mb.top_ids() if with_top else None
    kwargs = {"input_ids": mb.input_ids, "position_ids": mb.position_ids,
              "seq_lens": mb.seq_lens, "src": mb.src, "targets": mb.targets(),
              "top_ids": top_ids, "temperature": temperature, "chunk": chunk,
              "with_entropy": with_entropy}
    if hf is model:
        out = _scored_forward(hf, **kwargs)
    else:
        # Through the engine's own forward (see the module docstring).
        with _forward_swapped(hf, lambda **kw: _scored_forward(hf, **kw)):
            out = model(**kwargs)

    S, T = mb.batch.mask.shape

    def scatter(values: torch.Tensor) -> torch.Tensor:
        flat = values.new_zeros((S * T,) + tuple(values.shape[1:]))
        return flat.index_copy(0, mb.dst, values).view((S, T) + tuple(values.shape[1:]))

    top = scatter(out["top"]) if "top" in out else None
    if with_top and top is None:  # k = 0: nothing to gather
        top = mb.batch.teacher_top_logprobs.new_zeros(mb.batch.teacher_top_ids.shape)
    entropy = scatter(out["entropy"]) if "entropy" in out else None
    return TokenLogProbs(token=scatter(out["token"]), top=top, entropy=entropy)
