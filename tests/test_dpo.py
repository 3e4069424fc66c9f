"""DPO (and IPO, SimPO): the loss and its gradient against the papers' formulas written out
independently here, micro-batching that keeps pairs together, the stage on a real DeepSpeed
engine (reference log-probs from the starting policy; loss log 2 at step 0; the gradient
equals a plain-torch computation of the same loss), and preference rows' errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from nebula.algo.base import Example, LossInput  # noqa: E402
from nebula.algo.dpo import DPO, DPOStage  # noqa: E402
from nebula.config.data import DatasetConfig  # noqa: E402
from nebula.config.job import LearnerConfig, ToyModelConfig  # noqa: E402

BETA = 0.3


def _stage(loss: str = "sigmoid", **kw: Any) -> DPOStage:
    return DPOStage(dataset=DatasetConfig(path="unused.jsonl"), beta=BETA, loss=loss, **kw)


def _inputs(pairs: int = 4, T: int = 6, seed: int = 0) -> tuple[Any, Any, list[float]]:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(2 * pairs, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    mask = (torch.rand(2 * pairs, T, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    ref = [-random.Random(seed + i).uniform(2, 8) for i in range(2 * pairs)]
    batch = SimpleNamespace(mask=mask, size=2 * pairs,
                            group_index=torch.arange(pairs).repeat_interleave(2),
                            ref_logprob_sums=torch.tensor(ref, dtype=torch.float64))
    return logp, batch, ref


def _loss_input(logp: Any, batch: Any, pairs: float) -> LossInput:
    return LossInput(batch=batch, logprobs=logp, old_logprobs=logp.detach(), ref_logprobs=None,
                     top_logprobs=None, entropy=None, num_tokens=float(batch.mask.sum()),
                     num_sequences=float(batch.size), num_top=0.0, num_examples=pairs,
                     learner=LearnerConfig())


def _reference_loss(logp: Any, mask: Any, ref: list[float], loss: str, gamma: float) -> Any:
    """The papers' per-pair formulas, pair by pair with scalars (independent of DPO.loss)."""
    total = 0
    P = logp.shape[0] // 2
    for k in range(P):
        c, r = 2 * k, 2 * k + 1
        s_c, s_r = (logp[c] * mask[c]).sum(), (logp[r] * mask[r]).sum()
        n_c, n_r = mask[c].sum(), mask[r].sum()
        if loss == "sigmoid":     # DPO eq. 7
            h = BETA * ((s_c - ref[c]) - (s_r - ref[r]))
            total = total + torch.log1p(torch.exp(-h))
        elif loss == "ipo":       # IPO eq. 17 on per-token means
            h = (s_c - ref[c]) / n_c - (s_r - ref[r]) / n_r
            total = total + (h - 1 / (2 * BETA)) ** 2
        else:                     # SimPO eq. 6
            h = BETA * s_c / n_c - BETA * s_r / n_r - gamma
            total = total + torch.log1p(torch.exp(-h))
    return total / P


@pytest.mark.parametrize("loss,rpo", [("sigmoid", 0.0), ("ipo", 0.0), ("simpo", 0.0),
                                      ("sigmoid", 0.7)])
def test_loss_and_gradient_match_the_formulas(loss: str, rpo: float) -> None:
    logp, batch, ref = _inputs()
    out, m = DPO(_stage(loss, simpo_gamma=0.4, rpo_alpha=rpo)).loss(
        _loss_input(logp, batch, 4.0))
    (grad,) = torch.autograd.grad(out, logp)
    x = logp.detach().clone().requires_grad_()
    expected = _reference_loss(x, batch.mask, ref, loss, 0.4)
    if rpo:  # RPO: + alpha * mean NLL per token of each chosen response, over pairs
        expected = expected + rpo * sum(-(x[c] * batch.mask[c]).sum() / batch.mask[c].sum()
                                        for c in range(0, 8, 2)) / 4
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert float(out.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["weight"] == 4.0


def test_sigmoid_gradient_is_the_closed_form() -> None:
    """dL/dlogp_t = -beta * sigmoid(-h) * m_t / P on the chosen row, + on the rejected one."""
    logp, batch, ref = _inputs(pairs=3)
    out, _ = DPO(_stage()).loss(_loss_input(logp, batch, 3.0))
    (grad,) = torch.autograd.grad(out, logp)
    s = (logp.detach() * batch.mask).sum(-1)
    for k in range(3):
        c, r = 2 * k, 2 * k + 1
        h = BETA * ((s[c] - ref[c]) - (s[r] - ref[r]))
        coef = BETA * torch.sigmoid(-h) / 3
        assert torch.allclose(grad[c], -coef * batch.mask[c], atol=1e-12)
        assert torch.allclose(grad[r], coef * batch.mask[r], atol=1e-12)


def test_micro_batches_add_up_and_split_pairs_are_refused() -> None:
    logp, batch, _ = _inputs(pairs=4)
    algo = DPO(_stage())
    whole, _ = algo.loss(_loss_input(logp, batch, 4.0))
    parts = 0
    for rows in (slice(0, 4), slice(4, 8)):
        sub = SimpleNamespace(mask=batch.mask[rows], size=4, group_index=batch.group_index[rows],
                              ref_logprob_sums=batch.ref_logprob_sums[rows])
        parts = parts + algo.loss(_loss_input(logp[rows], sub, 4.0))[0]
    assert float(parts) == pytest.approx(float(whole), abs=1e-12)
    odd = SimpleNamespace(mask=batch.mask[1:4], size=3, group_index=batch.group_index[1:4],
                          ref_logprob_sums=batch.ref_logprob_sums[1:4])
    with pytest.raises(ValueError, match="whole"):
        algo.loss(_loss_input(logp[1:4], odd, 4.0))


def test_whole_group_micro_batches_never_split_a_pair() -> None:
    from learner.batch import collate_examples
    from learner.packing import plan_micro_batches

    rng = random.Random(0)
    exs = [Example([([1] * rng.randint(1, 4), [2] * rng.randint(1, 9)) for _ in range(2)])
           for _ in range(7)]
    batch = collate_examples(exs, pad_id=0)
    for budget, packing in ((None, False), (12, True), (12, False), (1, True)):
        mbs = plan_micro_batches(batch, 3, budget, packing, whole_groups=True)
        rows = [r for mb in mbs for r in mb.index.tolist()]
        assert rows == list(range(14))  # every row once, in order
        for mb in mbs:
            gi = mb.batch.group_index
            assert mb.batch.size % 2 == 0 and torch.equal(gi[0::2], gi[1::2])


# -- the stage on a real engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from nebula.toy_model import build_toy_model

    path = tmp_path_factory.mktemp("tiny_dpo")
    build_toy_model(path, ToyModelConfig(hidden_size=64, layers=2, heads=2,
                                         intermediate_size=128, max_position=64, seed=0))
    return str(path)


def _examples(seed: int = 0, n: int = 6) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 60) for _ in range(rng.randint(2, 5))]
        out.append(Example([(prompt, [rng.randrange(3, 60) for _ in range(rng.randint(1, 5))])
                            for _ in range(2)]))
    return out


