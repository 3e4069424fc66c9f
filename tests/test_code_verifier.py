"""Tests of the `code` verifier on real HumanEval, MBPP, APPS and CodeContests-style rows:
correct solutions get 1.0, partially correct ones the fraction of tests they pass, wrong ones
0; fenced code extraction, prompt completions, limits, fail-closed reporting, input errors,
and refusal when no sandbox can be set up."""

from __future__ import annotations

import json
import time

import pytest

from nebula.config import SandboxConfig, VerifierServiceConfig
from verifier.api import VerifierInputError, VerifyInput
from verifier.builtin.code import CodeVerifier, extract_code, humaneval_tests
from nebula.sandbox import Sandbox

SANDBOX = SandboxConfig(wall_timeout_s=10.0, per_test_timeout_s=2.0, memory_mb=512)
_WHY = Sandbox(SANDBOX).probe()
needs_sandbox = pytest.mark.skipif(_WHY is not None, reason=f"sandbox unavailable: {_WHY}")


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(VerifierServiceConfig(sandbox=SANDBOX))


async def verify(v: CodeVerifier, response: str, metadata: dict | None = None,
                 reference: str = "", timeout_s: float = 10.0):
    return await v.averify(VerifyInput(response, reference, metadata or {}), timeout_s)


# --------------------------------------------------------------------------- rows

