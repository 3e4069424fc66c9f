"""Tests of the IFEval verifier: every instruction type followed and not followed, real-looking
dataset rows, strict vs loose scoring, and malformed input."""

from __future__ import annotations

from typing import Any

import pytest

from verifier.api import Outcome, VerifierInputError, VerifyInput
from verifier.builtin.ifeval import INSTRUCTION_CHECKERS, IFEvalVerifier, loose_variants

# The 24 kwarg keys of the HF google/IFEval dataset: every kwargs dict has all of them, null
# where the instruction does not use it.
HF_KWARG_KEYS = [
    "num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat",
    "num_bullets", "section_spliter", "num_sections", "capital_relation", "capital_frequency",
    "keywords", "num_paragraphs", "language", "let_relation", "letter", "let_frequency",
    "end_phrase", "forbidden_words", "keyword", "frequency", "num_sentences",
    "postscript_marker", "first_word", "nth_paragraph",
]  # fmt: skip

ALL_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words",
    "keywords:letter_frequency", "language:response_language",
    "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "startend:quotation",
    "change_case:capital_word_frequency", "change_case:english_capital",
    "change_case:english_lowercase", "punctuation:no_comma",
}  # fmt: skip

FRENCH = (
    "Bonjour à tous. Aujourd'hui nous allons parler de la cuisine française, qui est "
    "célèbre dans le monde entier pour ses fromages, ses vins et ses pâtisseries délicieuses."
)
ENGLISH = (
    "Hello everyone. Today we are going to talk about French cooking, which is famous all "
    "over the world for its cheeses, its wines and its delicious pastries."
)


def hf_kwargs(**used: Any) -> dict[str, Any]:
    """A kwargs dict as the HF dataset stores it: all keys, unused ones null."""
    row: dict[str, Any] = dict.fromkeys(HF_KWARG_KEYS)
    row.update(used)
    return row


def verify(
    response: str, ids: list[str], kwargs: list[dict[str, Any]] | None, **meta: Any
) -> Outcome:
    metadata: dict[str, Any] = {"instruction_id_list": ids, **meta}
    if kwargs is not None:
        metadata["kwargs"] = kwargs
    return IFEvalVerifier().verify(VerifyInput(response=response, metadata=metadata))


# (instruction id, kwargs, response, followed strictly?)
CASES: list[tuple[str, dict[str, Any], str, bool]] = [
    ("keywords:existence", {"keywords": ["banana", "Apple"]}, "I like apples and BANANAS.", True),
    ("keywords:existence", {"keywords": ["banana", "Apple"]}, "I like apples.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     "cat, Cat and CAT.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     "cat and dog.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     "one cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     "cat and cat.", False),
    # Whole words only: "category" does not contain the forbidden word "cat".
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "A category of birds.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "My Dog barks.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zebras zigzag.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Buzz.", False),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 2, "let_relation": "less than"},
     "Hello there.", True),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 2, "let_relation": "less than"},
     "Banana.", False),
    ("language:response_language", {"language": "fr"}, FRENCH, True),
    ("language:response_language", {"language": "fr"}, ENGLISH, False),
    # No letters: langdetect cannot tell, which counts as followed (original behaviour).
    ("language:response_language", {"language": "fr"}, "12345 !!!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two? Three.", False),
    # "Dr." and "3.5" do not end sentences: two sentences here.
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "Dr. Smith paid 3.5 dollars. He left.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith paid 3.5 dollars. He left.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB\n***\nC", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "A\n***\n***\nB\n***\nC", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", True),
    # \w+ tokens: "two-three" is two words, so four in all.
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two-three four", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"},
     "hi there", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
     'Intro here.\n\n"However, this.\n\nThe end.', True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
     "Intro here.\n\nBut this.\n\nThe end.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
     "Intro here.\n\nHowever this.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS bye", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s extra", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. extra", False),
    # Other markers are literal: "P.S" does not match the "pos" of "purpose".
    ("detectable_content:postscript", {"postscript_marker": "P.S"}, "The purpose is clear.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S"}, "Bye.\nP.S see you", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n- c", False),
    # A bold line is not a bullet.
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Bold**\n* a\n* b", True),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "Yes.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and ** ** and **", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo and bar", False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "{a: 1}", False),
    ("detectable_format:title", {}, "<<Ode to Joy>>\nLa la.", True),
    ("detectable_format:title", {}, "<< >> and <<split\ntitle>>", False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "A.\n******\n******\nB.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a POEM. Roses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "Here: Write a poem.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"Done. Any other questions?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Any other questions? Bye.", False),
    ("startend:quotation", {}, '  "Hello there."  ', True),
    ("startend:quotation", {}, 'Hello there."', False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY good", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is Very good", False),
    # nltk-style tokens: "I" counts, and "DON'T" is two capital tokens (DO, N'T).
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"},
     "I am fine", True),
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"},
     "We DON'T", False),
    ("change_case:english_capital", {},
     "THIS IS AN ENGLISH SENTENCE WRITTEN ENTIRELY IN CAPITAL LETTERS FOR THE TEST.", True),
    ("change_case:english_capital", {}, "THIS IS Mixed case.", False),
    ("change_case:english_capital", {}, FRENCH.upper(), False),
    ("change_case:english_lowercase", {},
     "this is an english sentence written entirely in lowercase letters for the test.", True),
    ("change_case:english_lowercase", {}, "This is English.", False),
    ("change_case:english_lowercase", {}, FRENCH.lower(), False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "Yes, commas.", False),
]  # fmt: skip


