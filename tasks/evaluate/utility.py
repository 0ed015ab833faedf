"""Utility benchmarks (the paper's utility cost): GSM8K-style exact-match answers and MMLU-style
multiple choice. Pure: prompt formats, answer extraction and checking.
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"

GSM8K_INSTRUCTION = "Solve the problem. End your reply with the final answer as '#### <number>'."
MMLU_INSTRUCTION = "Answer with the letter of the correct choice."


def gsm8k_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{GSM8K_INSTRUCTION}"


def gsm8k_reference(answer: str) -> str:
    """GSM8K's answer field ends with '#### <number>'."""
    return answer.split("####")[-1].strip().replace(",", "")


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> float | None:
    """The number after the last '####', else the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = re.findall(_NUMBER, tail) or re.findall(_NUMBER, text)
    if not found:
        return None
    try:
        return float(found[-1 if "####" not in text else 0].replace("$", "").replace(",", ""))
    except ValueError:
        return None


def gsm8k_correct(response: str, reference: str) -> bool:
    got = extract_number(response)
    try:
        return got is not None and abs(got - float(reference)) < 1e-6
    except ValueError:
        return False


def mmlu_prompt(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", MMLU_INSTRUCTION])


def mmlu_reference(answer, n_choices: int) -> str:
    """MMLU's answer is an index (0-3) or a letter."""
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:n_choices]:
        return answer.strip().upper()
    return LETTERS[int(answer)]


def extract_choice(text: str, n_choices: int = 4) -> str | None:
    letters = LETTERS[:n_choices]
    patterns = (
        (rf"answer\s*(?:is|:)?\s*\(?([{letters}])\)?\b", re.IGNORECASE),  # "The answer is (B)", "Answer: b"
        (rf"^\s*\(?([{letters}])[\).:]", re.MULTILINE),  # "B. ..." or "(B)" at the start of a line
        (rf"^\s*([{letters}])\s*$", re.MULTILINE),  # a bare letter on a line
        (rf"\b([{letters}])\b", 0),  # the first standalone capital letter anywhere
    )
    for pattern, flags in patterns:
        m = re.search(pattern, text, flags=flags)
        if m:
            return m.group(1).upper()
    return None


def mmlu_correct(response: str, reference: str, n_choices: int = 4) -> bool:
    return extract_choice(response, n_choices) == reference


def is_correct(kind: str, response: str, reference: str, n_choices: int = 4) -> bool:
    return gsm8k_correct(response, reference) if kind == "gsm8k" else mmlu_correct(response, reference, n_choices)
