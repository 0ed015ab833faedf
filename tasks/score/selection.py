"""Best-of-N selection and chosen/rejected pairs. Pure: plain Python over candidate rows.

Row contract: reads prompt_id, sample_idx, prompt, category, response, finish_reason, scores (and
judge_safe for safe/unsafe pairs and judge_safe_first: True, False, or None when the judge gave no
verdict); writes selection_score, is_best, pair_role on candidates, and rows of the PAIRS and BEST schemas.

The best candidate is the strategy's choice (tasks/strategies.py: a signal's argmax/argmin, first
sample, seeded random, judge-safe-first); with safe/unsafe pairs, the strategy's choice among the
judge-safe candidates only (no best when none is safe: the prompt is counted as no_judge_safe_candidate),
so SFT on `best` never learns an answer the judge called unsafe. Pairs are either (best, worst by the
same signal) or (best judge-safe, worst judge-unsafe); either way the margin is signed in the ranking
direction (chosen better than rejected by that much; negative when the judge prefers the one the signal
ranks lower) and must be at least min_margin. Tie-break (declared): the lowest sample_idx, for best and
worst.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from dafactory.tasks.config import SelectionConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.generation import assistant, messages
from dafactory.tasks.score.strategies import DEFAULT_STRATEGIES, Strategy, choose, signal_value

NO_VALID = "no_valid_candidates"
FEWER_THAN_2 = "fewer_than_2_valid"
TIE = "tie"
BELOW_MARGIN = "below_min_margin"
NO_SAFE = "no_judge_safe_candidate"
NO_UNSAFE = "no_judge_unsafe_candidate"
NO_VERDICT = "judge_no_verdict"  # an outcome counted in candidates, not prompts

PairMode = Literal["best_worst", "safe_unsafe"]
NAMED = {s.name: s for s in DEFAULT_STRATEGIES}


@dataclass
class Selection:
    candidates: list[dict]
    pairs: list[dict]
    best: list[dict]
    unpaired: Counter = field(default_factory=Counter)  # reason -> prompts without a pair
    no_verdict: int = 0  # candidates the judge gave no verdict on, where the verdict decides (see select)


def _group(candidates: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["prompt_id"], []).append(c)
    return groups


def _selection_score(row: dict) -> float | None:
    return row["selection_score"]  # the strategy's signal, read once per candidate


def _worst(rows: list[dict], strategy: Strategy) -> dict:
    """The other end of the strategy's signal (lowest sample_idx on ties)."""
    ordered = sorted(rows, key=lambda r: r["sample_idx"])
    if strategy.kind != "signal":
        return ordered[0]
    sign = 1.0 if strategy.direction == "max" else -1.0
    valued = [r for r in ordered if r["selection_score"] is not None]
    return min(valued, key=lambda r: sign * r["selection_score"]) if valued else ordered[0]


def _gap(chosen: dict, rejected: dict, strategy: Strategy) -> float | None:
    """How much better chosen is than rejected by the ranking signal, signed in its direction (as the
    pair's `margin` records it), or None for strategies that rank by no signal."""
    a, b = chosen["selection_score"], rejected["selection_score"]
    if a is None or b is None:
        return None
    return a - b if strategy.direction != "min" else b - a


