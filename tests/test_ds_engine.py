"""DSLearnerEngine on CPU with a tiny random Qwen2: SFT/GRPO steps, weight publishing,
checkpoint round trips and Hugging Face export (ZeRO-2, plus one ZeRO-3 test)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from nebula.losses import group_advantages  # noqa: E402
from nebula.config.job import LearnerConfig, ToyModelConfig  # noqa: E402
from nebula.v1.trajectory_pb2 import TrajectoryGroup  # noqa: E402

TINY = ToyModelConfig(hidden_size=64, layers=2, heads=2, intermediate_size=128,
                      max_position=64, seed=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen2 (hidden 64, 2 layers, ~100-token char vocab) with its tokenizer."""
    from nebula.toy_model import build_toy_model

    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_toy_model(path, TINY)
    return str(path)


def _cfg(**kw: Any) -> LearnerConfig:
    base = {"zero_stage": 2, "device": "cpu", "lr": 1e-2, "micro_batch": 4, "grad_clip": 1.0}
    base.update(kw)
    return LearnerConfig(**base)


def _engine(model_dir: str, sgd: bool = False, **kw: Any) -> Any:
    """Engine with torch AdamW (default) or plain SGD (lr 1), whose update is the clipped
    gradient: comparisons of two ways to compute a step use SGD, since Adam's first step
    (lr * g / |g|) amplifies the rounding noise of near-zero gradients."""
    from learner.ds_engine import DSLearnerEngine

    opt = (lambda params: torch.optim.SGD(params, lr=1.0)) if sgd else None
    tiles = kw.pop("mlp_tile_tokens", None)
    recompute = kw.pop("recompute_old_logprobs", False)
    return DSLearnerEngine(model_dir, _cfg(**kw), optimizer=opt, mlp_tile_tokens=tiles,
                           recompute_old_logprobs=recompute)


def _groups(n_groups: int = 2, n: int = 3, seed: int = 0, version: int = 0
            ) -> list[TrajectoryGroup]:
    """Groups with random prompts/completions, stale behaviour log-probs and GRPO advantages."""
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        group = TrajectoryGroup(group_id=f"g{g}",
                                prompt_ids=[rng.randrange(3, 90) for _ in range(rng.randint(2, 5))])
        rewards = [float(rng.random() < 0.5) for _ in range(n - 1)] + [float(g % 2)]
        for r, a in zip(rewards, group_advantages(rewards)):
            c = rng.randint(2, 6)
            group.samples.add(
                completion_ids=[rng.randrange(3, 90) for _ in range(c)],
                behaviour_logprobs=[-rng.uniform(3.0, 6.0) for _ in range(c)],
                policy_versions=[version] * c,
                loss_mask=[1] * (c - 1) + [rng.randint(0, 1)],
                reward=r, advantage=a if any(rewards) else 0.5)
        groups.append(group)
    return groups


def _weights(engine: Any) -> dict[str, Any]:
    return engine.full_state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


SFT_PAIRS = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15]), ([20], [21, 22, 23]),
             ([30, 31, 32, 33], [34, 35])]


def test_sft_steps_reduce_loss(model_dir: str) -> None:
    eng = _engine(model_dir, micro_batch=3)
    try:
        losses = [eng.sft_step(SFT_PAIRS)["loss"] for _ in range(6)]
        assert losses[-1] < 0.7 * losses[0], losses
        assert eng.version == 6
        assert eng.tokenizer("ab")["input_ids"] == [eng.tokenizer.convert_tokens_to_ids(c)
                                                    for c in "ab"]
    finally:
        eng.close()


def test_grpo_step_changes_weights_and_reports(model_dir: str) -> None:
    eng = _engine(model_dir)
    try:
        before = _weights(eng)
        m = eng.grpo_step(_groups())
        after = _weights(eng)
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert eng.version == 1 and m["version"] == 1 and m["step_applied"] == 1
        for key in ("loss", "grad_norm", "clip_frac", "kl", "ratio_mean", "is_weight_mean",
                    "is_truncated_frac", "tokens", "step_time_s", "staleness_mean"):
            assert key in m, key
        assert m["grad_norm"] > 0 and m["tokens"] > 0
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old == current at the first pass
        assert m["is_truncated_frac"] > 0  # behaviour log-probs far below the learner's
        lps = eng.logprobs(_groups())
        assert [len(x) for x in lps] == [len(s.completion_ids) for g in _groups()
                                         for s in g.samples]
    finally:
        eng.close()


