"""`math`: is the response's final answer mathematically equal to the reference?

math-verify extracts the answer (\\boxed{}, "the final answer is", else the last
expression/number) and compares symbolically, so 0.5, \\frac{1}{2} and 1/2 agree, and sets
and intervals compare as such. Its own timeouts use signal.alarm, which only works on a
main thread; we disable them because the service's pool enforces each item's deadline by
killing the worker process instead.
"""

from __future__ import annotations

import logging

from verifier.api import Outcome, Verifier, VerifierInputError, VerifyInput

logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is disabled" notice


class MathVerifier(Verifier):
    name = "math"
    version = "1+math-verify-0.9"
    description = "Final-answer equivalence with math-verify (LaTeX or plain-text reference)."

    def __init__(self, config=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        self._extract = [LatexExtractionConfig(), ExprExtractionConfig()]

    def _parse(self, text: str) -> list:
        from math_verify import parse

        return parse(text, extraction_config=self._extract, parsing_timeout=None)

    def parse_reference(self, reference: str) -> list:
        ref = reference.strip()
        # A bare LaTeX reference ("\frac{1}{2}") has no delimiters for the LaTeX extractor.
        if "$" not in ref and "\\boxed" not in ref and "\\[" not in ref:
            gold = self._parse(f"${ref}$")
            if gold:
                return gold
        return self._parse(ref)

    def verify(self, item: VerifyInput) -> Outcome:
        from math_verify import verify

        reference = item.reference or str(item.metadata.get("answer", ""))
        if not reference.strip():
            raise VerifierInputError("reference is empty: math needs the expected answer")
        gold = self.parse_reference(reference)
        if not gold:
            raise VerifierInputError(f"reference {reference[:80]!r} has no parsable answer")
        pred = self._parse(item.response)
        details = {"reference_parsed": str(gold[-1])}
        if not pred:
            return Outcome(0.0, False, "no final answer found in the response", details)
        details["extracted"] = str(pred[-1])
        ok = bool(verify(gold, pred, timeout_seconds=None))
        reason = "" if ok else f"answer {pred[-1]!s} is not equal to {gold[-1]!s}"
        return Outcome(1.0 if ok else 0.0, ok, reason, details)
