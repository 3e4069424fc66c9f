"""One data-parallel rank of tests/test_learner_ranks.py: two GRPO optimizer steps of a tiny
Qwen2 on fixed groups, this rank training its `learner.shard` share (rank/world from the
environment, gloo). Rank 0 saves each step's metrics and the final full weights."""

from __future__ import annotations

import random
import sys

import torch

from learner.batch import collate, collate_examples
from learner.ds_engine import DSLearnerEngine
from learner.shard import example_tokens, group_tokens, split_balanced
from nebula.algo.base import Example
from nebula.algo.dpo import DPO, DPOStage
from nebula.algo.grpo import GRPO, GRPOStage
from nebula.config.data import DatasetConfig
from nebula.config.job import LearnerConfig
from nebula.losses import group_advantages
from nebula.v1.trajectory_pb2 import TrajectoryGroup


def groups(n_groups: int, seed: int, top_k: int = 0) -> list[TrajectoryGroup]:
    """Groups of random samples; with `top_k`, each token carries a teacher's top-k (OPD's
    distillation term, normalised by the step's count of such tokens)."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        group = TrajectoryGroup(group_id=f"g{g}", prompt_ids=[rng.randrange(3, 90)
                                                              for _ in range(rng.randint(2, 5))])
        rewards = [float(rng.random() < 0.5) for _ in range(3)] + [float(g % 2)]
        for r, a in zip(rewards, group_advantages(rewards)):
            c = rng.randint(2, 9)
            group.samples.add(completion_ids=[rng.randrange(3, 90) for _ in range(c)],
                              behaviour_logprobs=[-rng.uniform(3.0, 6.0) for _ in range(c)],
                              policy_versions=[0] * c, loss_mask=[1] * c, reward=r,
                              advantage=a if any(rewards) else 0.5,
                              teacher_top_k=top_k,
                              teacher_top_ids=[rng.randrange(3, 90) for _ in range(top_k * c)],
                              teacher_top_logprobs=[-rng.uniform(0.1, 3.0)
                                                    for _ in range(top_k * c)])
        out.append(group)
    return out


def pairs(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 60) for _ in range(rng.randint(2, 5))]
        out.append(Example([(prompt, [rng.randrange(3, 60) for _ in range(rng.randint(1, 7))])
                            for _ in range(2)]))
    return out


def main(model_dir: str, zero_stage: int, out_path: str, ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = LearnerConfig(zero_stage=zero_stage, device="cpu", lr=0.5, micro_batch=3,
                        grad_clip=100.0)
    eng = DSLearnerEngine(model_dir, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    algo = GRPO(GRPOStage())
    metrics = []
    # DPO's reference log-probs, from the initial weights: every rank computes them for every
    # pair (forwards are collective under ZeRO-3)
    dpo = DPO(DPOStage(dataset=DatasetConfig(path="unused.jsonl"), beta=0.5))
    exs = pairs(5, 3)
    dpo.prepare(exs, eng.sequence_logprobs)
    # GRPO step 1: 6 groups of uneven lengths with a teacher's top-k (OPD's distillation
    # term); step 2: one group, so a second rank has no share
    for step_groups in (groups(6, 0, top_k=2), groups(1, 1)):
        share = split_balanced([group_tokens(g) for g in step_groups], eng.world_size)
        mine = [step_groups[i] for i in share[eng.rank]]
        filler = not mine
        batch = collate(mine or step_groups[:1], eng.pad_id)
        metrics.append(eng.step(batch, algo, examples=len(mine), filler=filler))
    # step 3: DPO (whole pairs per rank) against the initial weights' log-probs
    share = split_balanced([example_tokens(e) for e in exs], eng.world_size)
    mine_ex = [exs[i] for i in share[eng.rank]]
    metrics.append(eng.step(collate_examples(mine_ex or exs[:1], eng.pad_id), dpo,
                            examples=len(mine_ex), filler=not mine_ex))
    weights = eng.full_state_dict()
    # A checkpoint of the group (each rank its ZeRO partitions), then a third step; a fresh
    # engine restored from the checkpoint takes the same third step.
    eng.save_checkpoint(ckpt_dir, {"step": 2}, manifest={"test": True})
    third = groups(3, 2)

    def step3(engine: DSLearnerEngine) -> dict:
        share = split_balanced([group_tokens(g) for g in third], engine.world_size)
        mine = [third[i] for i in share[engine.rank]]
        return engine.step(collate(mine, engine.pad_id), algo, examples=len(mine))

    after = step3(eng)
    eng.close()
    fresh = DSLearnerEngine(model_dir, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    restored = fresh.load_checkpoint(ckpt_dir)
    again = step3(fresh)
    if fresh.rank == 0:
        torch.save({"metrics": metrics, "weights": weights, "restored": restored,
                    "after": after, "again": again}, out_path)
    fresh.close(destroy_process_group=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
