"""End-to-end GRPO throughput on the toy job, measured side by side in one run.

1. The GRPO stage of the toy job in async mode (max_staleness 2) and in sync mode (0):
   samples/s trained by the learner over the stage, and their ratio (target >= 1.6).
2. Rollout tokens/s inside the async job (tokens over the worker's busy time: generation,
   verification, stream writes, weight loads; pacing waits excluded) against the bare vLLM
   engine generating all the same prompts with the same settings right after (target >= 0.9).

Both modes start from the same checkpoint (the toy model after a short SFT, built once) and
alternate (sync, async, sync, async: `--repeats`), their figures summed, so a drift in this
shared machine's speed lands on both.
Last line: `e2e async/sync=<ratio> rollout/raw_vllm=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from nebula.config import load_model  # noqa: E402
from nebula.config.job import JobConfig  # noqa: E402
from nebula.tasks.synthetic import make_split  # noqa: E402


def job(tmp: Path, model: Path, staleness: int, steps: int, stages: list | None = None
        ) -> JobConfig:
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, held = make_split("addition", tmp / "data")
    data.update(name=f"bench-s{staleness}", output_dir=str(tmp / f"run-s{staleness}"))
    data["model"]["path"] = str(model)
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"] = None
    data["stages"] = stages or [{"type": "grpo", "steps": steps}]
    data["async"] = {"max_staleness": staleness}
    return load_model(JobConfig, data)


def run(cfg: JobConfig, raw: bool) -> dict[str, Any]:
    """Run the job; its last stage's result and the evals, and with `raw` the bare engine
    on all the last RL stage's prompts right after it (also used by bench/real_model.py)."""
    from services.runner import JobRunner

    runner = JobRunner(cfg, log=lambda s: print("  " + s, flush=True))
    measured: dict[str, Any] = {}

    def on_end(i: int, res: dict[str, Any], rollouts: list[Any]) -> None:
        import ray

        if raw:
            tickets = list(range(res["tickets_trained_n"]))  # all the stage's prompts
            measured["raw"] = ray.get(rollouts[0].generate_raw.remote(tickets))

    runner.on_grpo_end = on_end
    summary = runner.run()
    return {"grpo": summary["stages"][-1], "evals": summary["evals"], **measured}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2,
                    help="sync and async runs alternate this many times; figures are summed "
                    "(this machine's speed drifts between runs)")
    args = ap.parse_args()
    os.chdir(ROOT)
    runs: dict[int, list[dict[str, Any]]] = {0: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="nebula-bench-") as t:
        tmp = Path(t)
        base = job(tmp, tmp / "model", 0, 1, [{"type": "sft", "steps": args.sft_steps,
                                               "batch_size": 64, "lr": 0.003}])
        base.model.toy = load_model(JobConfig, yaml.safe_load(
            (ROOT / "examples/toy/addition.yaml").read_text())).model.toy
        print("building the start checkpoint (toy model + short SFT) ...", flush=True)
        start = run(base, raw=False)
        del start
        ckpt = Path(base.checkpoint.dir) / "export"  # type: ignore[union-attr]
        for r in range(args.repeats):
            for staleness in (0, 2):
                print(f"GRPO, max_staleness={staleness}, {args.steps} steps "
                      f"(round {r + 1}/{args.repeats}) ...", flush=True)
                runs[staleness].append(run(job(tmp, ckpt, staleness, args.steps),
                                           raw=staleness == 2))
    sps = {s: sum(x["grpo"]["samples"] for x in rs) / sum(x["grpo"]["wall_s"] for x in rs)
           for s, rs in runs.items()}
    workers = [w for x in runs[2] for w in x["grpo"]["rollout"]]
    busy = sum(w["busy_s"] for w in workers)
    roll_tps = sum(w["tokens"] for w in workers) / busy
    raws = [x["raw"] for x in runs[2]]
    raw_tps = sum(r["tokens"] for r in raws) / sum(r["seconds"] for r in raws)
    for s, rs in runs.items():
        for x in rs:
            g = x["grpo"]
            print(f"max_staleness={s}: {g['samples']} samples in {g['wall_s']:.1f}s = "
                  f"{g['samples'] / g['wall_s']:.1f} samples/s; staleness histogram "
                  f"{g['staleness_hist']}")
    for x in runs[2]:
        w, raw = x["grpo"]["rollout"][0], x["raw"]
        print(f"rollout (async): {w['tokens'] / w['busy_s']:.0f} tok/s over busy time "
              f"{w['busy_s']:.1f}s (gen {w['gen_s']:.1f}s = {w['tokens'] / w['gen_s']:.0f} tok/s; "
              f"weight loads {w['weight_loads']} in {w['weight_load_s']:.1f}s, of it fetching "
              f"{w['weight_fetch_s']:.1f}s; scoring+writing {w['finish_s']:.1f}s beside "
              f"generation (verify {w['verify_s']:.1f}s), waited on {w['finish_wait_s']:.1f}s; "
              f"pacing waits {w['pacing_wait_s']:.1f}s); raw vLLM on the same prompts right "
              f"after: {raw['tokens'] / raw['seconds']:.0f} tok/s")
    print(f"e2e async/sync={sps[2] / sps[0]:.2f} rollout/raw_vllm={roll_tps / raw_tps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
