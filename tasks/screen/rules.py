"""The screen every training recipe runs over its input batches before planning. Pure: the encoder is
passed in as a function (texts -> unit vectors), so this module needs neither torch nor a model.

Per batch, in this order (STAR-1's, then NeMo Curator's):
1. decontamination: a prompt sharing a word n-gram with an evaluation prompt, or whose embedding cosine to
   one reaches the threshold, is quarantined `contaminated`; the detail names the set, the row and the cosine;
2. dedup over the whole input (every earlier batch): equal after normalising, then MinHash LSH, then
   (optionally) embedding cosine; a duplicate is quarantined `near_duplicate` with the source row it
   duplicates, and its categories go to that row (through the planner's `late` map, since that row may be
   spilled already).
`counts` holds what each rule dropped: ("contaminated", method, eval set) and ("near_duplicate", method).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from dafactory.tasks.io.prompts import PromptRow, PromptSet, prompt_id
from dafactory.tasks.screen.minhash import NearDuplicateIndex
from dafactory.tasks.screen.ngram import Decontaminator, normalize
from dafactory.tasks.screen.spill import Batched, signed

Encode = Callable[[list[str]], np.ndarray]


@dataclass
class EvalVectors:
    name: str
    texts: tuple[str, ...]
    vectors: np.ndarray  # unit vectors, one row per text


def quarantined(r: PromptRow, reason: str, detail: str) -> dict:
    return {"prompt_id": r.prompt_id, "source_row": r.source_row, "prompt": r.prompt[:200], "reason": reason,
            "detail": detail}


@dataclass
class Screen:
    check: Callable[[PromptRow], None] | None = None  # raises UserError on a row the recipe cannot take
    ngram: Decontaminator | None = None
    eval_vectors: list[EvalVectors] = field(default_factory=list)
    threshold: float = 0.7  # cosine to an evaluation prompt
    normalised: bool = True
    minhash: NearDuplicateIndex | None = None
    semantic: float | None = None  # cosine between training prompts
    encode: Encode | None = None
    encoder_name: str = ""
    counts: Counter = field(default_factory=Counter)
    # normalised text's hash -> (prompt id, source row) of its first row, on local disk (spill.py)
    _normalised: Batched = field(default_factory=lambda: Batched(2))
    _kept_vectors: np.ndarray | None = None  # the kept prompts' vectors (semantic dedup), capacity doubling
    _kept: list = field(default_factory=list)  # (prompt id, source row) of each kept vector

    def __call__(self, prompts: PromptSet, late: dict[str, tuple[str, ...]]) -> PromptSet:
        rows, quarantine = list(prompts.rows), list(prompts.quarantine)
        if self.check is not None:
            for r in rows:
                self.check(r)
        rows = self._ngram(rows, quarantine)
        vectors = self.encode([r.prompt for r in rows]) if rows and self.encode is not None else None
        keep = self._embedding(rows, vectors, quarantine)
        rows = [r for r, k in zip(rows, keep) if k]
        vectors = None if vectors is None else vectors[np.asarray(keep, dtype=bool)]
        rows = self._dedup(rows, vectors, quarantine, late)
        return PromptSet(rows=rows, quarantine=quarantine, duplicates=prompts.duplicates,
                         source_rows=prompts.source_rows)

    def _ngram(self, rows: list[PromptRow], quarantine: list[dict]) -> list[PromptRow]:
        if self.ngram is None:
            return rows
        kept = []
        for r in rows:
            hit = self.ngram.which(r.prompt)
            if hit is None:
                kept.append(r)
            else:
                self.counts["contaminated", f"ngram{self.ngram.n}", hit[0]] += 1
                quarantine.append(quarantined(r, "contaminated", hit[1]))
        return kept

    def _embedding(self, rows, vectors, quarantine) -> list[bool]:
        keep = [True] * len(rows)
        if vectors is None or not self.eval_vectors:
            return keep
        best = np.full(len(rows), -1.0)
        where: list = [None] * len(rows)
        for ev in self.eval_vectors:
            sims = vectors @ ev.vectors.T
            j = sims.argmax(axis=1)
            c = sims[np.arange(len(rows)), j]
            for i in np.flatnonzero(c > best).tolist():
                best[i], where[i] = c[i], (ev, int(j[i]))
        for i in np.flatnonzero(best >= self.threshold - 1e-6).tolist():
            ev, j = where[i]
            keep[i] = False
            self.counts["contaminated", "embedding", ev.name] += 1
            quarantine.append(quarantined(rows[i], "contaminated", (
                f"cosine {best[i]:.3f} >= {self.threshold:g} ({self.encoder_name}) to {ev.name} row {j}: "
                f"{ev.texts[j][:80]!r}")))
        return keep

    def _dedup(self, rows, vectors, quarantine, late) -> list[PromptRow]:
        kept = []
        texts = [normalize(r.prompt) for r in rows]
        keys = [signed(int(prompt_id(t), 16)) for t in texts] if self.normalised else []
        if self.normalised:
            self._normalised.prefetch(keys)
        if self.minhash is not None:
            self.minhash.prepare(texts)
        for i, r in enumerate(rows):
            found = None
            if self.normalised:
                first = self._normalised.get(keys[i])
                if first is not None:
                    found = ("normalised", first, "equal after normalising")
                else:
                    self._normalised.setdefault(keys[i], (r.prompt_id, r.source_row))
            if found is None and self.minhash is not None:
                hit = self.minhash.find_at(i, (r.prompt_id, r.source_row))
                if hit is not None:
                    found = ("minhash", hit[0], f"MinHash Jaccard {hit[1]:.2f} >= {self.minhash.threshold:g}")
            if found is None and self.semantic is not None and vectors is not None:
                found = self._semantic(r, vectors[i])
            if found is None:
                kept.append(r)
                continue
            method, (first_id, first_row), why = found
            self.counts["near_duplicate", method] += 1
            quarantine.append(quarantined(r, "near_duplicate", f"duplicates source row {first_row} ({why})"))
            extra = tuple(c for c in r.categories if c not in late.get(first_id, ()))
            if extra:
                late[first_id] = late.get(first_id, ()) + extra
        if self.normalised:
            self._normalised.flush()
        if self.minhash is not None:
            self.minhash.flush()
        return kept

    def _semantic(self, r: PromptRow, v: np.ndarray):
        n = len(self._kept)
        if n:
            sims = self._kept_vectors[:n] @ v
            j = int(sims.argmax())
            if sims[j] >= self.semantic - 1e-6:
                return "semantic", self._kept[j], f"cosine {sims[j]:.3f} >= {self.semantic:g}"
        if self._kept_vectors is None or n == len(self._kept_vectors):
            grown = np.zeros((max(1024, 2 * n), v.shape[0]), dtype=np.float32)
            if n:
                grown[:n] = self._kept_vectors
            self._kept_vectors = grown
        self._kept_vectors[n] = v
        self._kept.append((r.prompt_id, r.source_row))
        return None

    def summary(self) -> dict:
        """The counts as the manifest holds them: contaminated by method and set, duplicates by method."""
        out: dict = {"contaminated": {}, "near_duplicate": {}}
        for key, n in sorted(self.counts.items()):
            if key[0] == "contaminated":
                out["contaminated"].setdefault(key[1], {})[key[2]] = n
            else:
                out["near_duplicate"][key[1]] = n
        return out
