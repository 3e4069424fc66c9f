"""The `tools` environment: between its turns the model may call a tool and read its answer.

Tool-call format (one call per turn; the turn ends at the call's closing tag):

* compact: `<calculator>12*(3+4)</calculator>`, `<python>print(2**10)</python>`
* Hermes / Qwen chat templates: `<tool_call>{"name": "calculator", "arguments":
  {"expression": "12*(3+4)"}}</tool_call>` (python: `{"code": ...}`)

The answer comes back as `<result>...</result>` after the call (a `tool` message of the chat
template for chat prompts: rollout/episodes.py). A turn without a call is the final answer.
A call that cannot be read (unclosed tag, bad JSON, unknown tool) fails the episode; a tool
that runs and fails (a division by zero, a Python exception) answers with its error, which the
model may read and correct.
"""

from __future__ import annotations

import ast
import asyncio
import json
import operator
import re
from dataclasses import dataclass

from nebula.env.base import Environment, StepResult

_COMPACT = re.compile(r"<(calculator|python)>(.*?)</\1>", re.S)
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_OPEN = re.compile(r"<(calculator|python|tool_call)>")
ARG_NAME = {"calculator": "expression", "python": "code"}


class ToolCallError(ValueError):
    """A tool call the parser cannot read."""


@dataclass
class ToolCall:
    name: str
    argument: str


def parse_tool_call(text: str, tools: list[str]) -> ToolCall | None:
    """The turn's tool call, None when it makes none; ToolCallError when it is unreadable."""
    m = _COMPACT.search(text)
    if m is not None:
        name, arg = m.group(1), m.group(2).strip()
    else:
        h = _HERMES.search(text)
        if h is None:
            o = _OPEN.search(text)
            if o is not None:
                raise ToolCallError(f"unclosed <{o.group(1)}> tool call")
            return None
        try:
            call = json.loads(h.group(1))
            name, args = call["name"], call.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args)
            arg = str(args[ARG_NAME[name]])
        except (ValueError, KeyError, TypeError) as e:
            raise ToolCallError(f"unreadable <tool_call>: {type(e).__name__}: {e}") from None
    if name not in tools:
        raise ToolCallError(f"tool {name!r} is not enabled (tools: {', '.join(tools)})")
    return ToolCall(name, arg)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Arithmetic on int/float literals; ValueError/ArithmeticError on anything else."""
    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = ev(ast.parse(expression, mode="eval"))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


class ToolEnvironment(Environment):
    name = "tools"

    def stop_strings(self) -> list[str]:
        return [f"</{t}>" for t in self.cfg.tools] + ["</tool_call>"]

    async def step(self, message: str) -> StepResult:
        try:
            call = parse_tool_call(message, list(self.cfg.tools))
        except ToolCallError as e:
            return StepResult(error=str(e))
        if call is None:
            return StepResult(done=True)
        try:
            out = await asyncio.wait_for(self.run_tool(call), self.cfg.tool_timeout_s)
        except asyncio.TimeoutError:
            out = f"error: the tool took longer than {self.cfg.tool_timeout_s:g}s"
        except (ValueError, ArithmeticError, SyntaxError) as e:
            out = f"error: {type(e).__name__}: {e}"
        return StepResult(observation=out[:self.cfg.max_observation_chars], done=False,
                          tool_call=True)

    async def run_tool(self, call: ToolCall) -> str:
        if call.name == "calculator":
            return calculate(call.argument)
        return await self._python(call.argument)

    async def _python(self, code: str) -> str:
        from nebula.sandbox import Sandbox

        sb = Sandbox(self.cfg.sandbox)
        run = sb.run_unsandboxed if self.cfg.sandbox.allow_unsandboxed and \
            await sb.aprobe() is not None else sb.run
        res = await run({"main.py": code.encode()}, ["main.py"], b"", self.cfg.tool_timeout_s)
        text = res.stdout.decode(errors="replace")
        if res.stderr:
            text += res.stderr.decode(errors="replace")
        if res.timed_out:
            text += f"\nerror: timed out after {self.cfg.tool_timeout_s:g}s"
        return text.strip() or "(no output)"

