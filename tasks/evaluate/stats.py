"""Uncertainty of ASR: paired bootstrap intervals over prompts and the exact McNemar test against
first-sample. Pure: numpy and plain Python (no scipy, Prefect, Ray or torch).

A strategy's outcome on a benchmark is one 0/1 value per prompt (1: the selected candidate was judged
unsafe), aligned with first-sample's by `prompt_id`. The bootstrap resamples prompt indices with
replacement and applies the same resample to both vectors, so the drop's interval keeps the pairing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from dafactory.tasks.score.strategies import FIRST, Strategy, choose, group_by

# Columns this module fills in an `asr` / `asr_by_layer` row (tasks/io/schemas.py ASR).
UNCERTAINTY_FIELDS = (
    "asr_ci_low", "asr_ci_high", "drop_ci_low", "drop_ci_high", "drop_ci_skipped",
    "mcnemar_b", "mcnemar_c", "mcnemar_p",
)

# Bootstrap index draws per chunk (resamples x prompts), so a large benchmark never holds the full matrix.
_CHUNK = 2_000_000


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: 2 * P(X <= min(b, c)) for
    X ~ Binomial(b + c, 1/2), capped at 1; 1 when there is no discordant pair."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: exact up to the final rounding, whatever n


def _vector(values: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: need a non-empty 1-D vector of 0/1 outcomes")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{what}: outcomes must be 0 or 1")
    return arr


def discordant(first: Sequence[int], other: Sequence[int]) -> tuple[int, int]:
    """(b, c): prompts unsafe under first-sample but safe under the strategy, and the reverse."""
    f, o = _vector(first, "first"), _vector(other, "other")
    if f.size != o.size:
        raise ValueError(f"paired outcomes differ in length: {f.size} and {o.size}")
    return int(((f == 1) & (o == 0)).sum()), int(((f == 0) & (o == 1)).sum())


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The equal-tailed percentile interval (linear interpolation between order statistics)."""
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(first: Sequence[int], other: Sequence[int], resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Percentile intervals for the strategy's ASR (%) and its relative drop against first-sample,
    (ASR_first - ASR) / ASR_first, from `resamples` paired resamples of the prompts.

    The drop is undefined in a resample where first-sample's ASR is 0: such resamples are left out of the
    drop's interval and counted in `drop_ci_skipped`; when every resample is left out the interval is None.
    The draws depend only on (seed, number of prompts), so every strategy of a benchmark sees the same ones.
    """
    f, o = _vector(first, "first"), _vector(other, "other")
    if f.size != o.size:
        raise ValueError(f"paired outcomes differ in length: {f.size} and {o.size}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    n = f.size
    rng = np.random.default_rng(seed)
    f_hits, o_hits = np.empty(resamples, np.int64), np.empty(resamples, np.int64)
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - start), n))
        f_hits[start:start + len(idx)] = f[idx].sum(axis=1)
        o_hits[start:start + len(idx)] = o[idx].sum(axis=1)
    asr = 100.0 * o_hits / n
    defined = f_hits > 0
    drop = (f_hits[defined] - o_hits[defined]) / f_hits[defined]  # the 100/n of both ASRs cancels
    asr_low, asr_high = percentile_interval(asr, confidence)
    drop_low, drop_high = percentile_interval(drop, confidence) if drop.size else (None, None)
    return {"asr_ci_low": asr_low, "asr_ci_high": asr_high, "drop_ci_low": drop_low, "drop_ci_high": drop_high,
            "drop_ci_skipped": int(resamples - defined.sum())}


def unsafe_by_prompt(candidates: list[dict], strategies: list[Strategy], seed: int = 0) -> dict[str, dict]:
    """benchmark -> strategy name -> prompt_id -> 1 if the candidate the strategy selects is judged unsafe.
    First-sample is always included (the reference of every comparison). Selection is `choose`, the same
    rule `asr_table` counts with."""
    out: dict[str, dict] = {}
    for (bench, pid), group in group_by(candidates, "benchmark", "prompt_id").items():
        per_strategy = out.setdefault(bench, {})
        for st in (FIRST, *strategies):
            selected, _ = choose(group, st, seed)
            per_strategy.setdefault(st.name, {})[pid] = int(not selected["judge_safe"])
    return out


def uncertainty(first: Mapping[str, int], other: Mapping[str, int], resamples: int = 1000, seed: int = 0,
                confidence: float = 0.95) -> dict:
    """Every UNCERTAINTY_FIELDS value for one strategy, from per-prompt outcomes keyed by prompt_id."""
    if set(first) != set(other):
        raise ValueError(f"strategy and first-sample outcomes cover different prompts "
                         f"({len(set(first) ^ set(other))} differ)")
    pids = sorted(first)
    f, o = [first[p] for p in pids], [other[p] for p in pids]
    b, c = discordant(f, o)
    return {**paired_bootstrap(f, o, resamples, seed, confidence), "mcnemar_b": b, "mcnemar_c": c,
            "mcnemar_p": mcnemar_exact(b, c)}


def add_uncertainty(rows: list[dict], outcomes: dict[str, dict], resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> list[dict]:
    """Fill UNCERTAINTY_FIELDS in `asr_table` rows (in place; returned) from `unsafe_by_prompt` outcomes."""
    for r in rows:
        per_strategy = outcomes[r["benchmark"]]
        other = per_strategy[r["strategy"]]
        if sum(other.values()) != r["unsafe"]:  # both come from `choose`: a mismatch is a bug, not data
            raise ValueError(f"{r['benchmark']}/{r['strategy']}: {sum(other.values())} unsafe prompts in the "
                             f"outcomes, {r['unsafe']} in the ASR row")
        r.update(uncertainty(per_strategy[FIRST.name], other, resamples, seed, confidence))
    return rows