def select(
    candidates: list[dict],
    strategy: Strategy,
    min_margin: float = 0.0,
    require_stop: bool = False,
    system_prompt: str | None = None,
    pairs: PairMode = "best_worst",
    seed: int = 0,
) -> Selection:
    out = Selection(candidates=[], pairs=[], best=[])
    judged = pairs == "safe_unsafe" or strategy.kind == "judge_safe_first"
    for pid, group in _group(candidates).items():
        rows = [
            dict(c, is_best=False, pair_role=None,
                 selection_score=signal_value(c, strategy.signal) if strategy.signal else None)
            for c in group
        ]
        out.candidates.extend(rows)
        if judged:
            out.no_verdict += sum(1 for r in rows if r.get("judge_safe") is None)
        valid = [
            r for r in rows
            if (strategy.kind != "signal" or r["selection_score"] is not None)
            and (not require_stop or r["finish_reason"] == "stop")
        ]
        if not valid:
            out.unpaired[NO_VALID] += 1
            continue
        prompt_msgs = messages(rows[0]["prompt"], system_prompt)
        if pairs == "safe_unsafe":
            # A judge that gave no verdict (an output it could not parse) said nothing about harm: such
            # a candidate is on neither side, rather than a rejected "unsafe" answer that may be safe.
            safe = [r for r in valid if r.get("judge_safe") is not None and r["judge_safe"]]
            unsafe = [r for r in valid if r.get("judge_safe") is not None and not r["judge_safe"]]
            best = choose(safe, strategy, seed, _selection_score)[0] if safe else None  # never a judge-unsafe one
            reason = NO_SAFE if not safe else NO_UNSAFE if not unsafe else None
            if reason is None:
                chosen, rejected = best, _worst(unsafe, strategy)
                margin = _gap(chosen, rejected, strategy)
                # A gap of 0 (or below) is a pair here (the judge, not the signal, tells them apart); a gap
                # that no signal measures cannot meet a positive min_margin (check_selection refuses that).
                if min_margin > 0 and (margin is None or margin < min_margin):
                    reason = BELOW_MARGIN
        else:
            best = choose(valid, strategy, seed, _selection_score)[0]
            chosen, rejected = best, _worst(valid, strategy)
            margin = _gap(chosen, rejected, strategy)
            reason = (
                FEWER_THAN_2 if len(valid) < 2
                else TIE if margin == 0
                else BELOW_MARGIN if margin < min_margin
                else None
            )
        if best is not None:
            best["is_best"] = True
            out.best.append({
                "prompt": prompt_msgs, "completion": assistant(best["response"]), "prompt_id": pid,
                "category": best["category"], "sample_idx": best["sample_idx"], "score": best["selection_score"],
                "scorer": strategy.signal or strategy.name,
            })
        if reason:
            out.unpaired[reason] += 1
            continue
        a, b = chosen["selection_score"], rejected["selection_score"]
        chosen["pair_role"], rejected["pair_role"] = "chosen", "rejected"
        out.pairs.append({
            "prompt": prompt_msgs, "chosen": assistant(chosen["response"]), "rejected": assistant(rejected["response"]),
            "prompt_id": pid, "category": chosen["category"], "chosen_sample_idx": chosen["sample_idx"],
            "rejected_sample_idx": rejected["sample_idx"], "chosen_score": a, "rejected_score": b,
            "margin": margin,
            "scorer": strategy.signal or strategy.name,
        })
    return out


def ranking_signal(sel: SelectionConfig, scorer_names: list[str]) -> str | None:
    """The signal that ranks candidates (scorer or scorer:detail), or None for signal-free strategies."""
    if sel.strategy == "signal":
        return sel.scorer or scorer_names[0]
    return NAMED[sel.strategy].signal


def check_selection(sel: SelectionConfig, scorer_names: list[str]) -> None:
    """One-line UserError when the selection names a strategy, scorer or judge the run does not have."""
    if sel.strategy != "signal" and sel.strategy not in NAMED:
        raise UserError(f"unknown selection.strategy {sel.strategy!r}; known: signal, {', '.join(NAMED)}")
    signal = ranking_signal(sel, scorer_names)
    if signal is not None and signal.split(":")[0] not in scorer_names:
        raise UserError(f"selection uses scorer {signal.split(':')[0]!r}, which is not among the configured "
                        f"scorers {scorer_names}")
    if sel.strategy == "signal" and ":" in signal and sel.direction is None:
        raise UserError(f"selection.scorer {signal!r} names a detail: set selection.direction (max or min)")
    if (sel.pairs == "safe_unsafe" or sel.strategy == "judge_safe_first") and sel.judge not in scorer_names:
        raise UserError(f"selection.judge must name a configured scorer (one of {scorer_names}) for "
                        f"{'safe_unsafe pairs' if sel.pairs == 'safe_unsafe' else 'judge_safe_first'}")
    if sel.pairs == "best_worst" and signal is None:
        raise UserError(f"strategy {sel.strategy!r} ranks by no signal: use pairs: safe_unsafe with it")
    if sel.min_margin > 0 and signal is None:
        raise UserError(f"selection.min_margin is a gap in a ranking signal, and strategy {sel.strategy!r} "
                        "ranks by none: set min_margin to 0 or rank by a signal")
