"""Per-token log-probs of a causal LM without full-vocabulary logits for a whole micro-batch.

The decoder runs once over the micro-batch's rows (padded or packed, `learner.packing`) and
gives the final hidden states. Only the positions that predict a completion token are kept
([M, H]); the LM head, log_softmax(logits / temperature), the gathered log-prob of the next
token and, when asked, the log-probs at the teacher's top-k ids and the entropy are computed
`chunk` positions at a time: the backward pass recomputes a chunk's logits instead of keeping
them, so at most one chunk's [chunk, V] float32 logits (and their gradient) exist at any time,
in either pass. This is the idea of torchtitan's chunked loss and Liger's fused linear
cross-entropy, with any loss (GRPO, distillation) on top of the per-token outputs. A plain
linear head runs `_FusedHead` (gradients by hand, one weight-gradient buffer); others, and
ZeRO-3's partitioned head, run each chunk under non-reentrant `torch.utils.checkpoint`. The results are scattered back to the
micro-batch's [S, T] per-token layout (0 at the positions not computed).

DeepSpeed: the whole computation runs inside the engine's forward (the wrapped model's
`forward` is swapped for the duration of the call), so the engine's backward prologue
(ZeRO's gradient bookkeeping) fires on the log-prob outputs before any parameter gradient,
exactly as with the model's own forward; the LM head is called as a module, so ZeRO-3 gathers
its (possibly tied) weight through its hooks, in the forward and in the recomputation.

Attention for packed rows: transformers builds a block-diagonal causal mask from the
`position_ids` (correct, but attention then costs (sum of lengths)^2 instead of the sum of
squares). `use_segment_attention(model)` installs an attention function that runs each packed
sequence as its own causal block (same sdpa kernel), used when the model has it. A segment
whose prompt is shared by several completions (`learner.packing`, shared prompts) runs as one
block under a mask: the prompt causal, each completion seeing the prompt and itself. Only
the segment attention can run such rows; transformers' own mask cannot express them.
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
_MASKS_KWARG = "nebula_segment_masks"


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
    """sdpa, but a packed row (`nebula_seq_lens` given) runs one causal block per sequence, or
    per shared-prompt segment under its mask (`nebula_segment_masks`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seq_lens = kwargs.pop(_SEQ_LENS_KWARG, None)
    masks = kwargs.pop(_MASKS_KWARG, None) or [None] * len(seq_lens or ())
    if seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    outs, start = [], 0
    for n, mask in zip(seq_lens, masks):
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:start + n], key[:, :, start:start + n],
            value[:, :, start:start + n], mask, dropout=dropout, scaling=scaling,
            is_causal=mask is None, **kwargs)
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
            with torch.no_grad():  # a metric
                entropy = _entropy(logits.detach(), lse.detach())
        return token, top, entropy
    return run


