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
from dafactory.tasks.screen.spill import Batched, Vectors, signed

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
    # the kept prompts' vectors (semantic dedup), each with its (prompt id, source row), on local disk
    _vectors: Vectors = field(default_factory=Vectors)

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
        semantic = None
        if self.semantic is not None and vectors is not None:
            semantic = _SemanticBatch(self._vectors, vectors, self.semantic)
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
            if found is None and semantic is not None:
                found = semantic.find(i, (r.prompt_id, r.source_row))
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
        if semantic is not None:
            semantic.flush()
        return kept

    def close(self) -> None:
        """Remove what the screen keeps on disk (the input is screened); the counts stay for summary()."""
        self._normalised.store.close()
        self._vectors.close()
        if self.minhash is not None:
            self.minhash.close()

    def summary(self) -> dict:
        """The counts as the manifest holds them: contaminated by method and set, duplicates by method."""
        out: dict = {"contaminated": {}, "near_duplicate": {}}
        for key, n in sorted(self.counts.items()):
            if key[0] == "contaminated":
                out["contaminated"].setdefault(key[1], {})[key[2]] = n
            else:
                out["near_duplicate"][key[1]] = n
        return out


class _SemanticBatch:
    """Semantic dedup of one batch: each vector against every kept one, those of earlier batches (on disk,
    compared in one pass for the whole batch) and this batch's kept so far, in input order."""

    def __init__(self, store: Vectors, vectors: np.ndarray, threshold: float):
        self.store, self.vectors, self.threshold = store, vectors, threshold
        self.disk_index, self.disk_cos = store.best(vectors)
        self.disk_values = store.value(self.disk_index[self.disk_cos >= threshold - 1e-6])
        self.kept: list[int] = []  # this batch's kept rows
        self.values: list = []

    def find(self, i: int, value):
        v = self.vectors[i]
        j, c = int(self.disk_index[i]), float(self.disk_cos[i])
        source = self.disk_values.get(j)
        if self.kept:
            sims = self.vectors[self.kept] @ v
            k = int(sims.argmax())
            if sims[k] > c:
                c, source = float(sims[k]), self.values[k]
        if c >= self.threshold - 1e-6:
            return "semantic", tuple(source), f"cosine {c:.3f} >= {self.threshold:g}"
        self.kept.append(i)
        self.values.append(value)
        return None

    def flush(self) -> None:
        self.store.add(self.vectors[self.kept], self.values)
