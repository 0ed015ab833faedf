"""Best-of-N selection and chosen/rejected pairs. Pure: plain Python over candidate rows.

Row contract: reads prompt_id, sample_idx, prompt, category, response, finish_reason, scores;
writes selection_score, is_best, pair_role on candidates, and rows of the PAIRS and BEST schemas.
Tie-break (declared): among equal scores the lowest sample_idx wins, for best and for worst.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["max", "min"]

NO_VALID = "no_valid_candidates"
FEWER_THAN_2 = "fewer_than_2_valid"
TIE = "tie"
BELOW_MARGIN = "below_min_margin"


@dataclass
class Selection:
    candidates: list[dict]
    pairs: list[dict]
    best: list[dict]
    unpaired: Counter = field(default_factory=Counter)  # reason -> prompts without a pair


def messages(prompt: str, system_prompt: str | None) -> list[dict]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": prompt}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def score_of(candidate: dict, scorer: str) -> float | None:
    for s in candidate["scores"]:
        if s["scorer"] == scorer:
            v = s["score"]
            return None if v is None or math.isnan(v) else float(v)
    return None


def _group(candidates: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["prompt_id"], []).append(c)
    return groups


def select(
    candidates: list[dict],
    scorer: str,
    direction: Direction,
    min_margin: float = 0.0,
    require_stop: bool = False,
    system_prompt: str | None = None,
) -> Selection:
    sign = 1.0 if direction == "max" else -1.0
    out = Selection(candidates=[], pairs=[], best=[])
    for pid, group in _group(candidates).items():
        rows = [dict(c, is_best=False, pair_role=None, selection_score=score_of(c, scorer)) for c in group]
        out.candidates.extend(rows)
        valid = [
            r for r in rows
            if r["selection_score"] is not None and (not require_stop or r["finish_reason"] == "stop")
        ]
        if not valid:
            out.unpaired[NO_VALID] += 1
            continue
        # max() returns the first maximal element, so sorting by sample_idx makes the tie-break explicit.
        valid.sort(key=lambda r: r["sample_idx"])
        best = max(valid, key=lambda r: sign * r["selection_score"])
        worst = min(valid, key=lambda r: sign * r["selection_score"])
        best["is_best"] = True
        prompt_msgs = messages(best["prompt"], system_prompt)
        out.best.append(
            {
                "prompt": prompt_msgs,
                "completion": assistant(best["response"]),
                "prompt_id": pid,
                "category": best["category"],
                "sample_idx": best["sample_idx"],
                "score": best["selection_score"],
                "scorer": scorer,
            }
        )
        margin = abs(best["selection_score"] - worst["selection_score"])
        reason = (
            FEWER_THAN_2 if len(valid) < 2
            else TIE if margin == 0
            else BELOW_MARGIN if margin < min_margin
            else None
        )
        if reason:
            out.unpaired[reason] += 1
            continue
        best["pair_role"], worst["pair_role"] = "chosen", "rejected"
        out.pairs.append(
            {
                "prompt": prompt_msgs,
                "chosen": assistant(best["response"]),
                "rejected": assistant(worst["response"]),
                "prompt_id": pid,
                "category": best["category"],
                "chosen_sample_idx": best["sample_idx"],
                "rejected_sample_idx": worst["sample_idx"],
                "chosen_score": best["selection_score"],
                "rejected_score": worst["selection_score"],
                "margin": margin,
                "scorer": scorer,
            }
        )
    return out
