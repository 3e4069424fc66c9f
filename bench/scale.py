"""Scale-out overhead on one machine: samples/s of the toy GRPO stage with 1 and 2 learner
ranks and with 1 and 2 rollout workers, side by side in one run.

Three layouts from the same start checkpoint (the toy model after a short SFT): (learner
ranks, rollout workers) = (1, 1), (2, 1), (1, 2). Each runs `--repeats` times, interleaved,
and its figures are summed, so a drift in the machine's speed lands on all of them. On 2
cores these ratios show the cost of the extra process, gradient all-reduce and weight
fetches, not a speed-up (a second rank or engine has no core of its own here).
Last line: `scale learner2/learner1=<r> rollout2/rollout1=<r>`.
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
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402

from e2e import job, run  # noqa: E402
from nebula.config import load_model  # noqa: E402
from nebula.config.job import JobConfig  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (learner ranks, rollout workers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.chdir(ROOT)
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {lay: [] for lay in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="nebula-bench-") as t:
        tmp = Path(t)
        base = job(tmp, tmp / "model", 0, 1, [{"type": "sft", "steps": args.sft_steps,
                                               "batch_size": 64, "lr": 0.003}])
        base.model.toy = load_model(JobConfig, yaml.safe_load(
            (ROOT / "examples/toy/addition.yaml").read_text())).model.toy
        print("building the start checkpoint (toy model + short SFT) ...", flush=True)
        run(base, raw=False)
        ckpt = Path(base.checkpoint.dir) / "export"  # type: ignore[union-attr]
        for r in range(args.repeats):
            for ranks, workers in LAYOUTS:
                print(f"GRPO, {ranks} learner rank(s), {workers} rollout worker(s), "
                      f"{args.steps} steps (round {r + 1}/{args.repeats}) ...", flush=True)
                cfg = job(tmp, ckpt, 1, args.steps)
                cfg.learner.ranks, cfg.rollout.workers = ranks, workers
                cfg.output_dir = str(tmp / f"run-{ranks}-{workers}-{r}")
                cfg.checkpoint.dir = f"{cfg.output_dir}/checkpoints"  # type: ignore[union-attr]
                runs[(ranks, workers)].append(run(cfg, raw=False))
    sps = {lay: sum(x["grpo"]["samples"] for x in rs) / sum(x["grpo"]["wall_s"] for x in rs)
           for lay, rs in runs.items()}
    for (ranks, workers), v in sps.items():
        steps = [x["grpo"] for x in runs[(ranks, workers)]]
        print(f"learner ranks {ranks}, rollout workers {workers}: {v:.1f} samples/s "
              f"({sum(g['samples'] for g in steps)} samples in "
              f"{sum(g['wall_s'] for g in steps):.1f}s)")
    print(f"scale learner2/learner1={sps[(2, 1)] / sps[(1, 1)]:.2f} "
          f"rollout2/rollout1={sps[(1, 2)] / sps[(1, 1)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
