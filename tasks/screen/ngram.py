"""Word n-gram decontamination against evaluation prompts, and the normalisation dedup shares. Pure: no
Prefect, Ray or torch.

- `normalize`: case, punctuation and whitespace folded (the screen's first dedup rule compares it).
- Contamination (as STAR-1 checked it): a training prompt sharing one word n-gram (n = 8) with any
  evaluation prompt; a prompt shorter than n words is contaminated if it equals an evaluation prompt
  after normalising.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from functools import lru_cache

from dafactory.tasks.config import PromptSource
from dafactory.tasks.io.prompts import (
    BUNDLED_BENCHMARKS,
    PromptRow,
    bundled,
    load_prompts,
)


def words(text: str) -> list[str]:
    return re.sub(r"[^\w]+", " ", text.lower()).split()


def normalize(text: str) -> str:
    return " ".join(words(text))


def _quarantine(r: PromptRow, reason: str, detail: str) -> dict:
    return {"prompt_id": r.prompt_id, "source_row": r.source_row, "prompt": r.prompt[:200], "reason": reason, "detail": detail}


@lru_cache(maxsize=8)
def eval_prompts(name: str) -> tuple[str, ...]:
    if name in BUNDLED_BENCHMARKS:
        filename, column = BUNDLED_BENCHMARKS[name]
        csv.field_size_limit(sys.maxsize)  # DAN prompts run to 55k characters
        with bundled(filename).open(encoding="utf-8", newline="") as f:
            return tuple(row[column] for row in csv.DictReader(f) if row[column].strip())
    return tuple(r.prompt for r in load_prompts(PromptSource(path=name)).rows)


def _h(gram: tuple[str, ...]) -> bytes:
    return hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest()


class Decontaminator:
    def __init__(self, eval_sets: list[str], n: int = 8):
        self.n = n
        self.grams: dict[bytes, str] = {}  # n-gram hash -> eval set name
        self.short: dict[str, str] = {}
        for name in eval_sets:
            for text in eval_prompts(name):
                w = words(text)
                if len(w) < n:
                    self.short.setdefault(" ".join(w), name)
                for i in range(len(w) - n + 1):
                    self.grams.setdefault(_h(tuple(w[i : i + n])), name)

    def match(self, text: str) -> str | None:
        """Why `text` is contaminated, or None."""
        hit = self.which(text)
        return hit[1] if hit else None

    def which(self, text: str) -> tuple[str, str] | None:
        """(the evaluation set, why) when `text` is contaminated, else None."""
        w = words(text)
        if len(w) < self.n:
            name = self.short.get(" ".join(w))
            return (name, f"equals a prompt of {name}") if name else None
        for i in range(len(w) - self.n + 1):
            gram = tuple(w[i : i + self.n])
            name = self.grams.get(_h(gram))
            if name:
                return name, f"shares the {self.n}-gram {' '.join(gram)!r} with {name}"
        return None

    def split(self, rows: list[PromptRow]) -> tuple[list[PromptRow], list[dict]]:
        kept, dropped = [], []
        for r in rows:
            why = self.match(r.prompt)
            if why:
                dropped.append(_quarantine(r, "contaminated", why))
            else:
                kept.append(r)
        return kept, dropped