def _entropy(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row given its logsumexp: H = lse - sum_v p_v * z_v (a
    multiply and a sum: einsum's batched dot product took about twice as long on CPU)."""
    p = (z - lse.unsqueeze(-1)).exp_()
    return lse - p.mul_(z).sum(-1)


def _lse_and_entropy(z: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    """logsumexp of each row of z, and (into `entropy`, when given) the entropy of softmax(z),
    from ONE exp pass over the [rows, V] logits: e = exp(z - max), lse = max + log sum e,
    H = lse - sum e z / sum e. Each pass over a chunk's logits is a memory pass (~200 MB at
    1,024 rows of a 49k vocabulary); torch.logsumexp alone takes several, and the entropy
    another exp. Without `entropy` z is overwritten."""
    m = z.amax(dim=-1, keepdim=True)
    if entropy is None:
        s = z.sub_(m).exp_().sum(-1)
        return s.log_().add_(m.squeeze(-1))
    e = torch.sub(z, m).exp_()
    s = e.sum(-1)
    ez = e.mul_(z).sum(-1)
    del e
    lse = s.log().add_(m.squeeze(-1))
    torch.sub(lse, ez.div_(s), out=entropy)
    return lse


class _FusedHead(torch.autograd.Function):
    """The chunked head of a bias-free linear LM head with its gradients written by hand, so
    the backward pass holds ONE weight-gradient buffer: each chunk's recomputed logits give
    its grad_hidden rows and are added into that buffer in place (addmm_). Under autograd
    (the checkpointed path) every chunk's weight gradient is a fresh [V, H] tensor summed
    into the previous ones, two vocabulary-sized tensors at once; at a 151k vocabulary that
    is ~350 MB more peak memory (bench/memory.py). The embedding's gradient of a tied head
    is then added to this buffer by autograd, as before.

    d log p(y) / d z = onehot(y) - softmax(z) for z = logits / temperature, so per chunk
    grad_z = scatter(g_token at y) + scatter(g_top at top ids) - softmax(z) * (g_token +
    sum g_top), and grad_logits = grad_z / temperature. Entropy carries no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                top_ids: torch.Tensor | None, temperature: float, chunk: int,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M = hidden.shape[0]
        k = 0 if top_ids is None else top_ids.shape[-1]
        # Under autocast (`learner.autocast`) the head's matmuls run in its dtype, in the
        # backward pass too (which autocast does not reach): as autograd would run them.
        dev = hidden.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        w = weight if cdt is None else weight.to(cdt)
        token = hidden.new_empty(M, dtype=torch.float32)
        top = hidden.new_empty(M, k, dtype=torch.float32)
        entropy = hidden.new_empty(M if with_entropy else 0, dtype=torch.float32)
        lse = hidden.new_empty(M, dtype=torch.float32)
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            h = hidden[s:e] if cdt is None else hidden[s:e].to(cdt)
            z = (h @ w.t()).float()
            if temperature != 1.0:
                z.div_(temperature)
            token[s:e] = z.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
            if k:
                top[s:e] = z.gather(-1, top_ids[s:e])  # type: ignore[index]
            lse[s:e] = _lse_and_entropy(z, entropy[s:e] if with_entropy else None)
            token[s:e] -= lse[s:e]
            if k:
                top[s:e] -= lse[s:e].unsqueeze(-1)
        ctx.save_for_backward(hidden, weight, targets, top_ids, lse)
        ctx.temperature, ctx.chunk, ctx.compute_dtype = temperature, chunk, cdt
        ctx.weight_cast = None if cdt is None else w  # the backward pass reuses the cast
        ctx.mark_non_differentiable(entropy)
        return token, top, entropy

    @staticmethod
    def backward(ctx: Any, g_token: torch.Tensor | None, g_top: torch.Tensor | None,
                 _g_entropy: Any) -> tuple[Any, ...]:
        hidden, weight, targets, top_ids, lse = ctx.saved_tensors
        T, chunk, M, cdt = ctx.temperature, ctx.chunk, hidden.shape[0], ctx.compute_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight if cdt is None else ctx.weight_cast
        if cdt is not None and w is None:  # a second backward (retain_graph): cast again
            w = weight.to(cdt)
        # Released here, not with the graph: the layers' backward runs without it.
        ctx.weight_cast = None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        if g_top is not None and g_top.numel() == 0:
            g_top = None
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            h = hidden[s:e] if cdt is None else hidden[s:e].to(cdt)
            gz = (h @ w.t()).float()
            if T != 1.0:
                gz.div_(T)
            gz.sub_(lse[s:e].unsqueeze(-1)).exp_()  # softmax(z), in place
            total = hidden.new_zeros(e - s, dtype=torch.float32)
            if g_token is not None:
                total += g_token[s:e]
            if g_top is not None:
                total += g_top[s:e].sum(-1)
            gz.mul_(-total.unsqueeze(-1))
            if g_token is not None:
                gz.scatter_add_(-1, targets[s:e].unsqueeze(-1), g_token[s:e].unsqueeze(-1))
            if g_top is not None:
                gz.scatter_add_(-1, top_ids[s:e], g_top[s:e].float())
            if T != 1.0:
                gz.div_(T)
            g = gz.to(w.dtype)
            del gz
            if cdt is not None:  # each chunk's products in cdt, summed into the fp32 buffers
                if grad_h is not None:
                    grad_h[s:e] = g @ w
                if grad_w is not None:
                    grad_w += g.t() @ h
                continue
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[s:e])
            if grad_w is not None:
                grad_w.addmm_(g.t(), hidden[s:e])
        return grad_h, grad_w, None, None, None, None, None


def _fusable(head: torch.nn.Module) -> bool:
    """A bias-free linear head whose weight is all here. ZeRO-3 partitions parameters (its
    `ds_id` ones): there the head is called as a module, under checkpointing, so ZeRO's hooks
    gather the weight."""
    return isinstance(head, torch.nn.Linear) and head.bias is None \
        and not hasattr(head.weight, "ds_id")


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  top_ids: torch.Tensor | None = None, temperature: float = 1.0,
                  chunk: int = 1024, with_entropy: bool = False, fused: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden [M, H] final hidden states -> ([M] log-prob of `targets`, [M, k] log-probs at
    `top_ids`, [M] entropy), `chunk` rows at a time. `fused` (default: where the head allows,
    `_fusable`) runs _FusedHead; else each chunk is checkpointed when autograd records, so its
    logits are recomputed in the backward pass instead of kept."""
    chunk = max(int(chunk), 1)
    if fused if fused is not None else _fusable(head):
        token, top_all, ent = _FusedHead.apply(hidden, head.weight, targets, top_ids,
                                               float(temperature), chunk, with_entropy)
        return token, (top_all if top_ids is not None else None), \
            (ent if with_entropy else None)
    run = _chunk_fn(head, float(temperature), with_entropy)
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


def branch_mask(branches: tuple[int, ...], device: Any = None) -> torch.Tensor:
    """[1, 1, n, n] bool attention mask of one shared-prompt segment (prompt length, completion
    lengths...): position q sees k <= q of the prompt or of q's own completion."""
    part = torch.repeat_interleave(torch.arange(len(branches), device=device),
                                   torch.tensor(branches, device=device))
    n = part.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    return (causal & ((part[None, :] == 0) | (part[None, :] == part[:, None])))[None, None]


def _scored_forward(hf: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                    seq_lens: list[int] | None, branches: list[tuple[int, ...]] | None,
                    src: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None,
                    temperature: float, chunk: int, with_entropy: bool
                    ) -> dict[str, torch.Tensor]:
    """Decoder + chunked head at the `src` positions; a dict of tensors (what DeepSpeed's
    output hooks walk)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    segments = hf.config._attn_implementation == SEGMENT_ATTENTION
    if branches is not None and not segments:
        raise ValueError("shared-prompt rows need the segment attention (an sdpa model with "
                         "learner.logprobs.use_segment_attention); this model runs "
                         f"{hf.config._attn_implementation!r}")
    if seq_lens is not None:
        if segments:
            # A mask of ones keeps transformers from building the block-diagonal mask the
            # segment attention does not need; the sequence lengths delimit the blocks.
            kwargs["attention_mask"] = torch.ones_like(input_ids)
            kwargs[_SEQ_LENS_KWARG] = seq_lens
            if branches is not None:
                kwargs[_MASKS_KWARG] = [branch_mask(b, input_ids.device) if b else None
                                        for b in branches]
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
              "seq_lens": mb.seq_lens, "branches": mb.branches, "src": mb.src,
              "targets": mb.targets(),
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
