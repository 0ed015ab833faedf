"""Teacher prompts under a safety spec, and parsing teacher output into reasoning and answer.

Pure: no Prefect, Ray or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dafactory.tasks.distill.spec import BENIGN, Spec
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.prompts import PromptRow, bundled

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Parse outcomes other than OK exclude the sample; the reason is recorded.
OK, TRUNCATED, NO_THINK_CLOSE, EMPTY_ANSWER = "ok", "truncated", "missing_think_close", "empty_answer"
FORCED_CLOSE = "forced_close"  # filter reason of a sample budget forcing closed, under keep_forced_close: false


def load_template(path: str | None) -> tuple[str, str]:
    """(template text, where it came from). The template must have a {prompt} slot."""
    if path is None:
        source, text = "bundled teacher_template.md", bundled("teacher_template.md").read_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"teacher template not found: {path}")
        source, text = str(p), p.read_text()
    if "{prompt}" not in text:
        raise UserError(f"teacher template {source} has no {{prompt}} slot")
    return text, source


@dataclass(frozen=True)
class TeacherPrompt:
    """Builds the teacher's conversation for a prompt; the assistant turn is opened with <think>."""

    template: str
    spec: Spec
    missing_category: str = "error"  # or "benign": rows without a category use the benign policy
    prefill: str = THINK_OPEN + "\n"
    # Budget forcing (sampling.reasoning_budget): what ends the reasoning, and what closes one that reached its
    # budget open: the template asks for </think> on its own line, then the answer.
    reasoning_close: str = THINK_CLOSE
    forced_close: str = "\n" + THINK_CLOSE + "\n\n"

    def categories(self, row: PromptRow) -> tuple[str, ...]:
        if row.categories:
            return row.categories
        if self.missing_category == BENIGN:
            return (BENIGN,)
        raise UserError(
            f"prompt at source row {row.source_row} has no category; "
            "set missing_category: benign to use the benign policy for such rows"
        )

    def check(self, row: PromptRow) -> None:
        for c in self.categories(row):
            self.spec.policy_for(c)

    def __call__(self, row: PromptRow) -> list[dict]:
        policies = [self.spec.policy_for(c) for c in self.categories(row)]
        named = ", ".join(dict.fromkeys(f"{p.title} ({p.key})" for p in policies))
        text = (
            self.template.replace("{spec}", self.spec.render())
            .replace("{categories}", named)
            .replace("{prompt}", row.prompt)  # last: a prompt may itself contain "{spec}"
        )
        return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class Parsed:
    reasoning: str | None
    answer: str | None
    status: str
    detail: str | None = None


def parse_reasoning(text: str, finish_reason: str) -> Parsed:
    """Split teacher output into reasoning and answer.

    The template opened <think>, so normally only </think> appears; a model that writes <think> again
    is tolerated. Output cut at max_new_tokens is excluded even when it has </think>: its answer may be
    cut too.
    """
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    head, sep, tail = body.partition(THINK_CLOSE)
    if finish_reason == "length":
        # a closed reasoning is a string, empty or not ("" never becomes "None" in a completion)
        return Parsed(head.strip() if sep else head.strip() or None, tail.strip() or None, TRUNCATED,
                      "stopped at max_new_tokens")
    if not sep:
        return Parsed(head.strip() or None, None, NO_THINK_CLOSE, "no </think> before the end of the output")
    answer = tail.strip()
    if not answer:
        return Parsed(head.strip(), None, EMPTY_ANSWER, "nothing after </think>")
    return Parsed(head.strip(), answer, OK)


def completion_text(reasoning: str | None, answer: str | None) -> str:
    """The training completion: <think>reasoning</think>answer; a missing part is written empty."""
    return f"{THINK_OPEN}{reasoning or ''}{THINK_CLOSE}{answer or ''}"
