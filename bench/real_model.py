"""The real recipe's RL stage at speed: SmolLM2-135M-Instruct, GRPO on reasoning-gym
basic_arithmetic (examples/real/grpo.yaml), a fixed number of steps, measured side by side.

1. Async (the recipe's max_staleness 1), vLLM engine: held-out greedy pass rate before and
   after the steps (`gain_pts`), rollout tokens/s over the worker's busy time (generation,
   scoring, stream writes, weight loads; pacing waits excluded) and, right after the stage,
   the bare vLLM engine on all the stage's prompts with the same sampling settings
   (target: rollout >= 0.9x bare vLLM). Learner tokens/s: completion tokens trained per
   second of learner step time (metrics.jsonl).
2. Sync (max_staleness 0), same steps: samples/s of the stage against the async one
   (target: async >= 1.5x sync), and the most any overlap could give here: the sync stage's
   time over that time less its rollout's busy time (overlap hides rollout work only).
3. Async with `rollout.engine: hf` (transformers' generate), same steps: its rollout tokens/s.

Runs 2 and 3 skip the held-out evaluation; every run starts from the same imported
checkpoint. Last line: `real_model rollout/raw_vllm=<r> async/sync=<r> gain_pts=<pts>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "real"))
sys.path.insert(0, str(ROOT / "bench"))


def job(out: Path, steps: int, staleness: int, engine: str, evaluate: bool) -> Any:
    import yaml

    from nebula.config import load_model
    from nebula.config.job import JobConfig

    data = yaml.safe_load((ROOT / "examples/real/grpo.yaml").read_text())
    data.update(name=f"bench-real-{engine}-s{staleness}", output_dir=str(out))
    data["stages"] = [{"type": "grpo", "steps": steps}]
    data["async"] = {"max_staleness": staleness}
    data["rollout"]["engine"] = engine
    if engine == "hf":
        data["rollout"].pop("kv_cache_gb", None)
    if evaluate:
        data["eval"]["interval"] = 0  # before and after the stage only
    else:
        data["datasets"]["eval"] = None
    return load_model(JobConfig, data)


def run(cfg: Any, raw: bool) -> dict[str, Any]:
    from e2e import run as run_job  # bench/e2e.py: the job, and the bare engine after it

    res = run_job(cfg, raw)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").open()]
    steps = [r for r in rows if "step_time_s" in r and "reward_mean" in r]
    trained = sum(r["tokens"] for r in steps)
    learner_s = sum(r["step_time_s"] for r in steps)
    w = res["grpo"]["rollout"][0]
    return {**res, "worker": w, "rollout_tps": w["tokens"] / w["busy_s"],
            "learner_tps": trained / learner_s, "trained": trained, "learner_s": learner_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    os.chdir(ROOT)
    from run import make_data  # examples/real/run.py: the recipe's data

    make_data()
    with tempfile.TemporaryDirectory(prefix="nebula-bench-real-") as t:
        tmp = Path(t)
        res: dict[str, dict[str, Any]] = {}
        for name, staleness, engine in (("async", 1, "vllm"), ("sync", 0, "vllm"),
                                        ("hf", 1, "hf")):
            print(f"GRPO {args.steps} steps, {engine}, max_staleness={staleness} ...",
                  flush=True)
            res[name] = run(job(tmp / name, args.steps, staleness, engine, name == "async"),
                            raw=name == "async")
    a, s, h = res["async"], res["sync"], res["hf"]
    raw = a["raw"]
    raw_tps = raw["tokens"] / raw["seconds"]
    sps = {k: r["grpo"]["samples"] / r["grpo"]["wall_s"] for k, r in res.items()}
    for k, r in res.items():
        g, w = r["grpo"], r["worker"]
        print(f"{k}: {g['samples']} samples in {g['wall_s']:.0f}s = {sps[k]:.2f} samples/s; "
              f"rollout {r['rollout_tps']:.0f} tok/s over busy {w['busy_s']:.0f}s (gen "
              f"{w['gen_s']:.0f}s, weight loads {w['weight_loads']} in "
              f"{w['weight_load_s']:.0f}s, pacing waits {w['pacing_wait_s']:.0f}s); learner "
              f"{r['trained']} completion tokens in {r['learner_s']:.0f}s of steps = "
              f"{r['learner_tps']:.0f} tok/s; staleness {g['staleness_hist']}")
    print(f"bare vLLM on the async stage's prompts: {raw_tps:.0f} tok/s; hf engine rollout "
          f"{h['rollout_tps']:.0f} tok/s = {h['rollout_tps'] / raw_tps:.2f}x bare vLLM")
    # Overlap can hide at most the rollout's share of the sync stage: the learner's work
    # stays. On 2 CPU cores the learner (1 core, bf16 autocast) is the slower side.
    bound = s["grpo"]["wall_s"] / (s["grpo"]["wall_s"] - s["worker"]["busy_s"])
    print(f"async/sync bound here (sync stage / (sync stage - its rollout busy time)): "
          f"{bound:.2f}; reached {sps['async'] / sps['sync'] / bound:.0%} of it")
    # The bound assumes both stages train as much; GRPO trains what the rollouts hold (and
    # skips uniform groups), so the two stages' learner work differs from run to run.
    print(f"learner work async/sync: {a['trained'] / s['trained']:.2f}x the completion tokens, "
          f"{a['learner_s'] / s['learner_s']:.2f}x the step time")
    before, after = a["evals"][0], a["evals"][-1]
    gain = (after["greedy"] - before["greedy"]) * 100
    print(f"held-out greedy {before['greedy']:.1%} -> {after['greedy']:.1%} in "
          f"{args.steps} steps; sampled (T=1) {before['sampled']:.1%} -> {after['sampled']:.1%}")
    print(f"real_model rollout/raw_vllm={a['rollout_tps'] / raw_tps:.2f} "
          f"async/sync={sps['async'] / sps['sync']:.2f} gain_pts={gain:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
