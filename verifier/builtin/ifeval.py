"""IFEval instruction-following verifier.

Takes rows of the public IFEval dataset (google/IFEval) as they are: the item's metadata holds
the row's `instruction_id_list`, `kwargs` and `prompt`, and the response is checked against
each instruction the way google-research `instruction_following_eval` does, with both its
strict and loose scores. The reward is the strict fraction of instructions followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifier.api import Outcome, Verifier, VerifierInputError, VerifyInput
from verifier.builtin import ifeval_checks, ifeval_checks_format
from verifier.builtin.ifeval_checks import Builder, Predicate

# Every supported instruction id -> its checker builder. Public so callers (the service's
# verifier listing, dataset validation) can ask which ids exist.
INSTRUCTION_CHECKERS: dict[str, Builder] = dict(
    sorted({**ifeval_checks.CHECKS, **ifeval_checks_format.CHECKS}.items())
)

# repeat_prompt needs the original prompt; the dataset carries it in the instruction's kwargs,
# but a row trimmed to the essentials may only have the top-level `prompt`.
_PROMPT_FALLBACK_KWARG: dict[str, str] = {"combination:repeat_prompt": "prompt_to_repeat"}


def loose_variants(response: str) -> list[str]:
    """The original's eight loose readings of a response: as is, without its first line,
    without its last line, without both, and each of those with every '*' removed. They
    forgive a chatty preamble ("Sure, here it is:"), a sign-off, and markdown emphasis."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    bases = [response, without_first, without_last, without_both]
    return bases + [b.replace("*", "") for b in bases]


def _followed(predicate: Predicate, response: str) -> bool:
    # A blank response follows nothing, whatever the instruction (the original's guard).
    return bool(response.strip()) and predicate(response)


def _clean_kwargs(raw: Any, index: int) -> dict[str, Any]:
    """One instruction's kwargs with the dataset's null placeholders dropped: HF rows give
    every instruction a dict with all 24 possible keys, the unused ones null."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise VerifierInputError(
            f"metadata.kwargs[{index}] must be a dict, got {type(raw).__name__}"
        )
    return {str(k): v for k, v in raw.items() if v is not None}


class IFEvalVerifier(Verifier):
    name = "ifeval"
    version = "1"
    description = (
        "IFEval instruction following (google/IFEval rows: metadata.instruction_id_list, "
        "metadata.kwargs, metadata.prompt). Reward = fraction of instructions followed "
        "strictly; details also give the loose score."
    )

    def _predicates(self, metadata: Mapping[str, Any]) -> tuple[list[str], list[Predicate]]:
        """Validates the row and builds one predicate per instruction; raises
        VerifierInputError naming the bad field."""
        ids = metadata.get("instruction_id_list")
        if ids is None:
            raise VerifierInputError("metadata.instruction_id_list is missing")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise VerifierInputError("metadata.instruction_id_list must be a list of strings")
        if not ids:
            # With no instruction there is nothing to score; a reward would be meaningless.
            raise VerifierInputError("metadata.instruction_id_list is empty")

        raw_kwargs = metadata.get("kwargs")
        if raw_kwargs is None:
            # Instructions without arguments need no kwargs; the others fail below, by name.
            raw_kwargs = [{} for _ in ids]
        if not isinstance(raw_kwargs, list):
            raise VerifierInputError("metadata.kwargs must be a list of dicts")
        if len(raw_kwargs) != len(ids):
            raise VerifierInputError(
                f"metadata.kwargs has {len(raw_kwargs)} entries but "
                f"metadata.instruction_id_list has {len(ids)}; they must align"
            )

        unknown = [i for i in ids if i not in INSTRUCTION_CHECKERS]
        if unknown:
            raise VerifierInputError(
                f"metadata.instruction_id_list has unknown instruction ids {unknown}; "
                f"known ids: {sorted(INSTRUCTION_CHECKERS)}"
            )

        prompt = metadata.get("prompt")
        predicates: list[Predicate] = []
        for index, (instruction_id, raw) in enumerate(zip(ids, raw_kwargs, strict=True)):
            kwargs = _clean_kwargs(raw, index)
            fallback = _PROMPT_FALLBACK_KWARG.get(instruction_id)
            if fallback and fallback not in kwargs and isinstance(prompt, str):
                kwargs[fallback] = prompt
            try:
                predicates.append(INSTRUCTION_CHECKERS[instruction_id](kwargs))
            except VerifierInputError as exc:
                raise VerifierInputError(
                    f"metadata.kwargs[{index}] ({instruction_id}): {exc}"
                ) from exc
        return ids, predicates

    def verify(self, item: VerifyInput) -> Outcome:
        if not isinstance(item.response, str):
            raise VerifierInputError("response must be a string")
        if not isinstance(item.metadata, Mapping):
            raise VerifierInputError("metadata must be a dict")
        ids, predicates = self._predicates(item.metadata)

        response = item.response
        variants = loose_variants(response)
        strict = [_followed(p, response) for p in predicates]
        loose = [any(_followed(p, v) for v in variants) for p in predicates]

        strict_fraction = sum(strict) / len(ids)
        loose_fraction = sum(loose) / len(ids)
        failed = [i for i, ok in zip(ids, strict, strict=True) if not ok]
        reason = ""
        if failed:
            reason = f"not followed: {', '.join(failed)}"
            loose_only = [i for i, s, lo in zip(ids, strict, loose, strict=True) if lo and not s]
            if loose_only:
                reason += f" (followed loosely: {', '.join(loose_only)})"
        return Outcome(
            reward=strict_fraction,
            passed=not failed,
            reason=reason,
            details={
                "instructions": list(ids),
                "strict": strict,
                "loose": loose,
                "strict_fraction": strict_fraction,
                "loose_fraction": loose_fraction,
            },
        )