def test_micro_batching_matches_full_batch(model_dir: str) -> None:
    """Accumulating over 1-sequence micro-batches gives the full-batch step."""
    results = []
    for mb in (1, 64):
        eng = _engine(model_dir, sgd=True, micro_batch=mb, loss_norm="sequence")
        try:
            m = eng.grpo_step(_groups())
            results.append((m, _weights(eng)))
        finally:
            eng.close()
    (m1, w1), (m2, w2) = results
    assert m1["micro_batches"] == 6 and m2["micro_batches"] == 1
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_state_dict_blob_round_trip(model_dir: str) -> None:
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    eng = _engine(model_dir)
    try:
        eng.sft_step(SFT_PAIRS)
        blob = eng.state_dict_blob()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.no_grad():
            eng.module.eval()
            expected = eng.module(input_ids=ids).logits
    finally:
        eng.close()
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        untrained = fresh(input_ids=ids).logits
    missing, unexpected = fresh.load_state_dict(load(blob), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    fresh.eval()
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(untrained, expected)


def test_checkpoint_round_trip_and_identical_next_step(model_dir: str, tmp_path: Path) -> None:
    a = _engine(model_dir, micro_batch=2)
    b = None
    try:
        a.sft_step(SFT_PAIRS)
        a.grpo_step(_groups(seed=1))
        a.save_checkpoint(tmp_path / "ckpt", {"stream_pos": "1700-3", "epoch": 2})
        b = _engine(model_dir, micro_batch=2)
        assert b.load_checkpoint(tmp_path / "ckpt") == {"stream_pos": "1700-3", "epoch": 2}
        assert b.version == a.version == 2
        _assert_same(_weights(a), _weights(b))
        groups = _groups(seed=2, version=2)
        ma, mb = a.grpo_step(groups), b.grpo_step(groups)
        assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
        _assert_same(_weights(a), _weights(b))  # optimizer state restored too
    finally:
        a.close()
        if b is not None:
            b.close()


def test_export_hf_loads_in_transformers(model_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eng = _engine(model_dir)
    try:
        eng.sft_step(SFT_PAIRS)
        out = eng.export_hf(tmp_path / "hf")
        ids = torch.tensor([[5, 6, 7, 8]])
        eng.module.eval()
        with torch.no_grad():
            expected = eng.module(input_ids=ids).logits
    finally:
        eng.close()
    assert (Path(out) / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("ab")["input_ids"] == AutoTokenizer.from_pretrained(model_dir)("ab")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_kl_to_reference(model_dir: str) -> None:
    eng = _engine(model_dir, kl={"coef": 0.1, "estimator": "k3"})
    try:
        assert eng.ref_model is not None
        first = eng.grpo_step(_groups())
        assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before step 1
        second = eng.grpo_step(_groups())
        assert second["kl"] > 0
    finally:
        eng.close()


def test_zero3_step_blob_and_checkpoint(model_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import load

    z2 = _engine(model_dir, sgd=True, zero_stage=2)
    try:
        z2.grpo_step(_groups())
        w2 = _weights(z2)
    finally:
        z2.close()
    z3 = _engine(model_dir, sgd=True, zero_stage=3)
    try:
        z3.grpo_step(_groups())
        w3 = load(z3.state_dict_blob())  # gathered from the partitions
    finally:
        z3.close()
    assert w3.keys() == w2.keys()
    for k in w2:  # the same step as under ZeRO-2
        torch.testing.assert_close(w3[k], w2[k], rtol=1e-5, atol=1e-6)

    a = _engine(model_dir, zero_stage=3)
    b = None
    try:
        a.grpo_step(_groups())
        a.save_checkpoint(tmp_path / "z3", {"k": 1})
        b = _engine(model_dir, zero_stage=3)
        assert b.load_checkpoint(tmp_path / "z3") == {"k": 1}
        _assert_same(_weights(a), _weights(b))
        groups = _groups(seed=3, version=1)
        assert a.grpo_step(groups)["loss"] == b.grpo_step(groups)["loss"]
        _assert_same(_weights(a), _weights(b))
    finally:
        a.close()
        if b is not None:
            b.close()


# ---------------------------------------------------------------- micro-batching, precision

_STEPS: dict[tuple, tuple[dict, dict]] = {}


def _sgd_step(model_dir: str, **kw: Any) -> tuple[dict, dict]:
    """Metrics and weights after one SGD step on `_groups(3, 3)` (cached per config)."""
    key = tuple(sorted((k, str(v)) for k, v in kw.items()))
    if key not in _STEPS:
        eng = _engine(model_dir, sgd=True, **kw)
        try:
            m = eng.grpo_step(_groups(n_groups=3, n=3, seed=7))
            _STEPS[key] = (m, _weights(eng))
        finally:
            eng.close()
    return _STEPS[key]


def _assert_same_step(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, wa), (mb, wb) = a, b
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-7)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_token_budget_and_packing_give_the_same_step(model_dir: str, norm: str) -> None:
    """Fixed-count micro-batches, token-budget padded ones, packed rows and packed rows with
    shared prompts: same loss, grad norm and updated weights (float32, tolerance 1e-4
    relative: sums in another order)."""
    fixed = _sgd_step(model_dir, micro_batch=2, loss_norm=norm)
    padded = _sgd_step(model_dir, micro_batch=2, loss_norm=norm, max_tokens_per_micro_batch=20,
                       packing=False, logits_chunk=5)
    packed = _sgd_step(model_dir, micro_batch=2, loss_norm=norm, max_tokens_per_micro_batch=20,
                       packing=True, share_prompts=False, logits_chunk=5)
    shared = _sgd_step(model_dir, micro_batch=2, loss_norm=norm, max_tokens_per_micro_batch=20,
                       packing=True, logits_chunk=5)  # share_prompts: on by default
    assert fixed[0]["micro_batches"] == 5 and fixed[0]["pad_frac"] > 0
    assert packed[0]["pad_frac"] == 0 and packed[0]["micro_batches"] < fixed[0]["micro_batches"]
    # 3 groups x 3 samples: each group's prompt runs once instead of three times
    assert shared[0]["pad_frac"] == 0
    assert shared[0]["forward_tokens"] < packed[0]["forward_tokens"]
    for other in (padded, packed, shared):
        _assert_same_step(other, fixed)
        assert other[0]["entropy"] == pytest.approx(fixed[0]["entropy"], rel=1e-5)


def test_old_logprobs_from_the_training_forward_give_the_same_step(model_dir: str) -> None:
    """The pre-step log-probs taken from the training forward (the default) or from a
    separate no-grad pass: same loss, grad norm, weights, entropy and mismatch metrics."""
    kw: dict[str, Any] = dict(micro_batch=2, max_tokens_per_micro_batch=20, packing=True,
                              activation_checkpointing=True)
    own, recomputed = _sgd_step(model_dir, **kw), _sgd_step(model_dir, recompute_old_logprobs=True,
                                                           **kw)
    _assert_same_step(own, recomputed)
    assert own[0]["no_grad_fwd_time_s"] < recomputed[0]["no_grad_fwd_time_s"]
    for k in ("entropy", "logprob_diff_abs_mean", "mismatch_kl_k3", "clip_frac"):
        if k in recomputed[0]:
            assert own[0][k] == pytest.approx(recomputed[0][k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("tiles", [None, 5])
def test_activation_checkpointing_same_gradients(model_dir: str, tiles: int | None) -> None:
    """Per-layer recomputation, and MLPs in checkpointed tiles of 5 tokens inside it."""
    _assert_same_step(_sgd_step(model_dir, micro_batch=2, activation_checkpointing=True,
                                mlp_tile_tokens=tiles),
                      _sgd_step(model_dir, micro_batch=2, loss_norm="token"))


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_with_packing_checkpointing_and_chunks(model_dir: str, stage: int) -> None:
    """Chunked log-probs, packed rows and activation checkpointing under every ZeRO stage
    (ZeRO-3 partitions the tied embedding / LM head): the step of ZeRO-2 without them."""
    _assert_same_step(
        _sgd_step(model_dir, zero_stage=stage, micro_batch=2, max_tokens_per_micro_batch=20,
                  packing=True, activation_checkpointing=True, logits_chunk=3,
                  mlp_tile_tokens=7),
        _sgd_step(model_dir, micro_batch=2, loss_norm="token"))


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_keeps_fp32_master_weights_and_adam_states(model_dir: str, stage: int) -> None:
    from learner.ds_engine import DSLearnerEngine

    eng = DSLearnerEngine(model_dir, _cfg(zero_stage=stage, micro_batch=2,
                                          max_tokens_per_micro_batch=20),
                          dtype="bfloat16")
    try:
        assert all(p.dtype == torch.bfloat16 for p in eng.module.parameters())
        before = _weights(eng)
        m = eng.grpo_step(_groups(n_groups=3, n=3, seed=7))
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["step_applied"] == 1
        inner = eng.optimizer.optimizer  # the torch AdamW inside DeepSpeed's bf16 wrapper
        master = [p for g in inner.param_groups for p in g["params"]]
        assert master and all(p.dtype == torch.float32 for p in master)
        states = [t for s in inner.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0]
        assert states and all(t.dtype == torch.float32 for t in states)
        n_master = sum(p.numel() for p in master)
        assert n_master >= sum(p.numel() for p in eng.module.parameters())
        after = _weights(eng)
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        eng.close()


def test_grpo_step_reports_learner_engine_mismatch(model_dir: str) -> None:
    """Behaviour log-probs equal to the learner's own on fresh samples: no mismatch there;
    stale samples carry a known offset."""
    eng = _engine(model_dir, micro_batch=2, max_tokens_per_micro_batch=20)
    try:
        groups = _groups(n_groups=2, n=3, seed=5)
        own = iter(eng.logprobs(groups))
        for g, group in enumerate(groups):
            for s in group.samples:
                lps = next(own)
                stale = g == 1
                del s.behaviour_logprobs[:]
                s.behaviour_logprobs.extend([x - (0.5 if stale else 0.0) for x in lps])
                del s.policy_versions[:]
                s.policy_versions.extend([-1 if stale else 0] * len(lps))
        m = eng.grpo_step(groups)
        n_fresh = sum(len(s.completion_ids) for s in groups[0].samples)
        n_all = n_fresh + sum(len(s.completion_ids) for s in groups[1].samples)
        assert m["mismatch_tokens"] == n_all and m["mismatch_fresh_tokens"] == n_fresh
        assert m["logprob_diff_abs_mean_fresh"] < 1e-5 and m["mismatch_kl_k3_fresh"] < 1e-9
        stale_frac = (n_all - n_fresh) / n_all
        assert m["logprob_diff_abs_mean"] == pytest.approx(0.5 * stale_frac, rel=1e-4)
        assert m["mismatch_kl_k3"] == pytest.approx((math.exp(0.5) - 1.5) * stale_frac, rel=1e-4)
    finally:
        eng.close()


def test_topk_distillation_step_packed_matches_fixed(model_dir: str) -> None:
    """OPD with the teacher's top-k: the distillation term, normalised over the whole batch,
    is the same whether sequences are packed or padded."""
    rng = random.Random(11)
    groups = _groups(n_groups=2, n=3, seed=9)
    for g in groups:
        for s in g.samples:
            c = len(s.completion_ids)
            s.teacher_top_k = 2
            s.teacher_top_ids.extend(rng.randrange(3, 90) for _ in range(2 * c))
            s.teacher_top_logprobs.extend(-rng.uniform(0.1, 3.0) for _ in range(2 * c))
    results = []
    for kw in ({"micro_batch": 2}, {"max_tokens_per_micro_batch": 16, "packing": True}):
        eng = _engine(model_dir, sgd=True, logits_chunk=4, **kw)
        try:
            m = eng.grpo_step(groups)
            results.append((m, _weights(eng)))
        finally:
            eng.close()
    assert results[0][0]["distill_kl"] > 0
    assert results[1][0]["distill_kl"] == pytest.approx(results[0][0]["distill_kl"], rel=1e-5)
    _assert_same_step(results[1], results[0])


def test_autocast_step_follows_fp32_step(model_dir: str) -> None:
    """`learner.autocast: bfloat16` (with activation checkpointing, so the recompute runs under
    it too): the weights stay fp32, and one step's update (SGD, unclipped: the gradient) points
    where the fp32 step's does, through bf16 matmuls (not equal to it)."""
    groups = _groups(n_groups=3, n=4, seed=3)
    deltas = []
    for kw in ({}, {"autocast": "bfloat16", "activation_checkpointing": True}):
        eng = _engine(model_dir, sgd=True, zero_stage=0, grad_clip=1e9, **kw)
        try:
            before = _weights(eng)
            eng.grpo_step(groups)
            after = _weights(eng)
            assert all(v.dtype == torch.float32 for v in after.values())
            deltas.append(torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)]))
        finally:
            eng.close()
    fp32, cast = deltas
    assert not torch.equal(fp32, cast)
    assert torch.nn.functional.cosine_similarity(fp32, cast, dim=0) > 0.999
    assert float(cast.norm()) == pytest.approx(float(fp32.norm()), rel=0.05)
