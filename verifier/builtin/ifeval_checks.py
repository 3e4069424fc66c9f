"""IFEval instruction checkers, part 1: shared helpers plus the keyword, language, length and
content instructions.

Each instruction is a *builder*: it takes the instruction's kwargs (one dict of an IFEval row's
`kwargs` list, None values already dropped), validates them once, and returns a predicate over
a response. Validation is separate from checking because the loose score runs every predicate
on up to eight variants of the response, and because a malformed row must be reported as an
input error even when the response is empty.

Semantics follow google-research `instruction_following_eval` (instructions.py and
instructions_util.py); where this module deviates, a comment says why.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

from verifier.api import VerifierInputError

# langdetect samples n-grams at random; a fixed seed makes the same response always get the
# same language, so a reward never flips between two runs.
DetectorFactory.seed = 0

Kwargs = Mapping[str, Any]
Predicate = Callable[[str], bool]
Builder = Callable[[Kwargs], Predicate]

RELATIONS: tuple[str, str] = ("less than", "at least")


# --------------------------------------------------------------------------- kwarg helpers
# The original picks a *random* value when a kwarg is missing or out of range (it doubles as
# the prompt generator). For scoring that would make rewards non-deterministic, so here a
# missing or invalid kwarg is an input error that names it.


def require(kw: Kwargs, name: str) -> Any:
    """The kwarg's value, or an input error naming the missing kwarg."""
    if name not in kw or kw[name] is None:
        raise VerifierInputError(f"missing required kwarg {name!r}")
    return kw[name]


def require_int(kw: Kwargs, name: str, minimum: int = 0) -> int:
    """An integer kwarg. JSON round-trips (HF parquet -> JSON) turn 300 into 300.0, and some
    pipelines stringify numbers, so integral floats and digit strings are accepted."""
    value = require(kw, name)
    number: int
    if isinstance(value, bool):  # bool is an int subclass but never a count
        raise VerifierInputError(f"kwarg {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.0*)?\s*", value):
        number = int(float(value))
    else:
        raise VerifierInputError(f"kwarg {name!r} must be an integer, got {value!r}")
    if number < minimum:
        raise VerifierInputError(f"kwarg {name!r} must be >= {minimum}, got {number}")
    return number


def require_str(kw: Kwargs, name: str, *, strip: bool = True) -> str:
    """A non-empty string kwarg (stripped, as the original strips most of its string args)."""
    value = require(kw, name)
    if not isinstance(value, str):
        raise VerifierInputError(f"kwarg {name!r} must be a string, got {value!r}")
    text = value.strip() if strip else value
    if not text.strip():
        raise VerifierInputError(f"kwarg {name!r} must be a non-empty string")
    return text


def require_str_list(kw: Kwargs, name: str) -> list[str]:
    """A non-empty list of strings; a lone string is taken as a one-element list."""
    value = require(kw, name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
        raise VerifierInputError(f"kwarg {name!r} must be a non-empty list of strings")
    return list(value)


def require_relation(kw: Kwargs, name: str) -> str:
    """One of the two IFEval comparison relations."""
    value = require(kw, name)
    if value not in RELATIONS:
        raise VerifierInputError(f"kwarg {name!r} must be one of {list(RELATIONS)}, got {value!r}")
    return str(value)


def compare(actual: int, relation: str, threshold: int) -> bool:
    """`less than` is strict (<), `at least` is >=, as in the original."""
    return actual < threshold if relation == RELATIONS[0] else actual >= threshold


# --------------------------------------------------------------------------- text helpers

_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of \\w+ runs: what nltk's RegexpTokenizer(r"\\w+") returns, without nltk."""
    return len(_WORD_RE.findall(text))


# The abbreviation patterns of the original's regex sentence splitter.
_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = (
    r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s"
    r"|However\s|That\s|This\s|Wherever)"
)
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"
_MULTIPLE_DOTS = r"\.{2,}"


def split_into_sentences(text: str) -> list[str]:
    """The original's regex splitter: periods that are not sentence ends (titles, initials,
    decimals, domains, acronyms, ellipses) are masked as <prd>, real ends get a <stop>."""
    text = f" {text}  ".replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    # An ellipsis ends a sentence once, not once per dot.
    text = re.sub(_MULTIPLE_DOTS, lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    if "Ph.D" in text:
        text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(
        _ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]",
        "\\1<prd>\\2<prd>\\3<prd>",
        text,
    )
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)
    # Move terminal punctuation outside closing quotes so the stop lands after the quote.
    text = text.replace(".\u201d", "\u201d.").replace('."', '".')
    text = text.replace('!"', '"!').replace('?"', '"?')
    for mark in ".?!":
        text = text.replace(mark, mark + "<stop>")
    text = text.replace("<prd>", ".")
    sentences = [s.strip() for s in text.split("<stop>")]
    if sentences and not sentences[-1]:
        sentences = sentences[:-1]
    return sentences


def count_sentences(text: str) -> int:
    """Sentence count via the regex splitter (the original uses nltk's punkt model here)."""
    return len(split_into_sentences(text))


