"""End to end through the real parts: local Ray, embedded Redis, the verifier service,
vLLM-CPU rollout and the DeepSpeed-CPU learner (a short toy run)."""

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

pytestmark = pytest.mark.slow


def toy_config(tmp: Path, **over: Any) -> JobConfig:
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, held = make_split("addition", tmp / "data", eval_size=100)
    data["output_dir"] = str(tmp / "run")
    data["model"]["path"] = str(tmp / "model")
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"]["path"] = str(held)
    data["datasets"]["eval"]["limit"] = 40
    data["stages"] = [{"type": "sft", "steps": 20, "batch_size": 32, "lr": 0.003},
                      {"type": "grpo", "steps": 4}]
    data["rollout"].update(prompts_per_request=4, samples_per_prompt=4)
    data["learner"].update(groups_per_step=4)
    data["async"] = {"max_staleness": 1}
    data["eval"] = {"max_prompts": 40}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return load_model(JobConfig, data)


def read_metrics(cfg: JobConfig) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").open()]


def test_toy_job_end_to_end_vllm(tmp_path: Path) -> None:
    from services.runner import JobRunner

    cfg = toy_config(tmp_path)
    summary = JobRunner(cfg, job_id="e2e").run()

    assert [s["stage"] for s in summary["stages"]] == ["sft0", "grpo1"]
    grpo = summary["stages"][1]
    assert set(grpo["staleness_hist"]) <= {"0", "1"}  # pacing kept staleness <= 1
    assert grpo["rollout"][0]["groups"] == 4 * 4 and grpo["samples"] == 4 * 4 * 4
    assert [e["when"] for e in summary["evals"]] == ["before stage 1 (grpo)",
                                                     "after stage 1 (grpo)"]
    # One optimizer step per learner step with a non-uniform group (uniform groups carry no
    # advantage and are skipped), and the eval after the stage ran on the final weights.
    assert summary["evals"][0]["version"] <= summary["evals"][1]["version"] <= \
        summary["evals"][0]["version"] + 4
    assert summary["evals"][1]["version"] == grpo["final_version"]
    rows = read_metrics(cfg)
    sft = [r for r in rows if r["stage"] == "sft0"]
    assert len(sft) == 20 and sft[-1]["loss"] < sft[0]["loss"]
    g = [r for r in rows if r["stage"] == "grpo1"]
    assert len(g) == 4 and all(0 <= r["reward_mean"] <= 1 for r in g)
    assert all(r["staleness_max"] <= 1 for r in g)
    assert list((Path(cfg.output_dir) / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = Path(summary["export"])
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("12+34=", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_dynamic_sampling_refills_uniform_groups_and_trains_each_ticket_once(
        tmp_path: Path) -> None:
    """rollout.dynamic_sampling: after a 2-step SFT most groups of the toy addition task are
    all wrong (uniform rewards); they are generated again from fresh prompts before they are
    written (the refills counted in the learner's metrics and the worker's stats), still one
    group per ticket, each trained once. Soft over-long punishment shapes rewards as well."""
    from services.runner import JobRunner

    cfg = toy_config(tmp_path, rollout={"engine": "hf", "dynamic_sampling": True,
                                        "dynamic_sampling_tries": 2, "overlong_buffer": 2},
                     stages=[{"type": "sft", "steps": 2, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 3}])
    summary = JobRunner(cfg, job_id="dyn").run()
    grpo = summary["stages"][1]
    (stats,) = grpo["rollout"]
    rows = [r for r in read_metrics(cfg) if r["stage"] == "grpo1"]
    assert stats["refills"] > 0 and sum(r["refills"] for r in rows) >= stats["refills"] / 2
    assert grpo["tickets_trained"] == [[0, 3 * 4]] and grpo["tickets_trained_n"] == 3 * 4
    assert all(r["uniform_groups"] <= 4 for r in rows)


@pytest.mark.parametrize("fault", ["after_generate", "raise_after_generate"])
def test_failed_rollout_worker_recovers_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Right after the rollout worker generated its second batch and before that batch
    reached the stream (a point named by the fault drill, not raced by a killer thread), its
    process dies (exit 137, as a SIGKILL leaves it: Ray restarts the actor) or its loop
    raises (the runner runs it again). Either way it generates its unfinished groups again
    and the learner trains every ticket once."""
    from services.runner import JobRunner

    monkeypatch.setenv("NEBULA_FAULTS", f"rollout-0.{fault}@2")
    cfg = toy_config(tmp_path, rollout={"engine": "hf"},
                     stages=[{"type": "sft", "steps": 2, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 8}])
    summary = JobRunner(cfg, job_id="crash").run()
    grpo = summary["stages"][1]
    # The last run of the worker found the failed one's reserved groups and made them again.
    (stats,) = grpo["rollout"]
    assert stats["regenerated"] == cfg.rollout.prompts_per_request
    assert grpo["rollout_raises"] == [1 if fault.startswith("raise") else 0]
    assert grpo["steps"] == 8 and grpo["samples"] == 8 * 4 * 4
    # each ticket trained exactly once: one run covering all, and as many as it covers
    assert grpo["tickets_trained"] == [[0, 8 * 4]] and grpo["tickets_trained_n"] == 8 * 4


def test_mopd_job_routes_each_domain_to_its_teacher(tmp_path: Path, redis_url: str) -> None:
    """A short MOPD stage through the real parts (hf engine for speed): an embedded teacher
    service hosting two teachers, each sample scored by its domain's teacher; records keep the
    teacher lineage and per-token advantages log pi_teacher - log pi_behaviour minus the
    group's mean of it. Then a short OPD stage with the teacher's top-k: the records carry the
    top-k per token and the learner logs the distillation KL."""
    import redis

    from nebula.toy_model import build_toy_model
    from nebula.config.job import ToyModelConfig
    from nebula.transport.pacing import JobKeys
    from nebula.v1.trajectory_pb2 import TrajectoryGroup
    from services.runner import JobRunner

    toy = dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, max_position=64)
    t_add = build_toy_model(tmp_path / "t-add", ToyModelConfig(**toy, seed=11))
    t_rev = build_toy_model(tmp_path / "t-rev", ToyModelConfig(**toy, seed=12))
    rev_train, _ = make_split("reversal", tmp_path / "data", eval_size=100)
    cfg = toy_config(
        tmp_path, rollout={"engine": "hf"},
        stages=[{"type": "sft", "steps": 4, "batch_size": 8, "lr": 0.001},
                {"type": "mopd", "steps": 3, "routing": {"add": "t-add", "rev": "t-rev"}},
                {"type": "opd", "steps": 2, "teacher": "t-rev", "top_k": 4}],
        teachers=[{"name": "t-add", "path": str(t_add)}, {"name": "t-rev", "path": str(t_rev)}],
        cluster={"redis_url": redis_url})
    cfg.model.toy = ToyModelConfig(**toy)
    cfg.datasets.train.append(cfg.datasets.train[0].model_copy(update={"path": str(rev_train)}))
    summary = JobRunner(cfg, job_id="mopd").run()

    assert [s["stage"] for s in summary["stages"]] == ["sft0", "mopd1", "opd2"]
    assert set(summary["teachers"]) == {"t-add", "t-rev"}
    r = redis.Redis.from_url(redis_url)
    groups = [TrajectoryGroup.FromString(f[b"g"])
              for _, f in r.xrange(JobKeys("mopd-1").stream)]
    assert len(groups) == 3 * 4
    assert {g.domain for g in groups} <= {"add", "rev"}
    for g in groups:
        ratios = [t - b for s in g.samples
                  for t, b in zip(s.teacher_logprobs, s.behaviour_logprobs)]
        baseline = sum(ratios) / len(ratios)  # the default group baseline
        for s in g.samples:
            assert s.teacher == {"add": "t-add", "rev": "t-rev"}[g.domain]
            assert s.teacher_version == summary["teachers"][s.teacher]
            assert len(s.teacher_logprobs) == len(s.completion_ids) == len(s.token_advantages)
            for a, t, b in zip(s.token_advantages, s.teacher_logprobs, s.behaviour_logprobs):
                assert a == pytest.approx(t - b - baseline, abs=1e-4)
    rows = [x for x in read_metrics(cfg) if x["stage"] == "mopd1"]
    assert len(rows) == 3 and all("reverse_kl" in x and x["teachers"] for x in rows)
    assert Path(summary["stages"][1]["checkpoint"]).is_dir()

    groups = [TrajectoryGroup.FromString(f[b"g"])
              for _, f in r.xrange(JobKeys("mopd-2").stream)]
    assert len(groups) == 2 * 4
    for s in (s for g in groups for s in g.samples):
        n = len(s.completion_ids)
        assert s.teacher == "t-rev" and s.teacher_top_k == 4
        assert len(s.teacher_top_ids) == len(s.teacher_top_logprobs) == 4 * n
        assert list(s.token_advantages) == [0.0] * n  # alpha 0: the top-k loss does it all
        for j in range(n):
            top = s.teacher_top_logprobs[4 * j:4 * j + 4]
            assert list(top) == sorted(top, reverse=True)
            # the sampled token's teacher log-prob is at most the teacher's best
            assert s.teacher_logprobs[j] <= top[0] + 1e-5
            if s.completion_ids[j] in s.teacher_top_ids[4 * j:4 * j + 4]:
                k = list(s.teacher_top_ids[4 * j:4 * j + 4]).index(s.completion_ids[j])
                assert s.teacher_logprobs[j] == pytest.approx(top[k], abs=1e-5)
    rows = [x for x in read_metrics(cfg) if x["stage"] == "opd2"]
    assert len(rows) == 2 and all(x["distill_kl"] >= 0 for x in rows)


def test_resume_from_a_mid_stage_checkpoint(tmp_path: Path) -> None:
    """A job checkpoints every 2 GRPO steps; a new run with resume_from = the step-2 checkpoint
    restores the policy version and trains only the remaining steps of that stage, with the
    stage's cosine learning rate going on from step 2."""
    from learner.lr_schedule import cosine_lr
    from services.runner import JobRunner

    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, learner={"lr_schedule": "cosine"},
                     stages=[{"type": "sft", "steps": 4, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 4}],
                     checkpoint={"dir": str(tmp_path / "ck"), "interval": 2, "keep": 5},
                     datasets={"eval": None, "train": [json.loads(
                         toy_config(tmp_path).datasets.train[0].model_dump_json())]})
    first = JobRunner(cfg, job_id="first").run()
    ck = tmp_path / "ck"
    assert {p.name for p in ck.iterdir()} >= {"sft0-end", "grpo1-step2", "grpo1-end", "export"}
    v_end = first["stages"][1]["final_version"]

    resumed_cfg = cfg.model_copy(update={"resume_from": str(ck / "grpo1-step2"),
                                         "output_dir": str(tmp_path / "run2")})
    second = JobRunner(resumed_cfg, job_id="second").run()
    assert second["resumed_from"]["stage"] == 1 and second["resumed_from"]["step"] == 2
    assert [s["stage"] for s in second["stages"]] == ["grpo1"]
    # steps 2 and 3 trained here; the stage's record is the checkpoint's lineage: each
    # ticket once, the first two steps' from the checkpoint
    assert second["stages"][0]["tickets_trained"] == [[0, 4 * 4]]
    assert second["stages"][0]["tickets_trained_n"] == 4 * 4
    assert second["stages"][0]["final_version"] <= v_end
    g = [r for r in read_metrics(resumed_cfg) if r["stage"] == "grpo1"]
    assert len(g) == 2
    assert [r["lr"] for r in g] == pytest.approx(
        [cosine_lr(cfg.learner.lr, step, 4, warmup_frac=0.0) for step in (2, 3)])
