"""IFEval instruction checkers, part 2: format, combination, start/end, case and punctuation.

Same builder contract as `ifeval_checks` (kwargs in, validated once, predicate out).
"""

from __future__ import annotations

import json
import re

from verifier.builtin.ifeval_checks import (
    Builder,
    Kwargs,
    Predicate,
    compare,
    detect_language,
    require_int,
    require_relation,
    require_str,
)

# --------------------------------------------------------------------------- detectable_format

# A bullet is a line starting with "*" (but not "**", which is bold) or with "-".
_STAR_BULLET_RE = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_DASH_BULLET_RE = re.compile(r"^\s*-.*$", re.MULTILINE)


def format_number_bullet_lists(kw: Kwargs) -> Predicate:
    expected = require_int(kw, "num_bullets")

    def check(response: str) -> bool:
        found = len(_STAR_BULLET_RE.findall(response)) + len(_DASH_BULLET_RE.findall(response))
        return found == expected  # exactly, not at least

    return check


CONSTRAINED_RESPONSE_OPTIONS: tuple[str, ...] = (
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
)


def format_constrained_response(kw: Kwargs) -> Predicate:
    # Containment, not equality: the original accepts the option anywhere in the response.
    def check(response: str) -> bool:
        stripped = response.strip()
        return any(option in stripped for option in CONSTRAINED_RESPONSE_OPTIONS)

    return check


_SINGLE_HIGHLIGHT_RE = re.compile(r"\*[^\n\*]*\*")
_DOUBLE_HIGHLIGHT_RE = re.compile(r"\*\*[^\n\*]*\*\*")


def format_number_highlighted_sections(kw: Kwargs) -> Predicate:
    minimum = require_int(kw, "num_highlights")

    def check(response: str) -> bool:
        # Both *x* and **x** count, each only when it has non-blank content; the single-star
        # scan sees "**" pairs as empty and skips them, so bold text is counted once.
        count = sum(1 for h in _SINGLE_HIGHLIGHT_RE.findall(response) if h.strip("*").strip())
        count += sum(
            1
            for h in _DOUBLE_HIGHLIGHT_RE.findall(response)
            if h.removeprefix("**").removesuffix("**").strip()
        )
        return count >= minimum

    return check


def format_multiple_sections(kw: Kwargs) -> Predicate:
    splitter = require_str(kw, "section_spliter")  # sic: the dataset's spelling
    minimum = require_int(kw, "num_sections")
    # "SECTION 1", "Section2": the splitter followed by a number. Escaped so a splitter such
    # as "PART." is matched literally.
    pattern = re.compile(r"\s?" + re.escape(splitter) + r"\s?\d+\s?")
    return lambda response: len(pattern.split(response)) - 1 >= minimum


def format_json_format(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        # Markdown code fences are allowed around the JSON (the prompt says so).
        text = (
            response.strip()
            .removeprefix("```json")
            .removeprefix("```Json")
            .removeprefix("```JSON")
            .removeprefix("```")
            .removesuffix("```")
            .strip()
        )
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    return check


_TITLE_RE = re.compile(r"<<[^\n]+>>")


def format_title(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        return any(t.lstrip("<").rstrip(">").strip() for t in _TITLE_RE.findall(response))

    return check


# --------------------------------------------------------------------------- combination

TWO_RESPONSES_SEPARATOR = "******"


def combination_two_responses(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        pieces = response.split(TWO_RESPONSES_SEPARATOR)
        answers: list[str] = []
        for index, piece in enumerate(pieces):
            if piece.strip():
                answers.append(piece)
            elif index not in (0, len(pieces) - 1):
                return False  # an empty answer between two separators
        return len(answers) == 2 and answers[0].strip() != answers[1].strip()

    return check


def combination_repeat_prompt(kw: Kwargs) -> Predicate:
    # The verifier fills prompt_to_repeat from the row's `prompt` when the kwargs lack it.
    expected = require_str(kw, "prompt_to_repeat").lower()
    return lambda response: response.strip().lower().startswith(expected)


# --------------------------------------------------------------------------- startend


def startend_end_checker(kw: Kwargs) -> Predicate:
    end_phrase = require_str(kw, "end_phrase").lower()
    # A closing quote after the phrase is tolerated (the original strips '"' from both ends).
    return lambda response: response.strip().strip('"').lower().endswith(end_phrase)


def startend_quotation(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        text = response.strip()
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'

    return check


# --------------------------------------------------------------------------- change_case

# An approximation of nltk.word_tokenize without nltk: whitespace chunks are cut at the
# punctuation the Treebank tokenizer splits off, and contractions are split like Treebank does
# ("DON'T" -> "DO", "N'T"; "I'M" -> "I", "'M"). Hyphens and inner periods stay inside the
# word ("WELL-KNOWN", "U.S."), so each counts once, as with nltk.
_TOKEN_SPLIT_RE = re.compile(r"\.\.\.|--|[,;:!?@#$%&()\[\]{}<>\"`\u201c\u201d\u2018\u2019]")
_CONTRACTION_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


def word_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for chunk in text.split():
        for piece in _TOKEN_SPLIT_RE.split(chunk):
            piece = piece.strip("'")
            if not piece:
                continue
            match = _CONTRACTION_RE.match(piece)
            tokens.extend(match.groups() if match else (piece,))
    return tokens


def change_case_capital_word_frequency(kw: Kwargs) -> Predicate:
    frequency = require_int(kw, "capital_frequency")
    relation = require_relation(kw, "capital_relation")

    def check(response: str) -> bool:
        # str.isupper: at least one cased character and no lowercase one ("I" and "AI-2" count).
        capitals = sum(1 for token in word_tokens(response) if token.isupper())
        return compare(capitals, relation, frequency)

    return check


def change_case_english_capital(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        if not response.isupper():
            return False
        detected = detect_language(response)
        return detected is None or detected == "en"  # undetectable counts as followed

    return check


def change_case_english_lowercase(kw: Kwargs) -> Predicate:
    def check(response: str) -> bool:
        if not response.islower():
            return False
        detected = detect_language(response)
        return detected is None or detected == "en"  # undetectable counts as followed

    return check


# --------------------------------------------------------------------------- punctuation


def punctuation_no_comma(kw: Kwargs) -> Predicate:
    # Only the ASCII comma, as in the original (a fullwidth or Arabic comma is not checked).
    return lambda response: "," not in response


CHECKS: dict[str, Builder] = {
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json_format,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "startend:quotation": startend_quotation,
    "change_case:capital_word_frequency": change_case_capital_word_frequency,
    "change_case:english_capital": change_case_english_capital,
    "change_case:english_lowercase": change_case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
}