# HumanEval/0, as in openai/openai_humaneval.
HE0 = {
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\n\n\ndef has_close_elements(numbers: List[float], '
              'threshold: float) -> bool:\n    """ Check if in given list of numbers, are any '
              'two numbers closer to each other than\n    given threshold.\n    >>> '
              'has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    >>> has_close_elements('
              '[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n',
    "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in "
                          "enumerate(numbers):\n            if idx != idx2:\n                "
                          "distance = abs(elem - elem2)\n                if distance < threshold:"
                          "\n                    return True\n\n    return False\n",
    "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check("
            "candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n    assert "
            "candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n    assert candidate([1.0, "
            "2.0, 5.9, 4.0, 5.0], 0.8) == False\n    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0,"
            " 2.0], 0.1) == True\n    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True"
            "\n    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n",
    "entry_point": "has_close_elements",
}  # fmt: skip

# HumanEval/32: the test is one loop of asserts with setup statements before it, and calls the
# prompt's helper `poly`.
HE32 = {
    "task_id": "HumanEval/32",
    "prompt": 'import math\n\n\ndef poly(xs: list, x: float):\n    """\n    Evaluates polynomial '
              'with coefficients xs at point x.\n    return xs[0] + xs[1] * x + xs[1] * x^2 + '
              '.... xs[n] * x^n\n    """\n    return sum([coeff * math.pow(x, i) for i, coeff '
              'in enumerate(xs)])\n\n\ndef find_zero(xs: list):\n    """ xs are coefficients '
              'of a polynomial.\n    find_zero find x such that poly(x) = 0.\n    find_zero '
              'returns only only zero point, even if there are many.\n    Moreover, find_zero '
              'only takes list xs having even number of coefficients\n    and largest non zero '
              'coefficient as it guarantees\n    a solution.\n    >>> round(find_zero([1, 2])'
              ', 2) # f(x) = 1 + 2x\n    -0.5\n    >>> round(find_zero([-6, 11, -6, 1]), 2) # '
              '(x - 1) * (x - 2) * (x - 3) = -6 + 11x - 6x^2 + x^3\n    1.0\n    """\n',
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    import math\n    import random\n"
            "    rng = random.Random(42)\n    import copy\n    for _ in range(100):\n        "
            "ncoeff = 2 * rng.randint(1, 4)\n        coeffs = []\n        for _ in range(ncoeff)"
            ":\n            coeff = rng.randint(-10, 10)\n            if coeff == 0:\n          "
            "      coeff = 1\n            coeffs.append(coeff)\n        solution = candidate("
            "copy.deepcopy(coeffs))\n        assert math.fabs(poly(coeffs, solution)) < 1e-4\n\n",
    "entry_point": "find_zero",
}  # fmt: skip
HE32_SOLUTION = (
    "def find_zero(xs: list):\n    begin, end = -1., 1.\n    while poly(xs, begin) * poly(xs, "
    "end) > 0:\n        begin *= 2.0\n        end *= 2.0\n    while end - begin > 1e-10:\n      "
    "  center = (begin + end) / 2.0\n        if poly(xs, center) * poly(xs, begin) > 0:\n      "
    "      begin = center\n        else:\n            end = center\n    return begin\n"
)

# MBPP task 2 (original "full" config).
MBPP2 = {
    "task_id": 2,
    "text": "Write a function to find the similar elements from the given two tuple lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & "
            "set(test_tup2))\r\n  return (res) ",
    "test_list": [
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}  # fmt: skip

# MBPP task 82 ("sanitized" config): the tests need `math` from test_imports.
MBPP82 = {
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "task_id": 82,
    "prompt": "Write a function to find the volume of a sphere.",
    "code": "import math\ndef volume_sphere(r):\n  volume=(4/3)*math.pi*r*r*r\n  return volume",
    "test_imports": ["import math"],
    "test_list": [
        "assert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)",
        "assert math.isclose(volume_sphere(25), 65449.84694978735, rel_tol=0.001)",
        "assert math.isclose(volume_sphere(20), 33510.32163829113, rel_tol=0.001)",
    ],
}  # fmt: skip

# APPS-style stdin/stdout row: input_output is a JSON string.
APPS_IO = {
    "problem_id": 4000,
    "question": "Given n and n integers, print their sum and their maximum.",
    "input_output": json.dumps({
        "inputs": ["3\n1 2 3\n", "1\n-5\n", "4\n10 20 30 40\n"],
        "outputs": ["6 3\n", "-5 -5\n", "100 40\n"],
    }),
    "difficulty": "introductory",
}  # fmt: skip
APPS_OK = "n = int(input())\na = list(map(int, input().split()))\nprint(sum(a), max(a))\n"

# CodeContests-style row.
CC_ROW = {
    "name": "1548_A. Weak Pairs",
    "public_tests": {"input": ["2\n3 4\n10 -2\n"], "output": ["7\n8\n"]},
    "private_tests": {"input": ["1\n0 0\n", "3\n1 1\n2 2\n5 5\n"],
                      "output": ["0\n", "2\n4\n10\n"]},
    "generated_tests": {"input": [], "output": []},
}  # fmt: skip


# --------------------------------------------------------------------------- pure helpers


def test_extract_code_prefers_last_python_block() -> None:
    text = ("Here is a first try:\n```python\ndef f(): return 1\n```\nBetter:\n```python\n"
            "def f(): return 2\n```\nRun it with:\n```bash\npython f.py\n```\n")
    assert extract_code(text) == "def f(): return 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("def f():\n    return 3\n") == "def f():\n    return 3\n"
    # An unterminated fence (truncated generation) still yields its code.
    assert extract_code("Sure:\n```python\ndef f():\n    return 4\n") == \
        "def f():\n    return 4\n"


def test_humaneval_split_into_asserts() -> None:
    tests = humaneval_tests(HE0["test"], "has_close_elements")
    assert len(tests) == 7
    assert all("candidate = has_close_elements" in t and "METADATA" in t for t in tests)
    assert tests[1].rstrip().endswith("0.05) == False")
    # HumanEval/32: one unit (the loop) after its setup statements.
    (unit,) = humaneval_tests(HE32["test"], "find_zero")
    assert "rng = random.Random(42)" in unit and unit.rstrip().endswith("< 1e-4")
    compile(unit, "unit", "exec")


def test_humaneval_split_skips_trivial_asserts_and_falls_back() -> None:
    test = ("def check(candidate):\n    assert True, 'This prints if this assert fails 1'\n"
            "    assert candidate(1) == 2\n    assert True\n    assert candidate(2) == 3\n")
    assert len(humaneval_tests(test, "f")) == 2
    # No top-level asserts to split: one test calling check.
    test = "def check(candidate):\n    candidate(1)\n"
    assert humaneval_tests(test, "f") == [f"{test}\n\ncheck(f)\n"]
    # Unparseable test code: one test calling check.
    assert humaneval_tests("def check(c:\n", "f") == ["def check(c:\n\n\ncheck(f)\n"]


# --------------------------------------------------------------------------- HumanEval


@needs_sandbox
async def test_humaneval_correct_partial_wrong(verifier: CodeVerifier) -> None:
    full = HE0["prompt"] + HE0["canonical_solution"]
    out = await verify(verifier, f"Here you go:\n```python\n{full}```\n", HE0)
    assert (out.reward, out.passed) == (1.0, True), out
    assert out.details["tests_total"] == 7 and out.details["tests_passed"] == 7
    assert out.details["violation"] is None
    assert out.reason == "all 7 tests passed"

    # Always False: passes exactly the 3 asserts that expect False.
    partial = "def has_close_elements(numbers, threshold):\n    return False\n"
    out = await verify(verifier, partial, HE0)
    assert out.reward == pytest.approx(3 / 7) and not out.passed
    assert [r["passed"] for r in out.details["results"]] == \
        [False, True, False, True, False, False, True]
    assert "test 1/7 failed" in out.reason and "AssertionError" in out.reason

    wrong = "def has_close_elements(numbers, threshold):\n    return None\n"
    out = await verify(verifier, wrong, HE0)
    assert (out.reward, out.passed) == (0.0, False)


@needs_sandbox
async def test_humaneval_prompt_completion(verifier: CodeVerifier) -> None:
    # The response is only the body: it is a completion of the prompt.
    out = await verify(verifier, HE0["canonical_solution"], HE0)
    assert out.reward == 1.0 and out.passed, out
    # A full function that relies on the prompt's helper (poly) and imports.
    out = await verify(verifier, f"```python\n{HE32_SOLUTION}```", HE32)
    assert out.reward == 1.0 and out.details["tests_total"] == 1, out
    out = await verify(verifier, "def find_zero(xs: list):\n    return 0.123\n", HE32)
    assert out.reward == 0.0


@needs_sandbox
async def test_humaneval_syntax_error_and_missing_function(verifier: CodeVerifier) -> None:
    out = await verify(verifier, "def has_close_elements(numbers, threshold)\n    return 1\n",
                       HE0)
    assert out.reward == 0.0
    assert "SyntaxError" in out.details["results"][0]["error"]
    out = await verify(verifier, "def other(x):\n    return x\n", {**HE0, "prompt": None})
    assert out.reward == 0.0 and "NameError" in out.reason


# --------------------------------------------------------------------------- MBPP


@needs_sandbox
async def test_mbpp_correct_partial_wrong(verifier: CodeVerifier) -> None:
    out = await verify(verifier, MBPP2["code"], MBPP2)
    assert out.reward == 1.0 and out.passed, out

    partial = "def similar_elements(a, b):\n    return (4, 5)\n"
    out = await verify(verifier, partial, MBPP2)
    assert out.reward == pytest.approx(1 / 3)
    assert [r["passed"] for r in out.details["results"]] == [True, False, False]
    assert "test 2/3 failed" in out.reason

    out = await verify(verifier, "def similar_elements(a, b):\n    return ()\n", MBPP2)
    assert out.reward == 0.0 and not out.passed


@needs_sandbox
async def test_mbpp_test_imports_and_setup_code(verifier: CodeVerifier) -> None:
    # No `import math` in the response: the tests' `math` comes from test_imports.
    out = await verify(verifier, "def volume_sphere(r):\n    return 4 / 3 * 3.141592653589793 "
                       "* r ** 3\n", MBPP82)
    assert out.reward == 1.0, out
    row = {"test_list": ["assert add(X, 1) == 11", "assert add(X, X) == 20"],
           "test_setup_code": "X = 10"}
    out = await verify(verifier, "def add(a, b):\n    return a + b\n", row)
    assert out.reward == 1.0, out


@needs_sandbox
async def test_mbpp_json_string_fields_and_reference_fallback(verifier: CodeVerifier) -> None:
    # test_list given as a JSON string (string-only metadata transports).
    md = {"test_list": json.dumps(MBPP2["test_list"])}
    out = await verify(verifier, MBPP2["code"], md)
    assert out.reward == 1.0
    # No tests in metadata: the reference holds the row as JSON.
    out = await verify(verifier, MBPP2["code"], {}, reference=json.dumps(MBPP2))
    assert out.reward == 1.0 and out.details["tests_total"] == 3


# --------------------------------------------------------------------------- stdin/stdout


@needs_sandbox
async def test_apps_stdio_correct_partial_wrong(verifier: CodeVerifier) -> None:
    out = await verify(verifier, f"```python\n{APPS_OK}```", APPS_IO)
    assert out.reward == 1.0 and out.passed, out

    # Whitespace differences are ignored; sys.stdin.buffer and open(0) work.
    buf = ("import sys\nn, *a = map(int, sys.stdin.buffer.read().split())\n"
           "sys.stdout.write(f'{sum(a)}   {max(a)}')\n")
    assert (await verify(verifier, buf, APPS_IO)).reward == 1.0
    fd0 = "data = open(0).read().split()\na = list(map(int, data[1:]))\nprint(sum(a))\n" \
          "print(max(a))\n"
    assert (await verify(verifier, fd0, APPS_IO)).reward == 1.0

    # Wrong when the maximum is negative: 2 of 3 cases pass.
    partial = ("n = int(input())\na = list(map(int, input().split()))\n"
               "print(sum(a), max(a + [0]))\n")
    out = await verify(verifier, partial, APPS_IO)
    assert out.reward == pytest.approx(2 / 3)
    assert [r["passed"] for r in out.details["results"]] == [True, False, True]
    assert "wrong answer" in out.details["results"][1]["error"]

    out = await verify(verifier, "print(42)\n", APPS_IO)
    assert out.reward == 0.0


@needs_sandbox
async def test_apps_input_output_dict_and_sys_exit(verifier: CodeVerifier) -> None:
    md = {"input_output": json.loads(APPS_IO["input_output"])}
    sol = APPS_OK + "import sys\nsys.exit(0)\n"
    out = await verify(verifier, sol, md)
    assert out.reward == 1.0, out
    out = await verify(verifier, APPS_OK + "raise SystemExit(3)\n", md)
    assert out.reward == 0.0 and "SystemExit(3)" in out.reason


@needs_sandbox
async def test_apps_call_based(verifier: CodeVerifier) -> None:
    md = {"input_output": json.dumps({"fn_name": "twoSum",
                                      "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
                                      "outputs": [[[0, 1]], [[1, 2]]]})}
    sol = ("class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
           "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
           "                return [seen[target - x], i]\n            seen[x] = i\n")
    assert (await verify(verifier, sol, md)).reward == 1.0
    plain = "def twoSum(nums, target):\n    return (0, 1)\n"
    assert (await verify(verifier, plain, md)).reward == pytest.approx(0.5)


@needs_sandbox
async def test_codecontests_and_plain_lists(verifier: CodeVerifier) -> None:
    sol = ("t = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n"
           "    print(a + b)\n")
    out = await verify(verifier, sol, CC_ROW)
    assert out.reward == 1.0 and out.details["tests_total"] == 3, out
    out = await verify(verifier, sol.replace("a + b", "abs(a) + abs(b)"), CC_ROW)
    assert out.reward == pytest.approx(2 / 3)
    md = {"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]}
    out = await verify(verifier, "a, b = map(int, input().split())\nprint(a + b)", md)
    assert out.reward == 1.0


# --------------------------------------------------------------------------- fail closed


@needs_sandbox
async def test_os_exit_does_not_pass(verifier: CodeVerifier) -> None:
    out = await verify(verifier, "import os\nos._exit(0)\n", HE0)
    assert out.reward == 0.0 and not out.passed
    sol = "import os\ndef similar_elements(a, b):\n    os._exit(0)\n"
    out = await verify(verifier, sol, MBPP2)
    assert out.reward == 0.0
    out = await verify(verifier, APPS_OK + "import os\nos._exit(0)\n", APPS_IO)
    assert out.reward == 0.0


@needs_sandbox
async def test_forged_report_lines_do_not_pass(verifier: CodeVerifier) -> None:
    forged = (
        "import os, json\n"
        "for i in range(3):\n"
        "    line = json.dumps({'kind': 'test', 'i': i, 'ok': True, 'error': ''}) + '\\n'\n"
        "    for fd in range(1, 20):\n"
        "        try:\n"
        "            os.write(fd, line.encode())\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    )
    out = await verify(verifier, forged, MBPP2)
    assert out.reward == 0.0 and out.details["tests_passed"] == 0


# --------------------------------------------------------------------------- limits


@needs_sandbox
async def test_per_test_timeout_gives_partial_credit() -> None:
    v = CodeVerifier(VerifierServiceConfig(sandbox=SANDBOX.model_copy(
        update={"per_test_timeout_s": 0.5})))
    row = {"test_list": ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]}
    sol = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    t0 = time.monotonic()
    out = await verify(v, sol, row)
    assert time.monotonic() - t0 < 5
    assert out.reward == pytest.approx(2 / 3)
    assert "timed out" in out.details["results"][1]["error"]


@needs_sandbox
async def test_deadline_is_respected(verifier: CodeVerifier) -> None:
    # The code disables the per-test alarm; the item's deadline still bounds the run.
    sol = ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
           "def similar_elements(a, b):\n    while True:\n        pass\n")
    t0 = time.monotonic()
    out = await verify(verifier, sol, MBPP2, timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5
    assert out.reward == 0.0
    assert out.details["violation"] == "wall_timeout"
    assert out.reason.startswith("wall_timeout")


@needs_sandbox
async def test_resource_violations_are_reported(verifier: CodeVerifier) -> None:
    row = {"test_list": ["assert f() == 1"]}
    cases = {
        "memory_limit": "def f():\n    x = bytearray(4 * 1024**3)\n    return 1\n",
        "network_blocked": "import socket\ndef f():\n    socket.create_connection(('127.0.0.1',"
                           " 80), timeout=1)\n    return 1\n",
        "write_blocked": "def f():\n    open('/etc/nebula-code-test', 'w').write('x')\n"
                         "    return 1\n",
        "process_limit": "import os\ndef f():\n    while True:\n        os.fork()\n",
    }
    for violation, sol in cases.items():
        out = await verify(verifier, sol, row)
        assert out.reward == 0.0, (violation, out)
        assert out.details["violation"] == violation, (violation, out)
        assert out.reason.startswith(violation)
    # A correct run right after.
    out = await verify(verifier, "def f():\n    return 1\n", row)
    assert out.reward == 1.0 and out.details["violation"] is None


@needs_sandbox
async def test_user_output_does_not_confuse_the_report(verifier: CodeVerifier) -> None:
    sol = ("import sys\nprint('noise', '{\"kind\": \"done\"}')\nprint('err', file=sys.stderr)\n"
           "def similar_elements(a, b):\n    print('inside')\n"
           "    return tuple(sorted(set(a) & set(b)))\n")
    out = await verify(verifier, sol, MBPP2)
    assert out.reward == 1.0, out
    assert "err" in out.details["stderr_tail"]


# --------------------------------------------------------------------------- input errors


async def test_input_errors(verifier: CodeVerifier) -> None:
    with pytest.raises(VerifierInputError, match="test_list"):
        await verify(verifier, "print(1)", {})
    with pytest.raises(VerifierInputError, match="test_list"):
        await verify(verifier, "print(1)", {"unrelated": 1}, reference="42")
    with pytest.raises(VerifierInputError, match="entry_point"):
        await verify(verifier, "def f(): pass", {"test": HE0["test"]})
    with pytest.raises(VerifierInputError, match="input_output"):
        await verify(verifier, "print(1)", {"input_output": "{not json"})
    with pytest.raises(VerifierInputError, match="2 inputs but 1 outputs"):
        await verify(verifier, "print(1)", {"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(VerifierInputError, match="test_list"):
        await verify(verifier, "print(1)", {"test_list": [1, 2]})
    with pytest.raises(VerifierInputError, match="entry_point"):
        await verify(verifier, "x", {"test": HE0["test"], "entry_point": "not a name"})


# --------------------------------------------------------------------------- no sandbox


async def test_refuses_without_sandbox() -> None:
    cfg = VerifierServiceConfig(sandbox=SandboxConfig(bwrap="/nonexistent/bwrap"))
    v = CodeVerifier(cfg)
    with pytest.raises(RuntimeError, match="code sandbox unavailable: bubblewrap not found.*"
                                           "allow_unsandboxed=true"):
        await verify(v, MBPP2["code"], MBPP2)


async def test_unsandboxed_when_allowed() -> None:
    cfg = VerifierServiceConfig(sandbox=SandboxConfig(bwrap="/nonexistent/bwrap",
                                                      allow_unsandboxed=True))
    v = CodeVerifier(cfg)
    out = await verify(v, MBPP2["code"], MBPP2)
    assert out.reward == 1.0 and out.details["sandboxed"] is False
    out = await verify(v, "def similar_elements(a, b):\n    return (4, 5)\n", MBPP2)
    assert out.reward == pytest.approx(1 / 3)
