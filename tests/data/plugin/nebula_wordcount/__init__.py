"""A third-party verifier: the response has exactly `reference` words."""

from verifier.api import Outcome, Verifier, VerifierInputError, VerifyInput


class WordCountVerifier(Verifier):
    name = "wordcount"
    version = "0.0.1"
    description = "Response has exactly N words (N = reference)."

    def verify(self, item: VerifyInput) -> Outcome:
        if not item.reference.strip().isdigit():
            raise VerifierInputError("reference must be a word count")
        n, want = len(item.response.split()), int(item.reference)
        return Outcome(float(n == want), n == want, "" if n == want else f"{n} words, want {want}",
                       {"words": n})
