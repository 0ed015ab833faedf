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
from importlib import resources

from tasks.config import BenchmarkSource, PromptSource
from tasks.errors import UserError
from tasks.prompts import PromptSet, decode_rows, read_raw

BUNDLED = {
    "strongreject": ("strongreject.csv", "forbidden_prompt"),
    "dan": ("dan_jailbreak_prompts_2023_12_25.csv", "prompt"),
}
WILDJAILBREAK = "wildjailbreak"
KNOWN = sorted([*BUNDLED, WILDJAILBREAK])


def source_of(b: BenchmarkSource) -> PromptSource:
    """Where the benchmark's prompts are, as a PromptSource (category column: WildJailbreak's data_type)."""
    if b.path is None:
        if b.name not in BUNDLED:
            raise UserError(f"benchmark {b.name!r} needs a path (bundled: {', '.join(sorted(BUNDLED))})")
        filename, column = BUNDLED[b.name]
        return PromptSource(path=str(resources.files("tasks.data") / filename), prompt_column=column, limit=b.limit)
    if b.name == WILDJAILBREAK:
        return PromptSource(path=b.path, prompt_column=b.prompt_column or "adversarial",
                            category_column="data_type", limit=None)
    return PromptSource(path=b.path, prompt_column=b.prompt_column or "prompt", limit=b.limit)


def _key(name: str):
    return lambda i, text: hashlib.sha256(f"{name}\x00{i}\x00{text}".encode()).hexdigest()[:16]


def load_benchmark(b: BenchmarkSource) -> PromptSet:
    if b.name == WILDJAILBREAK and b.path == "hub":
        raw, kinds = _wildjailbreak_from_hub()
    else:
        _, raw, kinds = read_raw(source_of(b))
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
    out = PromptSet(rows=[], quarantine=[], duplicates=0, source_rows=0)
    for s in sets:
        out.rows += s.rows
        out.quarantine += s.quarantine
        out.duplicates += s.duplicates
        out.source_rows += s.source_rows
    return out
