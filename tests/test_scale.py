"""Scale-out on one machine through the real parts: the learner as 2 data-parallel ranks
(Ray actors in one placement group, gloo, DeepSpeed ZeRO-2) in a whole toy job, and a
multi-node Ray cluster (a head and a second node, separate raylets) where the learner's
ranks and the rollout worker are pinned to different nodes by custom resources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import yaml

from nebula.config import load_model
from nebula.config.job import JobConfig
from nebula.tasks.synthetic import make_split
from procs import ROOT
from test_e2e import read_metrics

pytestmark = pytest.mark.slow


def reversal_config(tmp: Path, **over: Any) -> JobConfig:
    """The README's toy recipe, shortened: SFT to a middling accuracy, then 8 GRPO steps."""
    data = yaml.safe_load((ROOT / "examples/toy/reversal.yaml").read_text())
    train, held = make_split("reversal", tmp / "data", eval_size=100)
    data["output_dir"] = str(tmp / "run")
    data["model"]["path"] = str(tmp / "model")
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"]["path"] = str(held)
    data["stages"] = [{"type": "sft", "steps": 80, "batch_size": 64, "lr": 0.003},
                      {"type": "grpo", "steps": 8}]
    data["rollout"].update(prompts_per_request=8)
    data["learner"].update(groups_per_step=8)
    data["eval"] = {"max_prompts": 100}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return load_model(JobConfig, data)


def _run(cfg: Any, job_id: str) -> dict[str, Any]:
    from services.runner import JobRunner

    return JobRunner(cfg, job_id=job_id).run()


def test_two_learner_ranks_match_one(tmp_path: Path) -> None:
    """Same job with 1 and 2 learner ranks: the SFT stage (deterministic data order) follows
    the same loss curve, every GRPO ticket is trained exactly once across the ranks, and
    the held-out accuracy after GRPO lands in the same band."""
    runs = {}
    for ranks in (1, 2):
        cfg = reversal_config(tmp_path / f"r{ranks}", learner={"ranks": ranks})
        runs[ranks] = (cfg, _run(cfg, f"ranks{ranks}"))
    curves = {}
    for ranks, (cfg, summary) in runs.items():
        grpo = summary["stages"][1]
        assert grpo["tickets_trained"] == [[0, 64]] and grpo["tickets_trained_n"] == 64
        assert summary["learner_ranks"] == ranks
        rows = read_metrics(cfg)
        curves[ranks] = [r["loss"] for r in rows if r["stage"] == "sft0"]
        assert [r["groups_trained"] for r in rows if r["stage"] == "grpo1"]
    # Adam over 20 steps amplifies the fp32 rounding of summing two ranks' gradients a
    # little; a wrong normalisation or a lost share would be off by far more.
    assert curves[2] == pytest.approx(curves[1], rel=2e-2)
    # The SFT'd weights agree, so their greedy answers do; GRPO samples, so after it the
    # two land in a band (100 held-out prompts).
    before = {k: s["evals"][0]["greedy"] for k, (_, s) in runs.items()}
    after = {k: s["evals"][-1]["greedy"] for k, (_, s) in runs.items()}
    assert before[1] > 0.05 and abs(before[2] - before[1]) <= 0.03, before
    assert abs(after[2] - after[1]) <= 0.12, after


def test_multi_node_cluster_places_learner_and_rollout_by_resources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray head (node_a) and a second node (node_b), each its own raylet: the learner's 2
    ranks ask for node_b, the rollout worker for node_a; the job runs on that cluster
    (`cluster.ray_address`) with Redis and the verifier addressed by URL."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from test_e2e import toy_config

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # This cluster's session files (and its address file) in a dir of its own, not /tmp/ray
    # where another Ray on the machine would find them.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="nray-", dir="/tmp"))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 2}})
    try:
        node_b = cluster.add_node(num_cpus=2, resources={"node_b": 2})
        cluster.wait_for_nodes()
        cfg = toy_config(tmp_path, cluster={"ray_address": cluster.address},
                         stages=[{"type": "sft", "steps": 4, "batch_size": 16, "lr": 0.003},
                                 {"type": "grpo", "steps": 3}],
                         learner={"ranks": 2, "resources_per_rank": {"node_b": 1},
                                  "placement_strategy": "SPREAD"},
                         rollout={"resources": {"node_a": 1}})
        summary = _run(cfg, "multinode")
        head_id = cluster.head_node.node_id
        assert node_b.node_id != head_id
        assert summary["placement"]["learner"] == [node_b.node_id] * 2
        assert summary["placement"]["rollout"] == [head_id]
        grpo = summary["stages"][1]
        assert grpo["tickets_trained"] == [[0, 12]] and grpo["tickets_trained_n"] == 12
        assert Path(summary["export"], "model.safetensors").is_file()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_more_than_the_cluster_has_fails_with_the_numbers(tmp_path: Path) -> None:
    """A job asking for more GPUs than the cluster has fails before any actor starts,
    naming what it asked and what there is (not a placement that waits forever)."""
    from nebula.resources import InsufficientResources
    from test_e2e import toy_config

    cfg = toy_config(tmp_path, learner={"ranks": 2, "num_gpus_per_rank": 1, "device": "cpu"})
    with pytest.raises(InsufficientResources, match=r"GPU: asked 2, the Ray cluster has 0"):
        _run(cfg, "too-big")
    assert not (Path(cfg.output_dir) / "checkpoints").exists()


def test_a_dead_rank_fails_the_step_and_the_group_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a 2-rank learner dies after its 3rd GRPO step (checkpoint at step 2): the
    step fails (rank 0 is left in a collective with a dead peer), the runner replaces the
    whole group from the checkpoint, and the groups trained since it are replayed, so every
    ticket is trained exactly once in the final weights' lineage."""
    from test_e2e import toy_config
    from test_recovery import no_eval_data

    monkeypatch.setenv("NEBULA_FAULTS", "learner-rank1.after_step@3")
    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, datasets=no_eval_data(tmp_path),
                     stages=[{"type": "grpo", "steps": 5}], learner={"ranks": 2},
                     checkpoint={"dir": str(tmp_path / "ck"), "interval": 2, "keep": 3},
                     recovery={"backoff_s": 0})
    summary = _run(cfg, "two-rank-phoenix")
    restarts = summary["learner_restarts"]
    assert [(r["stage"], r["resume_stage"], r["resume_step"]) for r in restarts] == [(0, 0, 2)]
    grpo = summary["stages"][0]
    assert grpo["tickets_trained"] == [[0, 5 * 4]] and grpo["tickets_trained_n"] == 5 * 4
    assert grpo["replayed"] >= 4


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(
        tmp_path: Path) -> None:
    """Before any worker starts, naming the field (the toy model has 4 attention heads)."""
    from nebula.toy_model import ensure_toy_model
    from services.runner import JobRunner
    from test_e2e import toy_config

    cfg = toy_config(tmp_path, rollout={"tensor_parallel_size": 3})
    ensure_toy_model(cfg.model)
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size: 3 does not divide "
                       r"the model's attention heads \(4\)"):
        JobRunner(cfg).preflight()
    assert not Path(cfg.output_dir).exists()
