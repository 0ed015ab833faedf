"""Pure core: best-of-N selection and chosen/rejected pairs, as a table of cases."""

import pytest

from dafactory.tasks.score.selection import BELOW_MARGIN, FEWER_THAN_2, NO_SAFE, NO_UNSAFE, NO_VALID, TIE, select
from dafactory.tasks.score.strategies import Strategy


def by(direction):
    return Strategy("signal", "signal", "s", direction)


def cands(scores, finish=None, pid="p"):
    """One prompt's candidates with the given scores (None = could not score)."""
    finish = finish or ["stop"] * len(scores)
    return [
        {
            "prompt_id": pid, "sample_idx": i, "prompt": "q", "category": None,
            "response": f"r{i}", "finish_reason": f,
            "scores": [{"scorer": "s", "score": s, "label": None, "reason": None, "heuristic": False}],
        }
        for i, (s, f) in enumerate(zip(scores, finish))
    ]


@pytest.mark.parametrize(
    "scores, direction, min_margin, require_stop, finish, expect",
    [
        # plain: best is the max, worst the min
        ([0.1, 0.9, 0.5], "max", 0, False, None, ("pair", 1, 0, 0.8)),
        # direction min flips them
        ([0.1, 0.9, 0.5], "min", 0, False, None, ("pair", 0, 1, 0.8)),
        # tied best: lowest sample_idx wins; tied worst likewise
        ([0.2, 0.9, 0.9, 0.2], "max", 0, False, None, ("pair", 1, 0, 0.7)),
        # all equal: a tie, no pair, but a best (sample 0)
        ([0.5, 0.5, 0.5], "max", 0, False, None, (TIE, 0)),
        # margin below the minimum
        ([0.5, 0.6], "max", 0.2, False, None, (BELOW_MARGIN, 1)),
        # margin exactly at the minimum is enough
        ([0.5, 0.75], "max", 0.25, False, None, ("pair", 1, 0, 0.25)),
        # unscorable candidates are invalid: one valid left
        ([None, 0.3, float("nan")], "max", 0, False, None, (FEWER_THAN_2, 1)),
        # nothing valid: no best, no pair
        ([None, None], "max", 0, False, None, (NO_VALID, None)),
        # truncated responses are invalid only when require_stop is set
        ([0.9, 0.1, 0.5], "max", 0, True, ["length", "stop", "stop"], ("pair", 2, 1, 0.4)),
        ([0.9, 0.1, 0.5], "max", 0, False, ["length", "stop", "stop"], ("pair", 0, 1, 0.8)),
        # N=1 can never make a pair
        ([0.7], "max", 0, False, None, (FEWER_THAN_2, 0)),
    ],
)
def test_select_cases(scores, direction, min_margin, require_stop, finish, expect):
    out = select(cands(scores, finish), by(direction), min_margin, require_stop)
    best = [c["sample_idx"] for c in out.candidates if c["is_best"]]
    if expect[0] == "pair":
        _, chosen, rejected, margin = expect
        (pair,) = out.pairs
        assert (pair["chosen_sample_idx"], pair["rejected_sample_idx"]) == (chosen, rejected)
        assert pair["margin"] == pytest.approx(margin)
        assert pair["chosen"] == [{"role": "assistant", "content": f"r{chosen}"}]
        assert pair["rejected"] == [{"role": "assistant", "content": f"r{rejected}"}]
        roles = {c["sample_idx"]: c["pair_role"] for c in out.candidates if c["pair_role"]}
        assert roles == {chosen: "chosen", rejected: "rejected"}
        assert best == [chosen] and not out.unpaired
    else:
        reason, best_idx = expect
        assert out.pairs == [] and dict(out.unpaired) == {reason: 1}
        assert best == ([] if best_idx is None else [best_idx])
        assert len(out.best) == len(best)


def test_messages_are_trl_conversational():
    out = select(cands([0.0, 1.0]), by("max"), system_prompt="be safe")
    (pair,) = out.pairs
    assert pair["prompt"] == [{"role": "system", "content": "be safe"}, {"role": "user", "content": "q"}]
    (best,) = out.best
    assert best["prompt"] == pair["prompt"]
    assert best["completion"] == [{"role": "assistant", "content": "r1"}]


def test_groups_by_prompt_id_not_row_order():
    rows = cands([0.1, 0.9], pid="a") + cands([0.4, 0.4], pid="b")
    rows = [rows[0], rows[2], rows[1], rows[3]]  # interleaved
    out = select(rows, by("max"))
    assert [(p["prompt_id"], p["chosen_sample_idx"]) for p in out.pairs] == [("a", 1)]
    assert dict(out.unpaired) == {TIE: 1}
    assert len(out.candidates) == 4


@pytest.mark.parametrize(
    "scores, safe, strategy, expect",
    [
        # chosen: the best judge-safe by the signal; rejected: the worst judge-unsafe
        ([0.9, 0.8, 0.1, 0.3], [False, True, True, False], by("max"), (1, 3)),
        # the paper's rule (argmin) with safe/unsafe pairs
        ([0.9, 0.8, 0.1, 0.3], [False, True, True, False], by("min"), (2, 0)),
        # a signal-free strategy: first safe sample vs first unsafe sample
        ([None, None, None], [False, True, True], Strategy("f", "judge_safe_first"), (1, 0)),
        # nothing safe, or nothing unsafe: no pair, with the reason
        ([0.1, 0.2], [False, False], by("max"), NO_SAFE),
        ([0.1, 0.2], [True, True], by("max"), NO_UNSAFE),
    ],
)
def test_safe_unsafe_pairs(scores, safe, strategy, expect):
    rows = cands(scores)
    for r, s in zip(rows, safe):
        r["judge_safe"] = s
    out = select(rows, strategy, pairs="safe_unsafe")
    if isinstance(expect, str):
        assert out.pairs == [] and dict(out.unpaired) == {expect: 1}
    else:
        (pair,) = out.pairs
        assert (pair["chosen_sample_idx"], pair["rejected_sample_idx"]) == expect


def test_first_and_random_strategies_pick_a_best():
    out = select(cands([0.3, 0.9, 0.5]), Strategy("first_sample", "first"), pairs="safe_unsafe")
    assert [b["sample_idx"] for b in out.best] == [0] and out.best[0]["scorer"] == "first_sample"
