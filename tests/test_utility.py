"""Pure core: utility answers (GSM8K exact match, MMLU letters)."""

import pytest

from dafactory.tasks.evaluate.utility import (
    extract_choice,
    extract_number,
    gsm8k_correct,
    gsm8k_reference,
    mmlu_reference,
)


@pytest.mark.parametrize(
    "text, expect",
    [
        ("So she pays 3 * 4 = 12 dollars.\n#### 12", 12.0),  # the asked-for format
        ("The total is $1,234.50 in the end.", 1234.5),  # last number, with $ and thousands separator
        ("#### -7 (after 3 steps)", -7.0),  # the number right after ####, not a later one
        ("no numbers here", None),
    ],
)
def test_extract_number(text, expect):
    assert extract_number(text) == expect


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("... so 18 eggs.\n#### 18", "Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 18", True),
        ("#### 18.0", "#### 18", True),
        ("The answer is 1,000", "#### 1000", True),
        ("#### 17", "#### 18", False),
        ("I cannot help with that.", "#### 18", False),
    ],
)
def test_gsm8k_correct(response, answer, correct):
    assert gsm8k_correct(response, gsm8k_reference(answer)) is correct


@pytest.mark.parametrize(
    "text, expect",
    [
        ("The answer is (C).", "C"),
        ("Answer: b", "B"),
        ("D. Paris is the capital", "D"),
        ("I think\nA\n", "A"),
        ("Probably option B because A is wrong", "B"),
        ("None of these", None),
    ],
)
def test_extract_choice(text, expect):
    assert extract_choice(text) == expect


def test_mmlu_reference():
    assert (mmlu_reference(2, 4), mmlu_reference("b", 4)) == ("C", "B")


def test_an_article_is_not_a_choice():
    assert extract_choice("I think a good answer needs more context") is None