def detect_language(text: str) -> str | None:
    """ISO 639-1 code langdetect assigns, or None when it cannot tell (no letters etc.)."""
    try:
        return str(detect(text))
    except LangDetectException:
        return None


# --------------------------------------------------------------------------- keywords
# Keywords are matched literally (re.escape). The original feeds them to `re` as patterns;
# for the plain words in the dataset that is the same, and escaping keeps a keyword such as
# "C++" or a crafted pattern from raising or back-tracking for minutes in a worker.


def keywords_existence(kw: Kwargs) -> Predicate:
    keywords = require_str_list(kw, "keywords")
    patterns = [re.compile(re.escape(k), re.IGNORECASE) for k in keywords]
    return lambda response: all(p.search(response) for p in patterns)


def keywords_frequency(kw: Kwargs) -> Predicate:
    pattern = re.compile(re.escape(require_str(kw, "keyword")), re.IGNORECASE)
    frequency = require_int(kw, "frequency")
    relation = require_relation(kw, "relation")
    return lambda response: compare(len(pattern.findall(response)), relation, frequency)


def keywords_forbidden_words(kw: Kwargs) -> Predicate:
    words = sorted(set(require_str_list(kw, "forbidden_words")))
    # Whole words only: "cat" is not forbidden inside "category".
    patterns = [re.compile(r"\b" + re.escape(w) + r"\b", re.IGNORECASE) for w in words]
    return lambda response: not any(p.search(response) for p in patterns)


def keywords_letter_frequency(kw: Kwargs) -> Predicate:
    letter = require_str(kw, "letter").lower()
    if len(letter) != 1:
        raise VerifierInputError(f"kwarg 'letter' must be a single letter, got {letter!r}")
    frequency = require_int(kw, "let_frequency")
    relation = require_relation(kw, "let_relation")

    def check(response: str) -> bool:
        counts = collections.Counter(response.lower())
        return compare(counts[letter], relation, frequency)

    return check


# --------------------------------------------------------------------------- language


def language_response_language(kw: Kwargs) -> Predicate:
    language = require_str(kw, "language")

    def check(response: str) -> bool:
        detected = detect_language(response)
        # Undetectable text counts as followed, as in the original.
        return detected is None or detected == language

    return check


# --------------------------------------------------------------------------- length


def length_number_sentences(kw: Kwargs) -> Predicate:
    threshold = require_int(kw, "num_sentences")
    relation = require_relation(kw, "relation")
    return lambda response: compare(count_sentences(response), relation, threshold)


def length_number_words(kw: Kwargs) -> Predicate:
    threshold = require_int(kw, "num_words")
    relation = require_relation(kw, "relation")
    return lambda response: compare(count_words(response), relation, threshold)


_DIVIDER_RE = re.compile(r"\s?\*\*\*\s?")


def length_number_paragraphs(kw: Kwargs) -> Predicate:
    expected = require_int(kw, "num_paragraphs")

    def check(response: str) -> bool:
        paragraphs = _DIVIDER_RE.split(response)
        count = len(paragraphs)
        for index, paragraph in enumerate(paragraphs):
            if paragraph.strip():
                continue
            # A divider at the very start or end is tolerated; an empty paragraph between
            # two dividers means the layout is wrong.
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
        return count == expected

    return check


_FIRST_WORD_STOP = frozenset(".,?!'\"")


def length_nth_paragraph_first_word(kw: Kwargs) -> Predicate:
    expected_count = require_int(kw, "num_paragraphs")
    nth = require_int(kw, "nth_paragraph", minimum=1)
    if nth > expected_count:
        raise VerifierInputError(
            f"kwarg 'nth_paragraph' ({nth}) must be <= 'num_paragraphs' ({expected_count})"
        )
    first_word = require_str(kw, "first_word").lower()

    def check(response: str) -> bool:
        paragraphs = response.split("\n\n")
        count = sum(1 for p in paragraphs if p.strip())
        # As in the original, the nth paragraph is indexed in the raw split (empty pieces
        # included) while the count skips empty pieces.
        if nth > count:
            return False
        paragraph = paragraphs[nth - 1].strip()
        if not paragraph:
            return False
        word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
        letters: list[str] = []
        for char in word:
            if char in _FIRST_WORD_STOP:
                break
            letters.append(char.lower())
        return count == expected_count and "".join(letters) == first_word

    return check


# --------------------------------------------------------------------------- content

_PLACEHOLDER_RE = re.compile(r"\[.*?\]")


def content_number_placeholders(kw: Kwargs) -> Predicate:
    minimum = require_int(kw, "num_placeholders")
    return lambda response: len(_PLACEHOLDER_RE.findall(response)) >= minimum


def content_postscript(kw: Kwargs) -> Predicate:
    marker = require_str(kw, "postscript_marker")
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        # Literal, unlike the original's raw pattern where "P.S" would match "pos" in
        # "purpose" because '.' is a wildcard.
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    compiled = re.compile(pattern, re.MULTILINE)
    return lambda response: compiled.search(response.lower()) is not None


CHECKS: dict[str, Builder] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
}