def test_registry_has_exactly_the_25_ifeval_ids() -> None:
    assert set(INSTRUCTION_CHECKERS) == ALL_IDS
    assert len(INSTRUCTION_CHECKERS) == 25


def test_cases_cover_every_id_both_ways() -> None:
    followed = {iid for iid, _, _, ok in CASES if ok}
    not_followed = {iid for iid, _, _, ok in CASES if not ok}
    assert followed == ALL_IDS
    assert not_followed == ALL_IDS


@pytest.mark.parametrize(("iid", "kwargs", "response", "expected"), CASES)
def test_instruction(iid: str, kwargs: dict[str, Any], response: str, expected: bool) -> None:
    outcome = verify(response, [iid], [kwargs])
    assert outcome.details["strict"] == [expected]
    assert outcome.reward == (1.0 if expected else 0.0)
    assert outcome.passed is expected
    assert outcome.details["instructions"] == [iid]
    if expected:
        assert outcome.reason == ""
        assert outcome.details["loose"] == [True]  # loose is never stricter than strict
    else:
        assert outcome.reason.startswith("not followed: ") and iid in outcome.reason


def test_blank_response_follows_nothing() -> None:
    # Even instructions a blank string would satisfy (no comma) fail, as in the original.
    outcome = verify("  \n ", ["punctuation:no_comma"], [{}])
    assert outcome.details["strict"] == [False]
    assert outcome.details["loose"] == [False]
    assert outcome.reward == 0.0


def test_language_detection_is_deterministic() -> None:
    short = "Ciao, come stai? Bene grazie."
    results = {verify(short, ["language:response_language"], [{"language": "it"}]).reward
               for _ in range(5)}  # fmt: skip
    assert len(results) == 1


def test_repeat_prompt_falls_back_to_row_prompt() -> None:
    prompt = "Tell me a joke about cats."
    ok = verify(f"{prompt} Why did the cat sit?", ["combination:repeat_prompt"],
                [hf_kwargs()], prompt=prompt)  # fmt: skip
    assert ok.details["strict"] == [True]
    bad = verify("Why did the cat sit?", ["combination:repeat_prompt"], [{}], prompt=prompt)
    assert bad.details["strict"] == [False]


