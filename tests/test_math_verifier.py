"""`math` built-in on the cases users hit: forms of the same number, boxed, sets, intervals."""

from __future__ import annotations

import pytest

from verifier.api import VerifierInputError, VerifyInput
from verifier.builtin.math import MathVerifier

V = MathVerifier()

CASES = [
    # (response, reference, expected)
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", True),          # fraction vs decimal
    ("So x = 0.5", "\\frac{1}{2}", True),                          # LaTeX reference, no $
    ("Therefore the answer is 3/4.", "0.75", True),                # plain "the answer is"
    ("First 12, then 13, finally 42", "42", True),                 # last number
    ("The answer is 41.", "42", False),                            # wrong
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", True),          # radicals
    ("$\\{3, 1, 2\\}$", "\\{1,2,3\\}", True),                        # sets, any order
    ("$\\{1, 2\\}$", "\\{1,2,3\\}", False),                          # set missing a member
    ("The solution set is $(0, 1]$", "(0,1]", True),               # interval
    ("\\boxed{(0,1)}", "[0,1)", False),                            # wrong endpoint
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),                        # expressions
    ("Final answer: $\\boxed{10\\%}$", "0.1", True),               # percent
    ("I could not solve it.", "5", False),                         # no answer at all
]


@pytest.mark.parametrize("response,reference,expected", CASES)
def test_math_cases(response: str, reference: str, expected: bool) -> None:
    out = V.verify(VerifyInput(response, reference))
    assert out.passed is expected, (out.reason, out.details)
    assert out.reward == (1.0 if expected else 0.0)


def test_details_show_what_was_compared() -> None:
    out = V.verify(VerifyInput("so \\boxed{7}", "8"))
    assert out.details["extracted"] == "7" and out.details["reference_parsed"] == "8"
    assert "not equal" in out.reason
    missing = V.verify(VerifyInput("no idea", "8"))
    assert missing.reason == "no final answer found in the response"


def test_reference_from_metadata_answer_and_bad_reference() -> None:
    assert V.verify(VerifyInput("\\boxed{9}", "", {"answer": 9})).passed
    with pytest.raises(VerifierInputError, match="reference is empty"):
        V.verify(VerifyInput("\\boxed{9}", ""))
