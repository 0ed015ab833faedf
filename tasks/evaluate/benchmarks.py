"""Safety benchmarks as prompt sets. Pure: no Prefect, Ray or torch.

- strongreject: the bundled StrongREJECT CSV (313 forbidden prompts, `forbidden_prompt`).
- dan: the bundled in-the-wild DAN jailbreak CSV, raw: all 1405 rows, duplicates and template
  placeholders included, as the paper evaluated them.
- wildjailbreak: allenai/wildjailbreak, config `eval`, rows with data_type `adversarial_harmful`
  (2000), prompt in `adversarial`. It is gated: give a local copy (`path`), or path `hub` to fetch it
  with `datasets` when you have access.
Every row's prompt_id hashes (benchmark, row, text), so equal prompts in two rows stay two prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from dafactory.tasks.config import BenchmarkSource, PromptSource
from dafactory.tasks.errors import UserError
from dafactory.tasks.evaluate.utility import gsm8k_prompt, gsm8k_reference, mmlu_prompt, mmlu_reference
from dafactory.tasks.io.prompts import BUNDLED_BENCHMARKS, PromptSet, bundled, decode_rows, read_raw
from dafactory.tasks.io.prompts import merge as merge_sets

WILDJAILBREAK = "wildjailbreak"


def source_of(b: BenchmarkSource) -> PromptSource:
    """Where the benchmark's prompts are, as a PromptSource (category column: WildJailbreak's data_type)."""
    if b.path is None:
        if b.name not in BUNDLED_BENCHMARKS:
            raise UserError(f"benchmark {b.name!r} needs a path (bundled: {', '.join(sorted(BUNDLED_BENCHMARKS))})")
        filename, column = BUNDLED_BENCHMARKS[b.name]
        return PromptSource(path=str(bundled(filename)), prompt_column=column, limit=b.limit)
    if b.name == WILDJAILBREAK:
        return PromptSource(path=b.path, prompt_column=b.prompt_column or "adversarial",
                            category_column="data_type", limit=None)
    if b.resolved_kind != "safety":
        return PromptSource(path=b.path, prompt_column=b.prompt_column or "question", category_column="answer",
                            limit=b.limit)
    return PromptSource(path=b.path, prompt_column=b.prompt_column or "prompt", limit=b.limit)


def _key(name: str):
    return lambda i, text: hashlib.sha256(f"{name}\x00{i}\x00{text}".encode()).hexdigest()[:16]


def load_benchmark(b: BenchmarkSource) -> PromptSet:
    """A benchmark's prompts; utility rows carry their reference answer."""
    if b.resolved_kind != "safety":
        return _load_utility(b)
    if b.name == WILDJAILBREAK and b.path == "hub":
        raw, kinds = _wildjailbreak_from_hub()
    else:
        raw, kinds = read_raw(source_of(b))
    if b.name == WILDJAILBREAK:
        keep = [i for i, k in enumerate(kinds) if (k.decode() if isinstance(k, bytes) else k) == "adversarial_harmful"]
        raw = [raw[i] for i in keep]
    if b.limit is not None:
        raw = raw[: b.limit]
    ps = decode_rows(raw, [b.name] * len(raw), key=_key(b.name), dedup=False)
    for q in ps.quarantine:
        q["detail"] = f"{b.name}: {q['detail']}"
    return ps


def _wildjailbreak_from_hub() -> tuple[list, list]:
    try:
        import datasets
    except ImportError:
        raise ImportError("loading WildJailbreak from the Hub needs `datasets`: pip install datasets") from None
    ds = datasets.load_dataset("allenai/wildjailbreak", "eval", split="train", delimiter="\t", keep_default_na=False)
    return list(ds["adversarial"]), list(ds["data_type"])


def merge(sets: list[PromptSet]) -> PromptSet:
    """One prompt set from several benchmarks; source rows are numbered across them, in order."""
    offset, shifted = 0, []
    for s in sets:
        shifted.append(PromptSet(
            rows=[replace(r, source_row=r.source_row + offset) for r in s.rows],
            quarantine=[q | {"source_row": q["source_row"] + offset} for q in s.quarantine],
            duplicates=s.duplicates, source_rows=s.source_rows,
        ))
        offset += s.source_rows
    return merge_sets(shifted)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load_utility(b: BenchmarkSource) -> PromptSet:
    """GSM8K-style (question, answer ending '#### n') or MMLU-style (question, choices, answer) rows."""
    src = source_of(b)
    questions, answers = read_raw(src)
    if b.resolved_kind == "mmlu":
        _, choices = read_raw(src.model_copy(update={"category_column": "choices"}))
        texts = [mmlu_prompt(_text(q), [_text(c) for c in ch]) for q, ch in zip(questions, choices)]
        refs = [mmlu_reference(a, len(ch)) for a, ch in zip(answers, choices)]
        sizes = [len(ch) for ch in choices]
    else:
        texts = [gsm8k_prompt(_text(q)) for q in questions]
        refs = [gsm8k_reference(_text(a)) for a in answers]
        sizes = [0] * len(texts)
    if b.limit is not None:
        texts, refs, sizes = texts[: b.limit], refs[: b.limit], sizes[: b.limit]
    ps = decode_rows(texts, [b.name] * len(texts), key=_key(b.name), dedup=False)
    ps.rows = [replace(r, reference=(b.resolved_kind, refs[r.source_row], sizes[r.source_row])) for r in ps.rows]
    return ps
