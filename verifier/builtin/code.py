"""`code`: run the response's Python against the item's tests in the sandbox.

Test conventions of public code sets, read from `metadata` (or, when it has none of them, from
the reference parsed as a JSON object):
- HumanEval: `test` (code defining `check(candidate)`) and `entry_point`; optional `prompt`.
  A response that does not define the entry point is taken as a completion of the prompt.
  check's top-level asserts are separate tests (its other statements run before each), so the
  reward is a fraction; a check that cannot be split is one test, `check(entry_point)`.
- MBPP: `test_list` (assert strings), optional `test_setup_code` and `test_imports`.
- stdin/stdout: APPS `input_output` (JSON string or object with `inputs`/`outputs`; with
  `fn_name` the cases are calls of that function), plain `inputs`/`outputs` lists, or
  CodeContests `public_tests`/`private_tests` ({"input": [...], "output": [...]}).

The response's code is its last ```python (or plain ```) fenced block, else the whole text.
reward = fraction of tests passed; passed = all of them.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import secrets
import textwrap
from pathlib import Path
from typing import Any

from verifier.api import AsyncVerifier, Outcome, VerifierInputError, VerifyInput
from nebula.sandbox import Sandbox, SandboxResult

log = logging.getLogger(__name__)

ACCEPTED_FIELDS = (
    "test + entry_point (HumanEval), test_list (MBPP), input_output (APPS), inputs/outputs, "
    "public_tests/private_tests (CodeContests)"
)
_TEST_KEYS = ("test_list", "test", "input_output", "inputs", "public_tests", "private_tests")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}
_HARNESS: bytes | None = None


def _harness_source() -> bytes:
    global _HARNESS
    if _HARNESS is None:
        from verifier import sandbox_harness  # stdlib-only module; importing runs nothing

        _HARNESS = Path(sandbox_harness.__file__).read_bytes()
    return _HARNESS


def extract_code(response: str) -> str:
    """The last ```python fenced block, else the last untagged one, else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    for wanted in (lambda t: t in _PY_TAGS, lambda t: t == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return response


# --------------------------------------------------------------------------- parsing


def _field(md: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """metadata[key], JSON-decoded when given as a string but a list/dict is wanted."""
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, str) and kind in (list, dict, (list, dict)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise VerifierInputError(f"metadata.{key} is not valid JSON: {e}") from e
    if not isinstance(value, kind):
        raise VerifierInputError(f"metadata.{key} has the wrong type ({type(value).__name__})")
    return value


def _test_fields(item: VerifyInput) -> dict[str, Any]:
    md = dict(item.metadata or {})
    if any(md.get(k) not in (None, "", []) for k in _TEST_KEYS):
        return md
    ref = (item.reference or "").strip()
    if ref.startswith("{"):
        try:
            parsed = json.loads(ref)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return {**parsed, **{k: v for k, v in md.items() if v not in (None, "")}}
    return md


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", code,
                         re.MULTILINE) is not None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
    return False


def _prompt_helpers(prompt: str, entry_point: str, code: str) -> str:
    """Imports and helper definitions of a HumanEval prompt that a full-function response may
    rely on without repeating (e.g. `from typing import List`, `poly` in HumanEval/32)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    parts = []
    for node in tree.body:
        keep = isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.name != entry_point and not _defines(code, node.name)
        )
        if keep:
            seg = ast.get_source_segment(prompt, node)
            if seg:
                parts.append(seg)
    return "\n".join(parts)


def _contains_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _trivial_assert(node: ast.stmt) -> bool:
    """`assert True, "..."` lines of HumanEval: always pass, so they are not tests."""
    return isinstance(node, ast.Assert) and isinstance(node.test, ast.Constant) \
        and bool(node.test.value)


def _stmt_source(source: str, node: ast.stmt) -> str | None:
    """A statement's source re-indented to column 0 (statements cut out of a function body
    keep their indent on continuation lines)."""
    if node.col_offset == 0:
        return ast.get_source_segment(source, node)
    padded = ast.get_source_segment(source, node, padded=True)
    if padded is None:
        return None
    flat = textwrap.dedent(padded)
    try:
        ast.parse(flat)
        return flat
    except SyntaxError:  # e.g. a multi-line string with lines at column 0
        return "if True:\n" + padded


def _split_units(stmts: list[ast.stmt], source: str) -> list[str] | None:
    """Each statement holding an assert becomes a test, preceded by every assert-free
    statement before it. None when nothing splits out."""
    units, setup = [], []
    for node in stmts:
        seg = _stmt_source(source, node)
        if seg is None:
            return None
        if _trivial_assert(node):
            continue
        if _contains_assert(node):
            units.append("\n".join([*setup, seg]))
        else:
            setup.append(seg)
    return units or None


def humaneval_tests(test_code: str, entry_point: str | None) -> list[str]:
    """Split a HumanEval `test` into separate test snippets (see the module docstring)."""
    whole = f"{test_code}\n\ncheck({entry_point})\n" if entry_point else None
    try:
        tree = ast.parse(test_code)
    except SyntaxError:
        if whole is None:
            raise VerifierInputError("metadata.entry_point is required with a HumanEval test")
        return [whole]
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"),
                 None)
    if check is None:  # a plain module of asserts
        return _split_units(tree.body, test_code) or [test_code]
    if whole is None:
        raise VerifierInputError("metadata.entry_point is required with a HumanEval `test` "
                                 "that defines check(candidate)")
    params = [a.arg for a in check.args.args]
    units = _split_units(check.body, test_code) if len(params) == 1 else None
    if not units:
        return [whole]
    module = [_stmt_source(test_code, n) or "" for n in tree.body if n is not check]
    prelude = "\n".join([*module, f"{params[0]} = {entry_point}"])
    return [f"{prelude}\n{unit}\n" for unit in units]


def _apps_call_test(fn_name: str, args: Any, expected: Any) -> str:
    """One call-based APPS case as an assert (APPS compares list(result) with the expected
    value or its single element)."""
    return (
        "import json as _nb_json\n"
        f"_nb_args = _nb_json.loads({json.dumps(json.dumps(args))})\n"
        f"_nb_exp = _nb_json.loads({json.dumps(json.dumps(expected))})\n"
        f"_nb_fn = Solution().{fn_name} if 'Solution' in globals() and "
        f"hasattr(Solution, {fn_name!r}) else {fn_name}\n"
        "_nb_got = _nb_fn(*_nb_args) if isinstance(_nb_args, list) else _nb_fn(_nb_args)\n"
        "if isinstance(_nb_got, tuple):\n    _nb_got = list(_nb_got)\n"
        "assert _nb_got == _nb_exp or (isinstance(_nb_exp, list) and len(_nb_exp) == 1 and "
        "_nb_got == _nb_exp[0]), f'wrong answer: expected {_nb_exp!r}, got {_nb_got!r}'\n"
    )


def _io_cases(inputs: Any, outputs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise VerifierInputError(f"{where}: inputs and outputs must be lists")
    if len(inputs) != len(outputs):
        raise VerifierInputError(
            f"{where}: {len(inputs)} inputs but {len(outputs)} outputs")

    def text(v: Any) -> str:
        return "\n".join(map(str, v)) if isinstance(v, list) else str(v)

    return [{"input": text(i), "output": text(o)} for i, o in zip(inputs, outputs)]


class _Plan:
    def __init__(self, mode: str, solution: str, setup: str = "",
                 tests: list[str] | None = None, cases: list[dict[str, str]] | None = None):
        self.mode, self.solution, self.setup = mode, solution, setup
        self.tests = tests or []
        self.cases = cases or []

    @property
    def labels(self) -> list[str]:
        if self.mode == "functions":
            return [_label(t) for t in self.tests]
        return [f"stdin case {i + 1}" for i in range(len(self.cases))]

    @property
    def total(self) -> int:
        return len(self.tests) if self.mode == "functions" else len(self.cases)


def _label(test: str) -> str:
    lines = [ln.strip() for ln in test.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    asserts = [ln for ln in lines if ln.startswith("assert")]
    text = asserts[-1] if asserts else last
    return text if len(text) <= 120 else text[:117] + "..."


def build_plan(item: VerifyInput) -> _Plan:
    md = _test_fields(item)
    code = extract_code(item.response or "")

    test_list = _field(md, "test_list", list)
    if test_list:
        if not all(isinstance(t, str) for t in test_list):
            raise VerifierInputError("metadata.test_list must be a list of strings")
        imports = _field(md, "test_imports", (list, str)) or []
        if isinstance(imports, str):
            imports = [imports]
        setup_code = md.get("test_setup_code") or ""
        if not isinstance(setup_code, str):
            raise VerifierInputError("metadata.test_setup_code must be a string")
        tests = [f"{setup_code}\n{t}" if setup_code.strip() else t for t in test_list]
        return _Plan("functions", code, "\n".join(map(str, imports)), tests=tests)

    test = md.get("test")
    if isinstance(test, str) and test.strip():
        entry_point = md.get("entry_point")
        if entry_point is not None and (not isinstance(entry_point, str)
                                        or not entry_point.isidentifier()):
            raise VerifierInputError("metadata.entry_point must be a function name")
        prompt = md.get("prompt")
        setup = ""
        if entry_point and isinstance(prompt, str) and prompt.strip():
            if _defines(code, entry_point):
                setup = _prompt_helpers(prompt, entry_point, code)
            else:  # a completion of the prompt's function
                sep = "" if prompt.endswith("\n") else "\n"
                code = prompt + sep + code
        return _Plan("functions", code, setup, tests=humaneval_tests(test, entry_point))

    io = md.get("input_output")
    if io not in (None, "", {}):
        io = _field(md, "input_output", dict)
        fn_name = io.get("fn_name")
        inputs, outputs = io.get("inputs"), io.get("outputs")
        if fn_name:
            if not isinstance(fn_name, str) or not fn_name.isidentifier():
                raise VerifierInputError("metadata.input_output.fn_name must be a name")
            if not isinstance(inputs, list) or not isinstance(outputs, list) \
                    or len(inputs) != len(outputs):
                raise VerifierInputError("metadata.input_output: inputs/outputs must be lists "
                                         "of the same length")
            tests = [_apps_call_test(fn_name, a, e) for a, e in zip(inputs, outputs)]
            return _Plan("functions", code, tests=tests)
        return _Plan("stdio", code, cases=_io_cases(inputs, outputs, "metadata.input_output"))

    if md.get("inputs") is not None or md.get("outputs") is not None:
        return _Plan("stdio", code, cases=_io_cases(
            _field(md, "inputs", list), _field(md, "outputs", list), "metadata.inputs/outputs"))

    cases: list[dict[str, str]] = []
    for key in ("public_tests", "private_tests"):
        block = _field(md, key, dict)
        if block:
            cases += _io_cases(block.get("input"), block.get("output"), f"metadata.{key}")
    if cases:
        return _Plan("stdio", code, cases=cases)

    raise VerifierInputError(f"code verifier needs tests in metadata: one of {ACCEPTED_FIELDS}")


# --------------------------------------------------------------------------- verifier


class CodeVerifier(AsyncVerifier):
    """Runs the response's code against the item's tests in the bubblewrap sandbox."""

    name = "code"
    version = "1"
    description = ("Python code run against HumanEval/MBPP/APPS/CodeContests-style tests in a "
                   "sandbox; reward = fraction of tests passed.")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.sandbox = Sandbox(self.config.sandbox)
        self._warned = False

    async def averify(self, item: VerifyInput, timeout_s: float) -> Outcome:
        plan = build_plan(item)
        if plan.total == 0:
            raise VerifierInputError(f"no tests found in metadata ({ACCEPTED_FIELDS})")
        cfg = self.config.sandbox
        why = await self.sandbox.aprobe()
        if why is not None and not cfg.allow_unsandboxed:
            raise RuntimeError(
                f"code sandbox unavailable: {why}; set sandbox.allow_unsandboxed=true to run "
                "untrusted code without isolation")
        # Leave a margin to kill, reap and report before the caller's deadline.
        margin = min(0.5, 0.2 * timeout_s)
        wall = max(0.05, min(timeout_s - margin, cfg.wall_timeout_s))
        nonce = secrets.token_hex(16)
        spec = {
            "mode": plan.mode, "solution": plan.solution, "setup": plan.setup,
            "tests": plan.tests, "cases": plan.cases, "nonce": nonce,
            "per_test_timeout_s": min(cfg.per_test_timeout_s, wall),
        }  # fmt: skip
        files = {"harness.py": _harness_source()}
        argv = ["python", "harness.py"]
        stdin = json.dumps(spec).encode()
        if why is None:
            res = await self.sandbox.run(files, argv, stdin, wall)
        else:
            if not self._warned:
                log.warning("running untrusted code WITHOUT a sandbox (%s)", why)
                self._warned = True
            res = await self.sandbox.run_unsandboxed(files, argv, stdin, wall)
        return _outcome(plan, res, nonce, sandboxed=why is None)


def _outcome(plan: _Plan, res: SandboxResult, nonce: str, sandboxed: bool) -> Outcome:
    total = plan.total
    results: list[dict[str, Any] | None] = [None] * total
    setup_error = ""
    done = False
    for raw in res.stdout.splitlines():
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(msg, dict) or msg.get("nonce") != nonce:
            continue
        kind = msg.get("kind")
        if kind == "test":
            i = msg.get("i")
            if isinstance(i, int) and 0 <= i < total and results[i] is None:
                results[i] = {"passed": msg.get("ok") is True,
                              "error": str(msg.get("error") or "")[:300]}
        elif kind == "setup" and not setup_error:
            setup_error = str(msg.get("error") or "setup failed")[:300]
        elif kind == "done":
            done = True
    if setup_error:
        missing = setup_error
    elif done:
        missing = "no result reported"
    else:
        missing = "no result: " + (res.violation or "the run ended early")
    final = [r if r is not None else {"passed": False, "error": missing} for r in results]
    n_pass = sum(1 for r in final if r["passed"])
    labels = plan.labels
    for r, label in zip(final, labels):
        r["test"] = label
    passed = n_pass == total
    if passed:
        reason = f"all {total} tests passed"
    else:
        first = next(i for i, r in enumerate(final) if not r["passed"])
        reason = f"test {first + 1}/{total} failed ({labels[first]}): {final[first]['error']}"
        if res.violation:
            reason = f"{res.violation}: {res.violation_detail}; {reason}"
    stderr_tail = res.stderr.decode("utf-8", "replace")[-2000:]
    return Outcome(
        reward=n_pass / total,
        passed=passed,
        reason=reason,
        details={
            "tests_total": total,
            "tests_passed": n_pass,
            "violation": res.violation,
            "results": final,
            "stderr_tail": stderr_tail,
            "elapsed_s": round(res.elapsed_s, 4),
            "sandboxed": sandboxed,
        },
    )
