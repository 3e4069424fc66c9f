"""On-policy distillation vs GRPO from the same start, on the toy string-reversal task.

1. Teacher: the toy architecture trained longer (SFT only; examples/distill/teacher-reversal.yaml).
2. Start: the same architecture after a very short SFT (examples/distill/student-reversal.yaml).
   Both are the OPD demo's, built once and reused.
3. OPD from the start with the teacher, evaluating greedy held-out accuracy every
   `--eval-interval` learner steps; opd_time = stage time when the student first reaches
   95% of the teacher's greedy accuracy.
4. GRPO from the same start (evaluated every 2x as many steps), run for `--grpo-factor` times as many steps as
   OPD needed; grpo_time = stage time when it first reaches the same accuracy, or, when it
   never does, its whole stage time (then the printed ratio is an upper bound).

Data, eval and async settings are the OPD demo's (examples/distill/opd.yaml) for both. Each
method keeps its own tuned recipe for the rest: OPD the demo's (top-k distillation, 128
prompts x 2 samples per step, lr 1e-3), GRPO the toy GRPO recipe's group size, batch, learning
rate and clip ranges (examples/toy/addition.yaml: 32 prompts x 8 samples, lr 1e-4; at lr 1e-3
GRPO did not improve this start either). Stage times are the learner's wall time in the stage at the moment the evaluated weights
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
    if stages[0]["type"] == "grpo":  # GRPO's own recipe (see the module docstring)
        toy = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
        for part, keys in (("rollout", ("samples_per_prompt", "prompts_per_request")),
                           ("learner", ("lr", "groups_per_step", "clip_low", "clip_high",
                                        "is_cap"))):
            data[part].update({k: toy[part][k] for k in keys})
        data["learner"]["lr_schedule"] = toy["learner"].get("lr_schedule", "constant")
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
    ap.add_argument("--grpo-factor", type=float, default=8.0,
                    help="GRPO steps = this x the steps OPD needed (a GRPO step takes about half "
                         "the time of an OPD step: no teacher call, fewer distinct prompts)")
    ap.add_argument("--eval-interval", type=int, default=None)
    args = ap.parse_args()
    os.chdir(ROOT)
    work = Path(args.work).resolve()
    demo = yaml.safe_load((ROOT / "examples/distill/opd.yaml").read_text())
    opd_stage = {**demo["stages"][0]}
    if args.opd_steps:
        opd_stage["steps"] = args.opd_steps
    ev = {"interval": args.eval_interval or demo["eval"].get("interval") or 10}

    print("teacher: examples/distill/teacher-reversal.yaml (built once)", flush=True)
    teacher, t_acc = built("teacher-reversal")
    print("start: examples/distill/student-reversal.yaml (built once)", flush=True)
    start, s_acc = built("student-reversal")
    target = 0.95 * t_acc
    print(f"teacher greedy {t_acc:.1%}; start greedy {s_acc:.1%}; target {target:.1%}", flush=True)

    opd = run(config("opd", work, start, [opd_stage],
                     teachers=[{"name": opd_stage["teacher"], "path": str(teacher)}], eval=ev))
    hit = first_reaching(opd["evals"], target)
    opd_stage_s = opd["stages"][0]["wall_s"]
    opd_time = hit["stage_elapsed_s"] if hit else opd_stage_s
    opd_steps = hit["step"] if hit else opd_stage["steps"]
    grpo_steps = max(ev["interval"], int(args.grpo_factor * opd_steps))
    # A GRPO step takes about half an OPD step's time: evaluate every 2x as many steps, so both
    # runs spend about as much of their wall time on evaluations.
    grpo = run(config("grpo", work, start, [{"type": "grpo", "steps": grpo_steps}],
                      eval={"interval": 2 * ev["interval"]}))
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
