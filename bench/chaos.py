"""Chaos drill: a toy job (GRPO, then OPD from a teacher) run twice in one process, once
clean and once with the rollout worker, the learner, the verifier and Redis killed during
GRPO and the teacher killed during OPD, each once (NEBULA_FAULTS, as tests/test_chaos.py,
on a longer job). Counts what the chaos run lost (tickets of an RL stage never trained) and
duplicated (tickets trained more than once in the final weights' lineage), and what the
recoveries cost in wall time.

Where each kill lands (G = prompts_per_request = 4, so rollout pass k generates step k-1's
tickets; max_staleness 1): the driver's kill sites fire at the first ~1 s progress poll that
sees the learner at step >= N, so each is put where the learner is held until an actor's
fault is recovered: Redis and the verifier in the hold at GRPO step 1 while Ray restarts
rollout-0 (killed after its 2nd pass); the learner after its `--learner-step`-th step; the
teacher in OPD, in the hold at step `grpo + 4` that a raising rollout loop leaves until the
driver runs it again.

Last line: `chaos kills=<n> lost=<n> duplicated=<n> completed=<0|1> extra_wall_s=<s>`
(kills: the recoveries the job records; extra_wall_s = chaos wall - clean wall).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula.config import load_model  # noqa: E402
from nebula.config.job import JobConfig  # noqa: E402
from nebula.tasks.synthetic import make_split  # noqa: E402

G = 4  # groups per step = prompts per rollout request: one rollout pass per learner step


def job(tmp: Path, out: str, grpo: int, opd: int, interval: int, engine: str) -> JobConfig:
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, _ = make_split("addition", tmp / "data", eval_size=100)
    data.update(name="chaos", output_dir=str(tmp / out))
    data["model"]["path"] = str(tmp / "model")
    data["datasets"] = {"train": [{**data["datasets"]["train"][0], "path": str(train)}],
                        "eval": None}
    # the teacher is the toy model's own initial checkpoint: cheap, same tokenizer
    data["teachers"] = [{"name": "self", "path": str(tmp / "model"), "device": "cpu"}]
    data["stages"] = [{"type": "grpo", "steps": grpo},
                      {"type": "opd", "steps": opd, "teacher": "self"}]
    data["rollout"].update(engine=engine, prompts_per_request=G, samples_per_prompt=4)
    data["learner"].update(groups_per_step=G)
    data["async"] = {"max_staleness": 1}
    data["checkpoint"] = {"dir": str(tmp / out / "ck"), "interval": interval, "keep": 3}
    data["recovery"] = {"backoff_s": 0}
    return load_model(JobConfig, data)


def drill(grpo: int, opd: int, learner_step: int) -> dict[str, int]:
    hold_opd = grpo + 4  # the OPD step the raising loop leaves unfinished
    if opd < hold_opd + 2:
        raise SystemExit(f"--opd must be at least --grpo + 6 ({hold_opd + 2})")
    if not 2 < learner_step < grpo:
        raise SystemExit("--learner-step must be in (2, --grpo)")
    return {"rollout-0.after_generate": 2,  # process 1: the tickets of GRPO step 1
            "driver.kill_redis_at_step": 1, "driver.kill_verifier_at_step": 1,
            "learner.after_step": learner_step,
            # process 2 (Ray's restart): GRPO steps 2.., then OPD steps 0..hold_opd
            "rollout-0.raise_after_generate": (grpo - 2) + hold_opd + 1,
            "driver.kill_teacher_at_step": grpo + 1}


def run(cfg: JobConfig, job_id: str, faults: str | None) -> tuple[dict[str, Any] | None, float]:
    from nebula import faults as fault_mod
    from services.runner import JobRunner

    fault_mod._passes.clear()  # the driver's sites fire once per run
    if faults:
        os.environ[fault_mod.ENV] = faults
    else:
        os.environ.pop(fault_mod.ENV, None)
    t0 = time.monotonic()
    try:
        summary: dict[str, Any] | None = JobRunner(cfg, job_id=job_id,
                                                   log=lambda s: print(f"[{job_id}] {s}",
                                                                       flush=True)).run()
    except Exception:  # noqa: BLE001 - a failed chaos run is a result (completed=0)
        traceback.print_exc()
        summary = None
    finally:
        os.environ.pop(fault_mod.ENV, None)
    return summary, time.monotonic() - t0


def tally(cfg: JobConfig, summary: dict[str, Any] | None) -> dict[str, int]:
    """Lost and duplicated tickets over the RL stages, the recoveries recorded, completion."""
    rl = {f"{st.type}{i}": st.steps * G for i, st in enumerate(cfg.stages)}
    if summary is None:
        return {"kills": 0, "lost": sum(rl.values()), "duplicated": 0, "completed": 0}
    stages = {s["stage"]: s for s in summary["stages"]}
    lost = dup = 0
    for name, n in rl.items():
        st = stages.get(name)
        if st is None:
            lost += n
            continue
        covered = {t for a, b in st["tickets_trained"] for t in range(a, b)}
        lost += len(set(range(n)) - covered)
        dup += st["tickets_trained_n"] - len(covered) + len(covered - set(range(n)))
    kills = len(summary.get("learner_restarts", []))
    grpo = stages.get("grpo0", {})
    # a rollout process that died: Ray's restart generated its reserved groups again (GRPO
    # has no raising loop in this drill, so every regenerated group there is a restart's)
    kills += int(bool(grpo.get("rollout")) and grpo["rollout"][0].get("regenerated", 0) > 0)
    rec = Path(cfg.output_dir) / "services" / "supervision.json"
    if rec.exists():
        kills += sum(r["signal"] == "SIGKILL" for s in json.loads(rec.read_text()).values()
                     for r in s["restarts"])
    completed = int(len(stages) == len(cfg.stages) and bool(summary.get("export")))
    return {"kills": kills, "lost": lost, "duplicated": dup, "completed": completed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grpo", type=int, default=20, help="GRPO steps")
    ap.add_argument("--opd", type=int, default=30, help="OPD steps (>= grpo + 6)")
    ap.add_argument("--interval", type=int, default=4, help="checkpoint interval (steps)")
    ap.add_argument("--learner-step", type=int, default=10,
                    help="the learner dies after this many GRPO steps")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args = ap.parse_args()
    spec = drill(args.grpo, args.opd, args.learner_step)
    faults = ",".join(f"{site}@{n}" for site, n in spec.items())

    from nebula.toy_model import ensure_toy_model

    tmp = Path(tempfile.mkdtemp(prefix="nebula-chaos-"))
    clean_cfg = job(tmp, "clean", args.grpo, args.opd, args.interval, args.engine)
    chaos_cfg = job(tmp, "chaos", args.grpo, args.opd, args.interval, args.engine)
    ensure_toy_model(clean_cfg.model)  # built once, before either run is timed

    clean, clean_wall = run(clean_cfg, "clean", None)
    if clean is None or tally(clean_cfg, clean)["completed"] != 1:
        print("the clean run failed: no baseline", file=sys.stderr)
        return 1
    chaos, chaos_wall = run(chaos_cfg, "chaos", faults)
    t = tally(chaos_cfg, chaos)
    print(f"NEBULA_FAULTS={faults}")
    print(f"clean {clean_wall:.1f}s, chaos {chaos_wall:.1f}s; chaos learner restarts "
          f"{len((chaos or {}).get('learner_restarts', []))}; output under {tmp}")
    if chaos is not None:
        for st in chaos["stages"]:
            print(f"  {st['stage']}: tickets {st['tickets_trained']} "
                  f"(n={st['tickets_trained_n']}), replayed {st.get('replayed')}, "
                  f"rollout raises {st.get('rollout_raises')}, regenerated "
                  f"{[r.get('regenerated') for r in st.get('rollout', [])]}")
    print(f"chaos kills={t['kills']} lost={t['lost']} duplicated={t['duplicated']} "
          f"completed={t['completed']} extra_wall_s={chaos_wall - clean_wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
