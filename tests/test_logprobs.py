"""Chunked log-probs (learner/logprobs.py) against the naive full-logits computation: values,
top-k log-probs, entropy and parameter gradients, with temperature != 1, at chunk sizes that do
and do not divide the number of scored positions; padded vs packed rows (transformers'
block-diagonal mask for sdpa and eager, and the segment attention).

Tolerances: float32 throughout; the chunked and the naive paths sum the same terms in a
different order (per-chunk matmuls, sdpa kernels per block), so values agree to ~1e-6 and we
assert atol 1e-5 (values) / rtol 1e-4 + atol 1e-6 (gradients)."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from learner.batch import Batch, collate  # noqa: E402
from learner.logprobs import (SEGMENT_ATTENTION, micro_batch_logprobs,  # noqa: E402
                              use_segment_attention)
from learner.packing import (packed_micro_batch, padded_micro_batch,  # noqa: E402
                             shared_micro_batch)
from nebula.v1.trajectory_pb2 import TrajectoryGroup  # noqa: E402

VOCAB = 61

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def tiny_llama(attn: str = "sdpa", tied: bool = True, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128, tie_word_embeddings=tied,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def groups(seed: int = 0, top_k: int = 0, n_groups: int = 3, n: int = 2) -> list[TrajectoryGroup]:
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        group = TrajectoryGroup(group_id=f"g{g}",
                                prompt_ids=[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))])
        for _ in range(n):
            c = rng.randint(1, 12)
            ids = [rng.randrange(3, VOCAB) for _ in range(c * top_k)]
            group.samples.add(completion_ids=[rng.randrange(3, VOCAB) for _ in range(c)],
                              behaviour_logprobs=[-rng.uniform(1, 4) for _ in range(c)],
                              advantage=rng.uniform(-1, 1), teacher_top_k=top_k,
                              teacher_top_ids=ids,
                              teacher_top_logprobs=[-rng.uniform(0, 5) for _ in ids])
        out.append(group)
    return out


def naive(model: Any, batch: Batch, temperature: float) -> tuple[Any, Any, Any]:
    """The full [B, T, V] float32 logits, as the learner computed them before chunking."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    token = logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    top = logp.gather(-1, batch.teacher_top_ids)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, top, entropy


