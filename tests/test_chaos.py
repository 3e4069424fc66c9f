"""The chaos drill: one toy job (GRPO, then OPD from a teacher) in which the rollout worker,
the learner, the verifier and Redis (during GRPO) and the teacher (during OPD) are each killed
once, at points the fault drill names (NEBULA_FAULTS), never by a timer racing the job. The
job completes with every ticket of each RL stage trained exactly once: nothing lost, nothing
duplicated.

The driver's kill sites (`driver.kill_<service>_at_step@N`) fire at the first progress poll
(about 1 s apart) that sees the learner at step >= N of whichever stage runs, while a toy step
takes 0.1-0.3 s. So each one is put where the learner is held at a step >= N until a fault
of an actor is recovered, not where a poll merely happens to look (G = prompts_per_request =
4, so rollout pass k generates the tickets of step k-1; max_staleness 1; checkpoint every 2):
- GRPO: rollout-0 dies (exit 137) after its 2nd pass: the learner is held at step 1 until
  Ray's restarted worker has generated tickets 4-7 again (seconds); Redis and the verifier
  are killed in that hold (N = 1), so they come back while the rollout worker restarts.
- The learner exits after its 4th GRPO step, only after all that was recovered (steps 1-3
  need the restarted worker, verifier and Redis): its replacement restores checkpoint step2
  and replays the two unacknowledged steps.
- OPD: the restarted rollout worker's loop raises once after generating OPD step 10's
  tickets (its 15th pass: 4 GRPO passes for steps 2-5, then 11 OPD ones). Nothing trains
  step 10 until the driver's poll sees the dead loop and runs it again, and the status that
  poll acts on shows step >= 7 (the loop reserved step 10 only once 9 steps were published,
  and the status was read a few ms before), so the teacher's site (N = 7, above anything
  GRPO's 6 steps show) has fired by then. The groups of steps 10 and 11 are scored after
  the kill.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from test_e2e import read_metrics, toy_config

G = 4
GRPO_STEPS, OPD_STEPS = 6, 12
HOLD_OPD = 10  # the OPD step whose tickets the raising loop leaves unfinished
DRILL = {"rollout-0.after_generate": 2,  # process 1: the tickets of GRPO step 1
         "driver.kill_redis_at_step": 1, "driver.kill_verifier_at_step": 1,
         "learner.after_step": 4,
         # process 2 (the restarted worker): GRPO steps 2-5, then OPD steps 0..HOLD_OPD
         "rollout-0.raise_after_generate": (GRPO_STEPS - 2) + HOLD_OPD + 1,
         "driver.kill_teacher_at_step": GRPO_STEPS + 1}
FAULTS = ",".join(f"{site}@{n}" for site, n in DRILL.items())


def chaos_config(tmp: Path, grpo_steps: int = GRPO_STEPS, opd_steps: int = OPD_STEPS) -> Any:
    """The toy addition job with no eval set: GRPO from the toy model's initial weights, then
    OPD whose teacher is that same initial checkpoint (cheap, and its tokenizer is the
    student's by construction)."""
    train = json.loads(toy_config(tmp).datasets.train[0].model_dump_json())
    return toy_config(tmp, rollout={"engine": "hf"}, datasets={"eval": None, "train": [train]},
                      teachers=[{"name": "self", "path": str(tmp / "model"), "device": "cpu"}],
                      stages=[{"type": "grpo", "steps": grpo_steps},
                              {"type": "opd", "steps": opd_steps, "teacher": "self"}],
                      checkpoint={"dir": str(tmp / "ck"), "interval": 2, "keep": 3},
                      recovery={"backoff_s": 0})


def test_kill_sigkills_the_supervised_child_once_and_refuses_what_is_not_running() -> None:
    """`kill` of the embedded stack, on a supervised stand-in child: the current PID dies of
    SIGKILL and the supervisor has recorded it when `kill` returns; while it is down (the
    backoff is 5 s) and for a service this stack did not start, a clear ValueError."""
    import subprocess

    from nebula.supervisor import Supervisor
    from services.embedded import _killer

    sup = Supervisor("stand-in", lambda: subprocess.Popen(["sleep", "60"],
                                                          start_new_session=True),
                     backoff_s=5.0)
    sup.start()
    try:
        kill = _killer({"verifier": sup})
        pid = sup.pid
        kill("verifier")
        assert [(r.pid, r.signal) for r in sup.restarts] == [(pid, "SIGKILL")]
        with pytest.raises(ValueError, match=r"'verifier': stand-in \(pid \d+\) is down"):
            kill("verifier")
        with pytest.raises(ValueError, match=r"'teacher': not started by the embedded "
                           r"default for this job \(supervised here: verifier\)"):
            kill("teacher")
        with pytest.raises(ValueError, match=r"'ray': not a service of the embedded default"):
            kill("ray")
    finally:
        sup.stop()


@pytest.mark.slow
def test_chaos_drill_loses_and_duplicates_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from services.runner import JobRunner

    monkeypatch.setenv("NEBULA_FAULTS", FAULTS)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    cfg = chaos_config(tmp_path)
    summary = JobRunner(cfg, job_id="chaos", log=log).run()

    # completed
    assert [s["stage"] for s in summary["stages"]] == ["grpo0", "opd1"]
    assert summary.get("export")
    grpo, opd = summary["stages"]

    # nothing lost, nothing duplicated, in either RL stage
    for st, steps in ((grpo, GRPO_STEPS), (opd, OPD_STEPS)):
        assert st["steps"] == steps
        assert st["tickets_trained"] == [[0, steps * G]], st["stage"]
        assert st["tickets_trained_n"] == steps * G, st["stage"]
        assert st["stream_pending_end"] == 0, st["stage"]

    # the learner: died after its 4th GRPO step, restored step2, replayed steps 2 and 3
    restarts = summary["learner_restarts"]
    assert [(r["stage"], r["resume_stage"], r["resume_step"]) for r in restarts] == [(0, 0, 2)]
    assert Path(restarts[0]["checkpoint"]).name == "grpo0-step2"
    assert grpo["replayed"] >= 2 * G

    # the rollout worker: restarted by Ray in GRPO, it generated its unfinished batch again;
    # in OPD its loop raised once and ran again, that batch first (stats are per process)
    ppr = cfg.rollout.prompts_per_request
    assert grpo["rollout"][0]["regenerated"] == ppr and grpo["rollout_raises"] == [0]
    assert opd["rollout"][0]["regenerated"] == 2 * ppr and opd["rollout_raises"] == [1]

    # redis, verifier (in GRPO's hold at step 1), teacher (in OPD): killed once each
    drill = [s for s in lines if s.startswith("fault drill: killing the")]
    assert [s.split()[4] for s in drill] == ["redis", "verifier", "teacher"], drill
    at = {s.split()[4]: int(s.split()[-1]) for s in drill}
    assert at["redis"] == at["verifier"] == 1, drill
    assert GRPO_STEPS + 1 <= at["teacher"] <= HOLD_OPD, drill
    opd_start = next(i for i, s in enumerate(lines) if s.startswith("stage 1: opd"))
    assert lines.index(drill[1]) < opd_start < lines.index(drill[2])
    record = json.loads((Path(cfg.output_dir) / "services" / "supervision.json").read_text())
    assert set(record) == {"redis", "verifier", "teacher"}
    for name, rec in record.items():
        assert rec["generation"] == 2 and not rec["failed"], (name, rec)
        assert [r["signal"] for r in rec["restarts"]] == ["SIGKILL"], (name, rec)

    # OPD trained on the teacher's scores before and after its restart (one version)
    rows = [r for r in read_metrics(cfg) if r["stage"] == "opd1"]
    assert {t for r in rows for t in r["teachers"]} == {f"self@{v}" for v in
                                                         summary["teachers"].values()}
    assert all(sum(r["teachers"].values()) == G * cfg.rollout.samples_per_prompt
               for r in rows)