def test_real_dataset_row_as_is() -> None:
    # google/IFEval key 1000, with the HF layout: all-key kwargs dicts, floats from JSON.
    row = {
        "key": 1000,
        "prompt": 'Write a 300+ word summary of the wikipedia page "https://en.wikipedia.org/'
        'wiki/Raymond_III,_Count_of_Tripoli". Do not use any commas and highlight at least 3 '
        "sections that has titles in markdown format, for example *highlighted section part "
        "1*, *highlighted section part 2*, *highlighted section part 3*.",
        "instruction_id_list": [
            "punctuation:no_comma",
            "detectable_format:number_highlighted_sections",
            "length_constraints:number_words",
        ],
        "kwargs": [
            hf_kwargs(),
            hf_kwargs(num_highlights=3.0),
            hf_kwargs(relation="at least", num_words=300.0),
        ],
    }
    filler = " ".join(["Raymond ruled Tripoli and fought for the crusader states."] * 12)
    good = f"*Early life*\n{filler}\n\n*Regency*\n{filler}\n\n*Legacy*\n{filler}"
    item = VerifyInput(response=good, metadata=row)
    outcome = IFEvalVerifier().verify(item)
    assert outcome.details["strict"] == [True, True, True]
    assert outcome.reward == 1.0 and outcome.passed and outcome.reason == ""

    short = "*Early life* Born in 1140, in Tripoli.\n*Regency* Ruled, then\nfought, then died."
    outcome = IFEvalVerifier().verify(VerifyInput(response=short, metadata=row))
    assert outcome.details["strict"] == [False, False, False]
    assert outcome.reward == 0.0
    assert outcome.reason == (
        "not followed: punctuation:no_comma, detectable_format:number_highlighted_sections, "
        "length_constraints:number_words"
    )


def test_dataset_row_with_prompt_to_repeat_in_kwargs() -> None:
    prompt = "Write a story about a dog. First repeat the request word for word without change."
    row = {
        "instruction_id_list": ["combination:repeat_prompt", "change_case:capital_word_frequency"],
        "kwargs": [
            hf_kwargs(prompt_to_repeat="Write a story about a dog."),
            hf_kwargs(capital_relation="less than", capital_frequency=4.0),
        ],
        "prompt": prompt,
    }
    outcome = IFEvalVerifier().verify(
        VerifyInput(response="Write a story about a dog. Rex was a GOOD boy.", metadata=row)
    )
    assert outcome.details["strict"] == [True, True]
    outcome = IFEvalVerifier().verify(
        VerifyInput(response="Rex was a VERY VERY GOOD BOY.", metadata=row)
    )
    assert outcome.details["strict"] == [False, False]
    assert outcome.reward == 0.0


def test_partial_reward_and_reason() -> None:
    outcome = verify(
        "<<Title>>\nhello, world\nbye, now",
        ["detectable_format:title", "punctuation:no_comma", "keywords:existence"],
        [{}, {}, {"keywords": ["world"]}],
    )
    assert outcome.details["strict"] == [True, False, True]
    assert outcome.reward == pytest.approx(2 / 3)
    assert outcome.details["strict_fraction"] == pytest.approx(2 / 3)
    assert not outcome.passed
    assert outcome.reason == "not followed: punctuation:no_comma"


def test_loose_forgives_preamble_and_asterisks() -> None:
    response = 'Sure, here it is:\n"Roses are red."\nBye. **Any other questions?**'
    outcome = verify(
        response,
        ["startend:quotation", "startend:end_checker", "keywords:existence"],
        [{}, {"end_phrase": "Any other questions?"}, {"keywords": ["roses"]}],
    )
    # Quotation needs the first AND last line removed; the end phrase needs '*' stripped.
    assert outcome.details["strict"] == [False, False, True]
    assert outcome.details["loose"] == [True, True, True]
    assert outcome.reward == pytest.approx(1 / 3)
    assert outcome.details["loose_fraction"] == 1.0
    assert outcome.reason == (
        "not followed: startend:quotation, startend:end_checker "
        "(followed loosely: startend:quotation, startend:end_checker)"
    )


