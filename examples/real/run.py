"""The real recipe end to end on SmolLM2-135M-Instruct (2 CPU cores, nothing from a hub).

    python examples/real/run.py grpo   # data, then GRPO (examples/real/grpo.yaml)
    python examples/real/run.py opd    # OPD from the GRPO result as teacher (after grpo)
    python examples/real/run.py        # both

The data: reasoning-gym's basic_arithmetic, two 1-digit operands with + and -: 200 distinct
questions, 64 of them held out (disjoint from the 120 trained on). Replies are scored by the
`reasoning_gym` verifier on the last number of the text.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "runs" / "data" / "real" / "arith"
TASK_KWARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
               "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}


def make_data() -> None:
    """Train/eval rows (disjoint questions), each scored on the last number of the reply."""
    if (DATA / "eval.jsonl").is_file():
        return
    from nebula.tasks.reasoning_gym import write_split

    write_split("basic_arithmetic", DATA, 160, 64, seed=0, task_kwargs=TASK_KWARGS)
    for split in ("train", "eval"):
        path = DATA / f"{split}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "answer_format": "last_number"}) + "\n"
                                for r in rows))


def run_job(config: str) -> dict[str, Any]:
    from nebula.config import load_file
    from nebula.config.job import JobConfig
    from services.runner import JobRunner

    cfg = load_file(JobConfig, config)
    return JobRunner(cfg).run()


def report(name: str, summary: dict[str, Any]) -> None:
    evals = summary["evals"]
    first, last = evals[0], evals[-1]
    print(f"{name}: held-out greedy {first['greedy']:.1%} -> {last['greedy']:.1%} "
          f"({(last['greedy'] - first['greedy']) * 100:+.1f} pts), sampled (T=1) "
          f"{first['sampled']:.1%} -> {last['sampled']:.1%} "
          f"({(last['sampled'] - first['sampled']) * 100:+.1f} pts); "
          f"stage {summary['stages'][-1].get('wall_s', 0):.0f}s, job {summary['wall_s']:.0f}s")
    for e in evals:
        print(f"  {e['when']}: greedy {e['greedy']:.1%}, sampled {e['sampled']:.1%}"
              + (f" at {e['stage_elapsed_s']:.0f}s" if "stage_elapsed_s" in e else ""))


def time_to(summary: dict[str, Any], target: float) -> str:
    """When the held-out greedy pass rate first reached `target` in this run's stage."""
    for e in summary["evals"]:
        if e["greedy"] >= target:
            return f"{e.get('stage_elapsed_s', 0):.0f}s ({e['when']})"
    return "not reached"


def compare() -> None:
    """OPD against GRPO: how soon each reaches 95% of the teacher's (GRPO's final) pass rate."""
    runs = {n: ROOT / "runs" / f"real-{n}" / "summary.json" for n in ("grpo", "opd")}
    if not all(p.is_file() for p in runs.values()):
        return
    grpo, opd = (json.loads(p.read_text()) for p in runs.values())
    teacher = grpo["evals"][-1]["greedy"]
    target = 0.95 * teacher
    print(f"teacher (GRPO result) greedy {teacher:.1%}; 95% of it = {target:.1%}: "
          f"GRPO reached it at {time_to(grpo, target)}, OPD at {time_to(opd, target)}")


def main() -> int:
    os.chdir(ROOT)
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    make_data()
    if what in ("grpo", "all"):
        report("GRPO", run_job("examples/real/grpo.yaml"))
    if what in ("opd", "all"):
        report("OPD", run_job("examples/real/opd.yaml"))
    compare()
    return 0


if __name__ == "__main__":
    sys.exit(main())