def test_engine_step_equals_plain_torch(model_dir: str) -> None:
    """Reference log-probs from the starting policy make step 0's loss exactly log 2, and the
    engine's gradient (micro-batches of 2 pairs, packed) equals one plain-torch backward of the
    paper's loss over a full-vocabulary forward of the same model."""
    from transformers import AutoModelForCausalLM

    from learner.batch import collate_examples
    from learner.ds_engine import DSLearnerEngine

    cfg = LearnerConfig(zero_stage=0, device="cpu", lr=1e-2, micro_batch=4,
                        max_tokens_per_micro_batch=24, grad_clip=1e9)
    exs = _examples()
    algo = DPO(_stage())
    with DSLearnerEngine(model_dir, cfg) as eng:
        algo.prepare(exs, eng.sequence_logprobs)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        seqs = [s for e in exs for s in e.sequences]
        logp = []
        for p, c in seqs:
            ids = torch.tensor([p + c])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            logp.append(lp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum())
        refs = [r for e in exs for r in e.ref_logprob_sums]
        assert [float(x) for x in logp] == pytest.approx(refs, abs=1e-4)
        h = [BETA * ((logp[2 * k] - refs[2 * k]) - (logp[2 * k + 1] - refs[2 * k + 1]))
             for k in range(len(exs))]
        loss = sum(torch.log1p(torch.exp(-x)) for x in h) / len(exs)
        loss.backward()
        norm = float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in model.parameters() if p.grad is not None])))
        m = eng.step(collate_examples(exs, eng.pad_id), algo)
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert float(loss) == pytest.approx(math.log(2), abs=1e-4)
        assert m["micro_batches"] >= 2 and m["examples"] == len(exs)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-4)
        for _ in range(15):
            m = eng.step(collate_examples(exs, eng.pad_id), algo)
        assert m["loss"] < 0.3 and m["reward_accuracy"] == 1.0 and m["reward_margin"] > 0


# -- preference rows -----------------------------------------------------------------------------


def test_preference_rows_plain_chat_and_errors(tmp_path: Path) -> None:
    """Plain responses are their tokens + EOS (as SFT targets); chat responses are the
    template's rendering of the whole conversation after the prompt's ids (SmolLM2's ChatML),
    so prompt + chosen ids are exactly the template's ids of the conversation."""
    from transformers import AutoTokenizer

    from nebula import assets
    from nebula.prompts import DatasetError, format_prompt, load_preference_rows

    gguf = assets.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path = tmp_path / "pref.jsonl"
    ds = DatasetConfig(path=str(path))
    user = [{"role": "user", "content": "Reverse ab"}]
    path.write_text(json.dumps({"prompt": "Reverse ab", "chosen": "ba", "rejected": "ab"}) + "\n"
                    + json.dumps({"prompt": user,
                                  "chosen": [{"role": "assistant", "content": "ba"}],
                                  "rejected": [{"role": "assistant", "content": "ab"}]}) + "\n")
    plain, chat = load_preference_rows(ds, tok, "chosen", "rejected")
    assert plain.prompt_ids == format_prompt("Reverse ab", tok, ds, "x")[1]
    assert plain.chosen_ids == tok("ba", add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]
    whole = tok.apply_chat_template(user + [{"role": "assistant", "content": "ab"}],
                                    tokenize=False)
    assert chat.prompt_ids + chat.rejected_ids == tok(whole, add_special_tokens=False)[
        "input_ids"]
    assert tok.decode(chat.chosen_ids).startswith("ba<|im_end|>")
    path.write_text(json.dumps({"prompt": "x"}) + "\n" +
                    json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DatasetError, match=r"pref.jsonl row 0: missing field 'chosen'"):
        load_preference_rows(ds, tok, "chosen", "rejected")
    path.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": 3}) + "\n")
    with pytest.raises(DatasetError, match=r"row 0: field 'rejected' must be"):
        load_preference_rows(ds, tok, "chosen", "rejected")
    path.write_text(json.dumps({"prompt": "x", "chosen": "a " * 50, "rejected": "b"}) + "\n")
    with pytest.raises(DatasetError, match=r"row 0: prompt \+ response has \d+ tokens"):
        load_preference_rows(ds, tok, "chosen", "rejected", max_tokens=40)
