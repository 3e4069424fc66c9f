"""Multi-turn episodes (rollout/episodes.py) and the tools environment: tool-call parsing,
the calculator, token-exact trajectories against the chat template's rendering of the whole
conversation, turn and token limits, failed episodes kept out of the loss, and turns of
different trajectories batched while others wait on their tools. The engine here is a
scripted stand-in (the code under test is what surrounds it); the real vLLM path runs in
tests/test_e2e.py and bench/multiturn.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

from nebula.config.env import EnvironmentConfig
from nebula.env import StepResult, environment_class, register
from nebula.env.tools import ToolCallError, ToolEnvironment, calculate, parse_tool_call
from nebula.prompts import PromptRow
from rollout.engine import SampleOut
from rollout.episodes import EpisodeRunner


def test_tool_call_formats_and_errors() -> None:
    tools = ["calculator", "python"]
    assert parse_tool_call("so <calculator> 2*(3+4) </calculator>", tools).argument == "2*(3+4)"
    hermes = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
    call = parse_tool_call(hermes, tools)
    assert (call.name, call.argument) == ("python", "print(1)")
    assert parse_tool_call("the answer is 7", tools) is None
    for bad, why in (("<calculator>1+2", "unclosed <calculator>"),
                     ("<tool_call>{nope}</tool_call>", "unreadable <tool_call>"),
                     ('<tool_call>{"name": "web"}</tool_call>', "unreadable"),
                     ("<python>print(1)</python>", "'python' is not enabled")):
        with pytest.raises(ToolCallError, match=why):
            parse_tool_call(bad, tools if "enabled" not in why else ["calculator"])


def test_calculator() -> None:
    assert calculate("12345+67890") == "80235"
    assert calculate("7/2") == "3.5" and calculate("-(2**10)") == "-1024"
    for bad in ("__import__('os')", "2**1000", "x+1", "[1]*9"):
        with pytest.raises(ValueError):
            calculate(bad)
    with pytest.raises(ZeroDivisionError):
        calculate("1/0")


class ScriptedEngine:
    """Answers each call with `reply(text so far, tool answers so far)`; records its calls."""

    def __init__(self, tok: Any, reply: Callable[[str, int], str], delay_s: float = 0.0
                 ) -> None:
        self.tok, self.reply, self.delay_s = tok, reply, delay_s
        self.calls: list[tuple[int, float, float]] = []  # (batch size, start, end)

    def _out(self, ids: list[int], max_tokens: int) -> SampleOut:
        text = self.tok.decode(ids)
        out = self.tok(self.reply(text, text.count("<|im_start|>tool")),
                       add_special_tokens=False)["input_ids"]
        cut = len(out) > max_tokens
        out = out[:max_tokens]
        return SampleOut(out, [-0.5] * len(out), self.tok.decode(out, skip_special_tokens=True),
                         "length" if cut else "stop")

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_tokens: int, stop: Any = ()) -> list[list[SampleOut]]:
        t0 = time.monotonic()
        time.sleep(self.delay_s)
        out = [[self._out(p, max_tokens) for _ in range(n)] for p in prompts]
        self.calls.append((len(prompts) * n, t0, time.monotonic()))
        return out


@pytest.fixture(scope="module")
def smol() -> Any:
    import transformers

    from nebula import assets

    gguf = assets.smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _row(tok: Any, question: str) -> PromptRow:
    msgs = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return PromptRow(index=0, prompt_text=text, reference="",
                     prompt_ids=tok(text, add_special_tokens=False)["input_ids"],
                     verifier="exact", templated=True)


def test_trajectory_ids_are_the_templates_rendering_of_the_conversation(smol: Any) -> None:
    row = _row(smol, "What is 12345+67890?")
    call, answer = "<calculator>12345+67890</calculator>", "80235<|im_end|>"
    engine = ScriptedEngine(smol, lambda text, tools: answer if tools else call)
    runner = EpisodeRunner(engine, smol, EnvironmentConfig(name="tools"), context_len=2048)
    (group,) = runner.run([row], 1, 1.0, 1.0, 64)
    (traj,) = group
    assert (traj.turns, traj.tool_calls, traj.error, traj.text) == (2, 1, "", "80235")
    conv = [{"role": "user", "content": "What is 12345+67890?"},
            {"role": "assistant", "content": call}, {"role": "tool", "content": "80235"},
            {"role": "assistant", "content": "80235"}]
    rendered = smol.apply_chat_template(conv, tokenize=False)
    expected = smol(rendered, add_special_tokens=False)["input_ids"]
    # SmolLM2's template ends every turn with "<|im_end|>\n"; the episode ends at the model's
    # <|im_end|> (EOS), so the rendering has one more token: the newline after it.
    assert row.prompt_ids + traj.completion_ids == expected[:-1]
    assert smol.decode(expected[-1:]) == "\n"
    n_call = len(smol(call, add_special_tokens=False)["input_ids"])
    obs = len(traj.completion_ids) - n_call - len(smol(answer, add_special_tokens=False)[
        "input_ids"])
    assert traj.token_mask == [1] * n_call + [0] * obs + [1] * (len(traj.token_mask) - n_call - obs)
    assert traj.logprobs[n_call:n_call + obs] == [0.0] * obs
    assert "<|im_start|>tool\n80235<|im_end|>" in traj.full_text


def test_limits_and_failed_episodes(smol: Any) -> None:
    from nebula.algo.grpo import GRPO, GRPOStage
    from rollout.groups import build_group
    from nebula.clients.verifier import ItemResult

    row = _row(smol, "q")
    loop = "<calculator>1+1</calculator>"
    first = [loop, "<calculator>1+", "a", "b"]
    engine = ScriptedEngine(smol, lambda text, tools: loop if tools else first.pop(0))
    runner = EpisodeRunner(engine, smol, EnvironmentConfig(name="tools", max_turns=3),
                           context_len=2048)
    (group,) = runner.run([row], 4, 1.0, 1.0, 64)
    looping, unclosed, plain_a, plain_b = group
    assert looping.finish_reason == "length" and looping.turns == 3  # out of turns
    assert unclosed.error == "unclosed <calculator> tool call" and unclosed.turns == 1
    assert plain_a.turns == 1 and plain_a.tool_calls == 0 and plain_a.text == "a"
    verdicts = [ItemResult(id=str(i), verifier="exact", status="ok", reward=r, passed=r > 0)
                for i, r in enumerate([1.0, 1.0, 1.0, 0.0])]
    g = build_group(job_id="j", stage="grpo0", row=row, samples=group, verdicts=verdicts,
                    version=2, ticket=0, step=0, worker="w", algo=GRPO(GRPOStage()))
    failed = g.samples[1]
    assert failed.env_error and set(failed.loss_mask) == {0} and failed.advantage == 0.0
    assert [round(s.advantage, 3) for s in g.samples] == [0.707, 0.0, 0.707, -1.414]
    obs = [v for v, m in zip(g.samples[0].policy_versions, g.samples[0].loss_mask) if not m]
    assert obs and set(obs) == {-2}  # OBSERVATION_VERSION: no behaviour log-prob
    from learner.batch import collate

    batch = collate([g], pad_id=0)
    # the learner sees no behaviour log-prob on observation tokens (mismatch, IS weights)
    assert not (batch.has_behaviour & (batch.policy_versions == -2)).any()
    assert batch.has_behaviour.sum() > 0
    budget = EpisodeRunner(ScriptedEngine(smol, lambda text, tools: loop), smol,
                           EnvironmentConfig(name="tools", max_total_tokens=20), 2048)
    (group,) = budget.run([row], 1, 1.0, 1.0, 64)
    assert group[0].finish_reason == "length" and len(group[0].completion_ids) <= 20


class SlowTool(ToolEnvironment):
    name = "slow-tools-test"

    async def step(self, message: str) -> StepResult:
        await asyncio.sleep(0.2)
        return await super().step(message)


def test_tool_calls_overlap_generation(smol: Any) -> None:
    """With max_batch, the engine generates some trajectories' turns while the others wait
    on a 200 ms tool: engine calls overlap tool time, and no call exceeds max_batch."""
    register(SlowTool)
    assert environment_class(EnvironmentConfig(name="slow-tools-test")) is SlowTool
    rows = [_row(smol, f"q{i}") for i in range(8)]
    replies = ["<calculator>1+1</calculator>", "<calculator>2+2</calculator>", "4"]
    engine = ScriptedEngine(smol, lambda text, tools: replies[tools], delay_s=0.1)
    runner = EpisodeRunner(engine, smol, EnvironmentConfig(name="slow-tools-test", max_batch=4),
                           context_len=2048)
    t0 = time.monotonic()
    out = runner.run(rows, 1, 1.0, 1.0, 64)
    wall = time.monotonic() - t0
    assert all(g[0].turns == 3 and g[0].text == "4" for g in out)
    assert max(c[0] for c in engine.calls[1:]) <= 4
    # 3 turns of 200 ms tools, done one after another, would take >= 0.6 s of tool time
    # plus 5 engine calls of 0.1 s; overlapping they take less.
    assert runner.stats["engine_calls"] == len(engine.calls) >= 5
    assert wall < 0.6 + 0.1 * len(engine.calls)


def test_unknown_environment_names_the_field() -> None:
    from nebula.config import load_model
    from nebula.config.job import JobConfig

    with pytest.raises(Exception, match=r"rollout.environment.name: unknown environment 'nope'"):
        load_model(JobConfig, {"model": {"path": "m"}, "datasets": {"train": [{"path": "a"}]},
                               "stages": [{"type": "grpo"}],
                               "rollout": {"environment": {"name": "nope"}}})
