"""Soak: does a long job hold its memory flat? A toy GRPO job (vLLM-CPU engine, DeepSpeed-CPU
learner, embedded Redis and verifier) runs many thousands of small learner steps with a
checkpoint every `--ckpt` steps (the trajectory stream is trimmed at each one: groups are
acknowledged once a checkpoint holds them). At the warm-up step and at the end (both right
after a checkpoint, so the stream is at the same point of its cycle) it records Redis's
used memory, the trajectory stream's length and the resident memory of the driver, the
learner and the rollout worker.

Target: flat within 10 % after warm-up. Last line:
`soak steps=<n> redis_growth=<ratio> rss_growth=<ratio>` (growth = end / after warm-up;
rss_growth is the largest of the three processes').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula.config import load_model  # noqa: E402
from nebula.config.job import JobConfig  # noqa: E402
from nebula.tasks.synthetic import make_split  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def job(tmp: Path, steps: int, ckpt: int) -> JobConfig:
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, held = make_split("addition", tmp / "data")
    data.update(output_dir=str(tmp / "run"), name="soak")
    data["model"]["path"] = str(tmp / "model")
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"] = None
    data["stages"] = [{"type": "grpo", "steps": steps}]
    data["rollout"].update(prompts_per_request=4, samples_per_prompt=4)
    data["learner"].update(groups_per_step=4)
    data["checkpoint"] = {"interval": ckpt, "keep": 2}
    return load_model(JobConfig, data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=1200)
    ap.add_argument("--ckpt", type=int, default=100, help="checkpoint interval (steps)")
    args = ap.parse_args()
    assert args.warmup % args.ckpt == 0 and args.steps % args.ckpt == 0

    import ray
    import redis

    from services.runner import JobRunner

    tmp = Path(tempfile.mkdtemp(prefix="nebula-soak-"))
    cfg = job(tmp, args.steps, args.ckpt)
    samples: list[dict[str, Any]] = []
    pids: dict[str, int] = {}
    marks = list(range(args.warmup, args.steps, args.ckpt))  # right after each checkpoint
    runner: JobRunner

    def sample(status: dict[str, Any]) -> None:
        step = int(status.get("step") or 0)
        if not marks or step < marks[0] or status.get("stage") != "grpo0":
            return
        while marks and step >= marks[0]:
            marks.pop(0)
        if not pids:
            pids.update(driver=os.getpid(), learner=int(status["pid"]),
                        rollout=ray.get(runner.rollouts[0].pid.remote()))
        r = redis.Redis.from_url(runner.summary["redis_url"])
        stream = next((k for k in r.scan_iter("nebula:job:*:trajectories")), None)
        row = {"step": step, "redis_used_mib": r.info("memory")["used_memory"] / 2**20,
               "stream_entries": r.xlen(stream) if stream else 0,
               **{f"{k}_rss_mib": rss_mib(p) for k, p in pids.items()}}
        samples.append(row)
        print(json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)

    runner = JobRunner(cfg, job_id="soak", progress=sample, log=lambda s: None)
    t0 = time.monotonic()
    summary = runner.run()
    wall = time.monotonic() - t0
    first, last = samples[0], samples[-1]
    growth = {k: last[k] / first[k] for k in first if k.endswith("_mib") and first[k]}
    rss = max(v for k, v in growth.items() if k.endswith("rss_mib"))
    stage = summary["stages"][0]
    print(f"steps {stage['steps']} in {wall:.0f}s; samples from step {first['step']} to "
          f"{last['step']}; stream entries {first['stream_entries']} -> "
          f"{last['stream_entries']} (end: {stage['stream_entries_end']}); growth "
          + ", ".join(f"{k[:-4]} {v:.3f}" for k, v in growth.items()))
    print(f"soak steps={stage['steps']} redis_growth={growth['redis_used_mib']:.3f} "
          f"rss_growth={rss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
