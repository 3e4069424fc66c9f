"""Episodes: a rollout's samples as the environment's episodes (`rollout.environment`).

Single-turn environments keep the one engine call per batch (every prompt's n samples at
once). Multi-turn ones generate the first turn the same way, then run every trajectory as its
own coroutine: the environment answers a turn (a tool call runs in a thread or the sandbox),
the answer's tokens are appended, and the trajectory waits for its next turn. A batching loop
hands the engine every turn waiting (at most `max_batch`) as soon as it is free, so tool
calls of some trajectories overlap the generation of others.

Token exactness: a trajectory's ids are the prompt's, then each turn's generated ids as the
engine produced them and each observation's ids, concatenated; nothing earlier is re-tokenized.
Observation tokens get loss mask 0, log-prob 0 and policy version -2 (they are not the
policy's). For a chat-template prompt, an observation is the template's rendering of what
follows the assistant's call: the end of its turn, a `tool` message and the next assistant
header (the delta between two renderings of a probe conversation); tests/test_episodes.py
shows the ids equal the template's rendering of the whole conversation. Without a template it
is `<result>...</result>`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from nebula.config.env import EnvironmentConfig
from nebula.env import Environment, environment_class

_SENTINEL = "\u2063NEBULA_TURN\u2063"


@dataclass
class Trajectory:
    """One episode's completion: everything after the prompt, as the learner trains on it."""

    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_mask: list[int] = field(default_factory=list)  # 1: generated, 0: observation
    text: str = ""            # the last assistant turn: what the verifier scores
    full_text: str = ""       # the whole episode, observations included (for the record)
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    error: str = ""
    reward_parts: dict[str, float] = field(default_factory=dict)

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None, text: str) -> None:
        self.completion_ids += list(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.token_mask += [1 if logprobs is not None else 0] * len(ids)
        self.full_text += text


class ObservationTokens:
    """Token ids of an environment's answer, following the prompt's own format."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tok, self.chat = tokenizer, chat

    def __call__(self, observation: str) -> tuple[list[int], str]:
        if not self.chat:
            text = f"<result>{observation}</result>"
        else:
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
            before = self.tok.apply_chat_template(probe, tokenize=False)
            after = self.tok.apply_chat_template(
                probe + [{"role": "tool", "content": observation}], tokenize=False,
                add_generation_prompt=True)
            text = after[before.index(_SENTINEL) + len(_SENTINEL):]
        return list(self.tok(text, add_special_tokens=False)["input_ids"]), text


class EpisodeRunner:
    """Generates a batch of rows' samples as episodes of the configured environment."""

    def __init__(self, engine: Any, tokenizer: Any, cfg: EnvironmentConfig,
                 context_len: int) -> None:
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.env_cls: type[Environment] = environment_class(cfg)
        self.context_len = context_len
        self.stops = self.env_cls(cfg).stop_strings()
        self.stats = {"engine_busy_s": 0.0, "episode_wall_s": 0.0, "engine_calls": 0,
                      "turns": 0}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    @property
    def multi_turn(self) -> bool:
        return self.env_cls.multi_turn

    def run(self, rows: Sequence[Any], n: int, temperature: float, top_p: float,
            max_tokens: int, stop: Sequence[str] = ()) -> list[list[Any]]:
        """n samples of each row: the engine's SampleOuts (single-turn) or Trajectories."""
        t0 = time.monotonic()
        first = self.engine.generate([r.prompt_ids for r in rows], n, temperature, top_p,
                                     max_tokens, list(stop) + self.stops)
        self.stats["engine_busy_s"] += time.monotonic() - t0
        self.stats["engine_calls"] += 1
        if not self.multi_turn:
            return first
        out = asyncio.run(self._episodes(rows, first, temperature, top_p, max_tokens,
                                         list(stop) + self.stops))
        self.stats["episode_wall_s"] += time.monotonic() - t0
        return out

    async def _episodes(self, rows: Sequence[Any], first: list[list[Any]], temperature: float,
                        top_p: float, max_tokens: int, stop: list[str]) -> list[list[Any]]:
        queue: list[tuple[list[int], int, asyncio.Future]] = []
        wake = asyncio.Event()
        live = [sum(len(g) for g in first)]

        async def generate(ids: list[int], limit: int) -> Any:
            fut = asyncio.get_running_loop().create_future()
            queue.append((ids, limit, fut))
            wake.set()
            return await fut

        async def engine_loop() -> None:
            loop = asyncio.get_running_loop()
            while live[0] > 0:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(0)  # let every trajectory ready now join this batch
                while queue:
                    cap = self.cfg.max_batch or len(queue)
                    batch, queue[:] = queue[:cap], queue[cap:]
                    # One call per per-turn limit (a trajectory near its budget asks for less).
                    for limit in sorted({b[1] for b in batch}):
                        part = [b for b in batch if b[1] == limit]
                        t0 = time.monotonic()
                        try:
                            outs = await loop.run_in_executor(
                                self._pool, self.engine.generate, [b[0] for b in part], 1,
                                temperature, top_p, limit, stop)
                        except Exception as e:  # noqa: BLE001 - every waiter gets the error
                            for _, _, fut in part:
                                fut.set_exception(e)
                            continue
                        finally:
                            self.stats["engine_busy_s"] += time.monotonic() - t0
                            self.stats["engine_calls"] += 1
                        for (_, _, fut), o in zip(part, outs):
                            fut.set_result(o[0])

        async def episode(row: Any, sample: Any) -> Trajectory:
            try:
                return await self._episode(row, sample, max_tokens, generate, observe)
            finally:
                live[0] -= 1
                wake.set()

        observe = ObservationTokens(self.tokenizer, bool(rows) and rows[0].templated)
        loop_task = asyncio.create_task(engine_loop())
        groups = await asyncio.gather(*[asyncio.gather(*[episode(r, s) for s in g])
                                        for r, g in zip(rows, first)])
        await loop_task
        return [list(g) for g in groups]

    async def _episode(self, row: Any, sample: Any, max_tokens: int, generate: Any,
                       observe: ObservationTokens) -> Trajectory:
        env = self.env_cls(self.cfg)
        await env.reset(row)
        traj = Trajectory()
        budget = self.cfg.max_total_tokens or self.context_len
        budget = min(budget, self.context_len - len(row.prompt_ids))
        out = sample
        while True:
            traj.add(out.completion_ids, out.logprobs, out.text)
            traj.turns += 1
            traj.text = out.text
            self.stats["turns"] += 1
            if out.finish_reason == "length":  # the turn was cut: the episode is truncated
                traj.finish_reason = "length"
                return traj
            res = await env.step(out.text)
            for k, v in res.reward_parts.items():
                traj.reward_parts[k] = traj.reward_parts.get(k, 0.0) + v
            traj.tool_calls += int(res.tool_call)
            if res.error:
                traj.error = res.error
                return traj
            if res.done or res.observation is None:
                return traj
            ids, text = observe(res.observation)
            left = budget - len(traj.completion_ids) - len(ids)
            if traj.turns >= self.cfg.max_turns or left <= 0:
                traj.finish_reason = "length"  # still calling tools when out of turns/tokens
                return traj
            traj.add(ids, None, text)
            out = await generate(list(row.prompt_ids) + traj.completion_ids,
                                 min(max_tokens, left))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
