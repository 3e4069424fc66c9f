"""`exact` and `regex`: verifiers for simple tasks with a literal or patterned answer."""

from __future__ import annotations

import re

from verifier.api import Outcome, Verifier, VerifierInputError, VerifyInput


def _flag(metadata: dict, key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise VerifierInputError(f"metadata.{key} must be true or false, got {value!r}")
    return value


class ExactVerifier(Verifier):
    """Response equals the reference after trimming; metadata options:
    ignore_case (false), collapse_whitespace (true), last_line_only (false)."""

    name = "exact"
    version = "1"
    description = "Exact string match with the reference (trimmed; options in metadata)."

    def verify(self, item: VerifyInput) -> Outcome:
        md = item.metadata
        response, reference = item.response, item.reference
        if _flag(md, "last_line_only", False):
            lines = response.strip().splitlines()
            response = lines[-1] if lines else ""
        if _flag(md, "collapse_whitespace", True):
            response, reference = " ".join(response.split()), " ".join(reference.split())
        response, reference = response.strip(), reference.strip()
        if _flag(md, "ignore_case", False):
            response, reference = response.casefold(), reference.casefold()
        ok = response == reference
        return Outcome(float(ok), ok, "" if ok else "response differs from the reference",
                       {"compared": response[:200]})


class RegexVerifier(Verifier):
    """The response matches the pattern in metadata.pattern (or the reference).
    metadata.fullmatch (false) anchors it; metadata.ignore_case (false)."""

    name = "regex"
    version = "1"
    description = "Python regular expression (metadata.pattern or the reference) matches."

    def verify(self, item: VerifyInput) -> Outcome:
        pattern = item.metadata.get("pattern", item.reference)
        if not isinstance(pattern, str) or not pattern:
            raise VerifierInputError("regex needs metadata.pattern or a reference pattern")
        flags = re.IGNORECASE if _flag(item.metadata, "ignore_case", False) else 0
        try:
            rx = re.compile(pattern, flags)
        except re.error as e:
            raise VerifierInputError(f"pattern is not a valid regex: {e}") from e
        m = rx.fullmatch(item.response.strip()) if _flag(item.metadata, "fullmatch", False) \
            else rx.search(item.response)
        ok = m is not None
        return Outcome(float(ok), ok, "" if ok else "pattern did not match",
                       {"match": m.group(0)[:200] if m else None})