def test_loose_json_after_preamble() -> None:
    outcome = verify('Here is the JSON:\n{"ok": true}', ["detectable_format:json_format"], [{}])
    assert outcome.details["strict"] == [False]
    assert outcome.details["loose"] == [True]
    assert outcome.reward == 0.0 and not outcome.passed


def test_loose_variants_are_the_originals_eight() -> None:
    variants = loose_variants("a*\nb*\nc*")
    assert variants == ["a*\nb*\nc*", "b*\nc*", "a*\nb*", "b*", "a\nb\nc", "b\nc", "a\nb", "b"]


def test_numbers_as_floats_and_strings_are_coerced() -> None:
    outcome = verify("one two three", ["length_constraints:number_words"],
                     [{"num_words": "3", "relation": "at least"}])  # fmt: skip
    assert outcome.details["strict"] == [True]
    outcome = verify("one two", ["length_constraints:number_words"],
                     [{"num_words": 3.0, "relation": "at least"}])  # fmt: skip
    assert outcome.details["strict"] == [False]


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ({}, "instruction_id_list is missing"),
        ({"instruction_id_list": "punctuation:no_comma"}, "instruction_id_list must be a list"),
        ({"instruction_id_list": [1]}, "instruction_id_list must be a list"),
        ({"instruction_id_list": []}, "instruction_id_list is empty"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": {}},
         "metadata.kwargs must be"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]},
         "metadata.kwargs has 2 entries"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": ["x"]},
         "metadata.kwargs[0] must be a dict"),
    ],
)  # fmt: skip
def test_malformed_rows(metadata: dict[str, Any], needle: str) -> None:
    with pytest.raises(VerifierInputError) as info:
        IFEvalVerifier().verify(VerifyInput(response="hi", metadata=metadata))
    assert needle in str(info.value)


def test_unknown_id_lists_known_ids() -> None:
    with pytest.raises(VerifierInputError) as info:
        verify("hi", ["punctuation:no_comma", "keywords:nonsense"], [{}, {}])
    message = str(info.value)
    assert "'keywords:nonsense'" in message
    assert "known ids" in message and "startend:quotation" in message


@pytest.mark.parametrize(
    ("iid", "kwargs", "needle"),
    [
        ("length_constraints:number_words", hf_kwargs(relation="at least"), "'num_words'"),
        ("length_constraints:number_words", {"num_words": 5}, "'relation'"),
        ("keywords:existence", hf_kwargs(), "'keywords'"),
        ("detectable_content:postscript", {}, "'postscript_marker'"),
        ("combination:repeat_prompt", {}, "'prompt_to_repeat'"),
        ("length_constraints:number_words", {"num_words": 2.5, "relation": "at least"},
         "must be an integer"),
        ("length_constraints:number_words", {"num_words": 5, "relation": "at most"},
         "must be one of"),
        ("keywords:letter_frequency",
         {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
         "single letter"),
        ("length_constraints:nth_paragraph_first_word",
         {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}, "'nth_paragraph'"),
    ],
)  # fmt: skip
def test_bad_kwargs_are_named(iid: str, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(VerifierInputError) as info:
        verify("some response", [iid], [kwargs])
    message = str(info.value)
    assert needle in message
    assert message.startswith(f"metadata.kwargs[0] ({iid}):")


def test_missing_kwargs_list_is_fine_for_argless_instructions() -> None:
    outcome = verify('"Quoted"', ["startend:quotation", "punctuation:no_comma"], None)
    assert outcome.details["strict"] == [True, True]
    with pytest.raises(VerifierInputError, match="'num_words'"):
        verify("x", ["length_constraints:number_words"], None)


def test_verifier_metadata() -> None:
    assert IFEvalVerifier.name == "ifeval"
    assert IFEvalVerifier.version
    assert "IFEval" in IFEvalVerifier.description
