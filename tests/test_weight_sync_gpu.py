"""NCCL weight sync (GPU only; skipped on CPU): the learner broadcasts its weights into a
CUDA vLLM engine owned by a rollout worker actor (one NCCL group, learner rank 0), the
rollout worker verifies the probe tensors before taking the version, and the engine's greedy
output changes to the learner's."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_nccl_push_changes_vllm_greedy_output(tmp_path: Path) -> None:
    import ray
    import torch

    from nebula.toy_model import build_toy_model
    from learner.worker import LearnerWorker
    from nebula.config import load_model
    from nebula.config.job import JobConfig, ToyModelConfig
    from nebula.tasks.synthetic import make_split
    from rollout.weight_store import WeightStore
    from rollout.worker import RolloutWorker
    from services.embedded import embedded_stack

    toy = dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, max_position=64)
    build_toy_model(tmp_path / "model", ToyModelConfig(**toy))
    train, held = make_split("addition", tmp_path / "data", eval_size=50)
    cfg = load_model(JobConfig, {
        "output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
        "datasets": {"train": [{"path": str(train), "verifier": "exact"}]},
        "stages": [{"type": "sft", "steps": 30, "batch_size": 32, "lr": 0.003}],
        # learner and engine share the GPU: vLLM must not take 90% of it
        "rollout": {"engine": "vllm", "num_gpus": 0.4, "max_tokens": 4,
                    "gpu_memory_utilization": 0.3, "enforce_eager": True},
        "learner": {"device": "cuda", "weight_sync": "nccl"}})
    assert cfg.weight_sync_mode() == "nccl"
    job = cfg.model_dump(by_alias=True)
    with embedded_stack(cfg, tmp_path / "svc") as stack:
        store = ray.remote(WeightStore).options(num_cpus=0).remote()
        learner = ray.remote(LearnerWorker).options(num_gpus=0.4, max_concurrency=4).remote(
            job, "nccl", stack["redis_url"], store)
        ray.get(learner.setup.remote())
        rollout = ray.remote(RolloutWorker).options(num_gpus=0.4, max_concurrency=4).remote(
            job, "nccl", 0, stack["redis_url"], stack["verifier_address"], store)
        assert ray.get(learner.attach_rollouts.remote([rollout])) == "nccl"
        ev = {"path": str(held), "verifier": "exact", "limit": 20}
        before = ray.get(rollout.evaluate.remote(ev, 0.0, 20))
        ray.get(learner.run_offline.remote(0, cfg.stages[0].model_dump()))
        version = ray.get(learner.publish.remote())
        after = ray.get(rollout.evaluate.remote(ev, 0.0, 20))
        assert after["version"] == version > before["version"]
        assert torch.cuda.is_available()
