"""On-policy distillation vs GRPO from the same start, on the toy addition task.

1. Teacher: the toy architecture trained longer (SFT only; examples/distill/teacher-addition.yaml).
2. Start: the same architecture after a shorter SFT (examples/distill/student-addition.yaml).
   Both are the OPD demo's, built once and reused.
3. OPD from the start with the teacher, evaluating greedy held-out accuracy every
   `--eval-interval` learner steps; opd_time = stage time when the student first reaches
   95% of the teacher's greedy accuracy.
4. GRPO from the same start, same settings and eval cadence, run for `--grpo-factor` times
   the OPD time budget; grpo_time = stage time when it first reaches the same accuracy, or,
   when it never does, its whole stage time (then the printed ratio is an upper bound).

OPD's and GRPO's data, rollout, learner and eval settings are the OPD demo's
(examples/distill/opd.yaml). Stage times are the learner's wall time in the stage at the moment the evaluated weights
were current (engine start-up and the evaluations before/after a stage are left out).
Last line: `opd_time/grpo_time=<ratio> student/teacher=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from nebula.config import load_model  # noqa: E402
from nebula.config.job import JobConfig  # noqa: E402


def config(name: str, work: Path, model: Path, stages: list[dict[str, Any]],
           **over: Any) -> JobConfig:
    """examples/distill/opd.yaml (the OPD demo's data, rollout, learner and eval settings) with
    another model, stages and output dir."""
    data = yaml.safe_load((ROOT / "examples/distill/opd.yaml").read_text())
    data.update(name=name, output_dir=str(work / name))
    data["model"]["path"] = str(model)
    data["stages"] = stages
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return load_model(JobConfig, data)


def run(cfg: JobConfig) -> dict[str, Any]:
    from services.runner import JobRunner

    return JobRunner(cfg, log=lambda s: print("  " + s, flush=True)).run()


def built(example: str) -> tuple[Path, float]:
    """The export and final greedy accuracy of an SFT-only example job (the OPD demo's
    teacher and student start), run once and reused."""
    sys.path.insert(0, str(ROOT / "examples" / "distill"))
    from run import built as built_job, make_data  # examples/distill/run.py

    make_data()
    s = built_job(f"examples/distill/{example}.yaml")
    return Path(s["export"]), s["evals"][-1]["greedy"]


def first_reaching(evals: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    timed = sorted((e for e in evals if "stage_elapsed_s" in e), key=lambda e: e["stage_elapsed_s"])
    return next((e for e in timed if e["greedy"] >= target), None)


def curve(evals: list[dict[str, Any]]) -> str:
    return "  ".join(f"{e['stage_elapsed_s']:.0f}s:{e['greedy']:.0%}" for e in evals
                     if "stage_elapsed_s" in e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-opd", help="output dir of the two runs")
    ap.add_argument("--opd-steps", type=int, default=None, help="default: examples/distill/opd.yaml")
    ap.add_argument("--grpo-factor", type=float, default=3.0)
    ap.add_argument("--eval-interval", type=int, default=None)
    args = ap.parse_args()
    os.chdir(ROOT)
    work = Path(args.work).resolve()
    demo = yaml.safe_load((ROOT / "examples/distill/opd.yaml").read_text())
    opd_stage = {**demo["stages"][0]}
    if args.opd_steps:
        opd_stage["steps"] = args.opd_steps
    ev = {"interval": args.eval_interval or demo["eval"].get("interval") or 10}

    print("teacher: examples/distill/teacher-addition.yaml (built once)", flush=True)
    teacher, t_acc = built("teacher-addition")
    print("start: examples/distill/student-addition.yaml (built once)", flush=True)
    start, s_acc = built("student-addition")
    target = 0.95 * t_acc
    print(f"teacher greedy {t_acc:.1%}; start greedy {s_acc:.1%}; target {target:.1%}", flush=True)

    opd = run(config("opd", work, start, [opd_stage],
                     teachers=[{"name": opd_stage["teacher"], "path": str(teacher)}], eval=ev))
    hit = first_reaching(opd["evals"], target)
    opd_stage_s = opd["stages"][0]["wall_s"]
    opd_time = hit["stage_elapsed_s"] if hit else opd_stage_s
    grpo_steps = max(ev["interval"], int(args.grpo_factor * opd_stage["steps"] * opd_time
                                         / max(opd_stage_s, 1e-9)))
    grpo = run(config("grpo", work, start, [{"type": "grpo", "steps": grpo_steps}], eval=ev))
    ghit = first_reaching(grpo["evals"], target)
    grpo_time = ghit["stage_elapsed_s"] if ghit else grpo["stages"][0]["wall_s"]

    final = opd["evals"][-1]["greedy"]
    print(f"OPD  ({opd_stage['steps']} steps): {curve(opd['evals'])}")
    print(f"GRPO ({grpo_steps} steps): {curve(grpo['evals'])}")
    print(f"teacher {t_acc:.1%}  start {s_acc:.1%}  OPD final {final:.1%}  GRPO final "
          f"{grpo['evals'][-1]['greedy']:.1%}")
    print(f"OPD reached {target:.1%} at {opd_time:.0f}s" if hit else
          f"OPD did not reach {target:.1%} in {opd_stage_s:.0f}s")
    print(f"GRPO reached {target:.1%} at {grpo_time:.0f}s" if ghit else
          f"GRPO did not reach {target:.1%} in {grpo_time:.0f}s: the ratio is an upper bound")
    print(f"opd_time/grpo_time={opd_time / grpo_time:.3f} student/teacher={final / t_acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