def _grads(model: Any) -> dict[str, Any]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_equals_naive_values_and_grads(chunk: int, tied: bool) -> None:
    temp = 0.7
    model = tiny_llama(tied=tied)
    batch = collate(groups(top_k=3), pad_id=0)
    sel = batch.completion_mask > 0
    n_scored = int(sel.sum())
    assert n_scored % 7 != 0  # chunk 7 does not divide the scored positions

    w = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(1)) * sel
    w_top = torch.randn(batch.teacher_top_ids.shape,
                        generator=torch.Generator().manual_seed(2)) * sel.unsqueeze(-1)
    ref_tok, ref_top, ref_ent = naive(model, batch, temp)
    ((ref_tok * w).sum() + (ref_top * w_top).sum()).backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    out = micro_batch_logprobs(model, padded_micro_batch(batch), temp, chunk=chunk,
                               with_top=True, with_entropy=True)
    assert out.token.shape == batch.mask.shape and out.top.shape == batch.teacher_top_ids.shape
    torch.testing.assert_close(out.token[sel], ref_tok[sel].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.top[sel], ref_top[sel].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy[sel], ref_ent[sel].detach(), rtol=0, atol=1e-5)
    assert not out.token[~sel].any()  # only completion positions are computed
    assert out.entropy.grad_fn is None
    ((out.token * w).sum() + (out.top * w_top).sum()).backward()
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager", SEGMENT_ATTENTION])
def test_packed_row_equals_padded_rows(attn: str) -> None:
    """One packed row (position ids restarting at 0, no padding) gives each sequence's
    log-probs and gradients as if it ran alone: transformers' block-diagonal mask (sdpa,
    eager) or the segment attention."""
    model = tiny_llama("sdpa" if attn == SEGMENT_ATTENTION else attn)
    if attn == SEGMENT_ATTENTION:
        use_segment_attention(model)
    assert model.config._attn_implementation == attn
    batch = collate(groups(seed=3), pad_id=0)
    sel = batch.completion_mask > 0
    w = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(4)) * sel
    results = []
    for make in (padded_micro_batch, packed_micro_batch):
        mb = make(batch)
        out = micro_batch_logprobs(model, mb, temperature=1.3, chunk=5)
        (out.token * w).sum().backward()
        results.append((out.token.detach(), _grads(model), mb))
        model.zero_grad(set_to_none=True)
    (tok_a, g_a, _), (tok_b, g_b, packed) = results
    assert packed.input_ids.shape == (1, int(batch.attention_mask.sum()))
    assert packed.position_ids[0, :int(batch.lengths[0]) + 1].tolist()[-1] == 0  # restarts
    torch.testing.assert_close(tok_b, tok_a, rtol=0, atol=1e-5)
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_shared_prompts_equal_padded_rows(tied: bool) -> None:
    """Groups of 3 samples packed with each prompt once (completions attending to the prompt
    and to themselves, position ids continuing from the prompt): the padded rows' token and
    top-k log-probs, entropy and parameter gradients (float32, atol 1e-5 / rtol 1e-4), with
    a temperature, a chunk that does not divide the scored positions, tied and untied heads
    and GQA (4 query heads, 2 KV heads)."""
    model = tiny_llama(tied=tied)
    use_segment_attention(model)
    batch = collate(groups(seed=6, top_k=3, n_groups=4, n=3), pad_id=0)
    sel = batch.completion_mask > 0
    w = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(7)) * sel
    w_top = torch.randn(batch.teacher_top_ids.shape,
                        generator=torch.Generator().manual_seed(8)) * sel.unsqueeze(-1)
    results = []
    for make in (padded_micro_batch, shared_micro_batch):
        mb = make(batch)
        out = micro_batch_logprobs(model, mb, temperature=0.8, chunk=7, with_top=True,
                                   with_entropy=True)
        ((out.token * w).sum() + (out.top * w_top).sum()).backward()
        results.append((out, _grads(model), mb))
        model.zero_grad(set_to_none=True)
    (a, g_a, _), (b, g_b, shared) = results
    assert shared.branches is not None and all(len(x) == 4 for x in shared.branches)
    assert shared.model_tokens < int(batch.lengths.sum())
    for x, y in ((b.token, a.token), (b.top, a.top), (b.entropy, a.entropy)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-5)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], rtol=1e-4, atol=1e-6)
    # transformers' own masks cannot express a shared prompt: refused, not silently wrong
    plain = tiny_llama()
    with pytest.raises(ValueError, match="segment attention"):
        micro_batch_logprobs(plain, shared)


