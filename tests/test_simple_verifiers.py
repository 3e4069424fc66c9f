from __future__ import annotations

import pytest

from verifier.api import VerifierInputError, VerifyInput
from verifier.builtin.simple import ExactVerifier, RegexVerifier


def test_exact_options() -> None:
    v = ExactVerifier()
    assert v.verify(VerifyInput("  Paris\n", "Paris")).passed
    assert not v.verify(VerifyInput("paris", "Paris")).passed
    assert v.verify(VerifyInput("paris", "Paris", {"ignore_case": True})).passed
    assert v.verify(VerifyInput("thinking...\nParis", "Paris", {"last_line_only": True})).passed
    assert not v.verify(VerifyInput("a  b", "a b", {"collapse_whitespace": False})).passed
    with pytest.raises(VerifierInputError, match="metadata.ignore_case"):
        v.verify(VerifyInput("a", "a", {"ignore_case": "yes"}))


def test_regex_search_fullmatch_and_errors() -> None:
    v = RegexVerifier()
    out = v.verify(VerifyInput("id: AB-123", metadata={"pattern": r"[A-Z]{2}-\d+"}))
    assert out.passed and out.details["match"] == "AB-123"
    assert not v.verify(VerifyInput("id: AB-123", metadata={"pattern": r"[A-Z]{2}-\d+",
                                                             "fullmatch": True})).passed
    assert v.verify(VerifyInput("YES", r"yes", {"ignore_case": True})).passed
    with pytest.raises(VerifierInputError, match="not a valid regex"):
        v.verify(VerifyInput("x", metadata={"pattern": "("}))
    with pytest.raises(VerifierInputError, match="metadata.pattern"):
        v.verify(VerifyInput("x"))
