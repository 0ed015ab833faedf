"""Distilled samples: parse, decide keep or filter from judge verdicts, build train rows.

Pure: plain Python over rows. Row contract: reads GENERATED rows plus `scores` and `verdicts`
(one (name, passed, label, reason) per judge view); writes rows of the DISTILLED schema.
"""

from __future__ import annotations

from collections import Counter

from dafactory.tasks.distill.reasoning import FORCED_CLOSE, OK, TRUNCATED, completion_text, parse_reasoning
from dafactory.tasks.generate.generation import assistant, messages


def parse_rows(rows: list[dict]) -> list[dict]:
    """Adds reasoning, answer, parse_status and the text each judge view reads."""
    out = []
    for r in rows:
        p = parse_reasoning(r["response"], r["finish_reason"])
        out.append(
            dict(
                r,
                reasoning=p.reasoning,
                answer=p.answer,
                parse_status=p.status,
                parse_detail=p.detail,
                views={
                    "full": completion_text(p.reasoning or "", p.answer or ""),
                    "answer": p.answer or "",
                    "reasoning": p.reasoning or "",
                },
            )
        )
    return out


def judgeable(row: dict, keep_cut_answers: bool = False) -> bool:
    """Whether a parsed sample goes to the judges: it parsed, or (`keep_cut_answers`) its reasoning closed
    and its answer was cut at the budget."""
    return row["parse_status"] == OK or (keep_cut_answers and row["parse_status"] == TRUNCATED
                                         and row["answer"] is not None)


def filter_reason(row: dict, keep_forced_close: bool = True,
                  keep_cut_answers: bool = False) -> tuple[str, str | None] | None:
    """None to keep; else (countable reason, detail). Every judge view must pass; a sample whose reasoning
    budget forcing closed is dropped unless `keep_forced_close`, one whose answer was cut unless
    `keep_cut_answers` (its parse status comes first)."""
    if not judgeable(row, keep_cut_answers):
        return row["parse_status"], row["parse_detail"]
    if row.get("reasoning_forced_close") and not keep_forced_close:
        return FORCED_CLOSE, f"reasoning closed at the budget of {row['reasoning_tokens']} tokens"
    for name, passed, label, reason in row["verdicts"]:
        if passed is None:
            return f"{name}: no verdict", reason
        if not passed:
            return f"{name}: {label or 'failed'}", reason
    return None


def distill_rows(rows: list[dict], student_system_prompt: str | None, keep_forced_close: bool = True,
                 keep_cut_answers: bool = False) -> tuple[list[dict], list[dict], Counter]:
    """(train rows, filtered rows, filtered counts by reason)."""
    train, filtered, counts = [], [], Counter()
    for r in rows:
        why = filter_reason(r, keep_forced_close, keep_cut_answers)
        ok = why is None
        out = {
            "prompt": messages(r["prompt"], student_system_prompt),
            "completion": assistant(completion_text(r["reasoning"], r["answer"])) if ok else None,
            "prompt_id": r["prompt_id"],
            "category": r["category"],
            "sample_idx": r["sample_idx"],
            "teacher": r["model"],
            "teacher_revision": r["model_revision"],
            "seed": r["seed"],
            "response": r["response"],
            "reasoning": r["reasoning"],
            "answer": r["answer"],
            "parse_status": r["parse_status"],
            "finish_reason": r["finish_reason"],
            "prompt_tokens": r["prompt_tokens"],
            "response_tokens": r["response_tokens"],
            "reasoning_forced_close": r.get("reasoning_forced_close") or False,
            "reasoning_tokens": r.get("reasoning_tokens"),
            "answer_tokens": r.get("answer_tokens"),
            "scores": r["scores"],
            "filter_reason": None if ok else why[0] + (f" ({why[1]})" if why[1] else ""),
        }
        if ok:
            train.append(out)
        else:
            filtered.append(out)
            counts[why[0]] += 1
    return train, filtered, counts


def forced_close_counts(train: list[dict], filtered: list[dict]) -> Counter:
    """Samples whose reasoning budget forcing closed: in all, and of them those kept in train; and samples
    kept in train with their answer cut (keep_cut_answers)."""
    counts = Counter(reasoning_forced_close=sum(1 for r in train + filtered if r["reasoning_forced_close"]),
                     reasoning_forced_close_in_train=sum(1 for r in train if r["reasoning_forced_close"]),
                     answer_cut_in_train=sum(1 for r in train if r["finish_reason"] == "length"))
    return +counts  # zeros left out