def test_segment_attention_keeps_plain_forward_and_export_config(tmp_path: Any) -> None:
    """The segment attention is plain sdpa for ordinary inputs, and a saved checkpoint
    does not name it (vLLM / transformers load it with their default)."""
    import json

    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        use_segment_attention(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert SEGMENT_ATTENTION not in json.dumps(cfg)


def test_no_grad_pass_and_empty_top() -> None:
    model = tiny_llama().eval()
    batch = collate(groups(seed=5), pad_id=0)
    with torch.no_grad():
        out = micro_batch_logprobs(model, packed_micro_batch(batch), with_top=True)
        ref, _, _ = naive(model, batch, 1.0)
    sel = batch.completion_mask > 0
    torch.testing.assert_close(out.token[sel], ref[sel], rtol=0, atol=1e-5)
    assert out.top.shape == batch.teacher_top_ids.shape == (batch.size, batch.mask.shape[1], 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_head_equals_checkpointed_head(dtype: str) -> None:
    """_FusedHead (gradients by hand, one weight-gradient buffer) against the checkpointed
    autograd path on the same head: values, entropy, and the gradients of the hidden states
    and of the weight, with a temperature, top-k ids, a chunk that does not divide the rows,
    and a loss on the token log-probs only (no top gradient). float32: equal to 1e-5.
    bfloat16: both paths sum the chunks' weight gradients in bf16, in a different order, so
    each is held to the float32 result instead: the fused one no further from it than 1.5x
    the checkpointed one's largest error plus one bf16 step at the largest value."""
    from learner.logprobs import head_logprobs

    g = torch.Generator().manual_seed(0)
    M, H, V, k = 23, 16, 97, 4
    head = torch.nn.Linear(H, V, bias=False)
    hidden0 = torch.randn(M, H, generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    top_ids = torch.randint(0, V, (M, k), generator=g)
    w_tok, w_top = torch.randn(M, generator=g), torch.randn(M, k, generator=g)

    def run(dt: Any, fused: bool, with_top_loss: bool) -> list[Any]:
        h = head.to(dt)
        h.zero_grad(set_to_none=True)
        hidden = hidden0.to(dt).detach().clone().requires_grad_(True)
        tok, top, ent = head_logprobs(h, hidden, targets, top_ids, temperature=0.7,
                                      chunk=5, with_entropy=True, fused=fused)
        loss = (tok * w_tok).sum() + ((top * w_top).sum() if with_top_loss else 0)
        loss.backward()
        assert ent is not None and ent.grad_fn is None
        out = [tok.detach(), top.detach(), ent, hidden.grad, h.weight.grad]
        return [t.float() for t in out]

    dt = getattr(torch, dtype)
    for with_top_loss in (True, False):
        got, want = run(dt, True, with_top_loss), run(dt, False, with_top_loss)
        if dt == torch.float32:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            continue
        truth = run(torch.float32, False, with_top_loss)
        for a, b, t in zip(got, want, truth):
            assert (a - t).abs().max() <= 1.5 * (b - t).abs().max() + 2**-7 * t.abs().max()
    with torch.no_grad():  # the no-grad pass (old log-probs, evals) takes the same path
        tok, top, ent = head_logprobs(head.float(), hidden0, targets, None, chunk=5, fused=True)
    assert top is None and ent is None and tok.shape == (M,) and tok.grad_fn is None


def test_fused_head_under_autocast() -> None:
    """`learner.autocast: bfloat16`: fp32 head and hidden states under torch.autocast. The
    fused head runs its matmuls in bf16 in the forward and (where autocast does not reach)
    the backward pass, as autograd runs the checkpointed path's, and returns fp32 log-probs
    and fp32 gradients; both paths are held to the float32 result as in the bf16 case above."""
    from learner.logprobs import head_logprobs

    g = torch.Generator().manual_seed(1)
    M, H, V = 23, 16, 97
    head = torch.nn.Linear(H, V, bias=False)
    hidden0 = torch.randn(M, H, generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    w_tok = torch.randn(M, generator=g)

    def run(fused: bool, cast: bool) -> list[Any]:
        head.zero_grad(set_to_none=True)
        hidden = hidden0.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            tok, _, _ = head_logprobs(head, hidden, targets, None, temperature=0.7, chunk=5,
                                      fused=fused)
        (tok * w_tok).sum().backward()
        assert tok.dtype == hidden.grad.dtype == head.weight.grad.dtype == torch.float32
        return [tok.detach(), hidden.grad, head.weight.grad]

    truth, got, want = run(False, False), run(True, True), run(False, True)
    for a, b, t in zip(got, want, truth):
        assert (a - t).abs().max() > 0  # bf16 was used, not fp32
        assert (a - t).abs().max() <= 1.5 * (b - t).abs().max() + 2**-7 * t.abs().max()
