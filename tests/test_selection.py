"""Pure core: best-of-N selection and chosen/rejected pairs, as a table of cases."""

import pytest

from dafactory.tasks.config import SelectionConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.score.selection import (
    BELOW_MARGIN,
    FEWER_THAN_2,
    NO_SAFE,
    NO_UNSAFE,
    NO_VALID,
    TIE,
    check_selection,
    select,
)
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


JSF = Strategy("judge_safe_first", "judge_safe_first")


@pytest.mark.parametrize(
    "scores, safe, strategy, min_margin, expect, no_verdict",
    [
        # chosen: the best judge-safe by the signal; rejected: the worst judge-unsafe
        ([0.9, 0.8, 0.1, 0.3], [False, True, True, False], by("max"), 0, (1, 3), 0),
        # the paper's rule (argmin) with safe/unsafe pairs
        ([0.9, 0.8, 0.1, 0.3], [False, True, True, False], by("min"), 0, (2, 0), 0),
        # a signal-free strategy: first safe sample vs first unsafe sample
        ([None, None, None], [False, True, True], JSF, 0, (1, 0), 0),
        # nothing safe, or nothing unsafe: no pair, with the reason
        ([0.1, 0.2], [False, False], by("max"), 0, NO_SAFE, 0),
        ([0.1, 0.2], [True, True], by("max"), 0, NO_UNSAFE, 0),
        # min_margin holds here as in best_worst: a gap of 0.5 (0.75 vs 0.25) is below 0.6 ...
        ([0.9, 0.75, 0.1, 0.25], [False, True, True, False], by("max"), 0.6, BELOW_MARGIN, 0),
        # ... and exactly at the minimum is enough
        ([0.9, 0.75, 0.1, 0.25], [False, True, True, False], by("max"), 0.5, (1, 3), 0),
        # the margin is signed in the ranking direction: a safe 0.25 is not 0.75 better than an unsafe 1.0
        # (it is 0.75 worse), so no pair at min_margin 0.75 (it used to pass as an absolute gap) ...
        ([0.25, 1.0], [True, False], by("max"), 0.75, BELOW_MARGIN, 0),
        # ... nor at any positive margin; with none asked for, the judge alone tells them apart
        ([0.25, 1.0], [True, False], by("max"), 0.1, BELOW_MARGIN, 0),
        ([0.25, 1.0], [True, False], by("max"), 0, (0, 1), 0),
        # under direction min, chosen 0.2 is 0.3 better than rejected 0.5
        ([0.2, 0.5], [True, False], by("min"), 0.3, (0, 1), 0),
        # equal scores make a pair (the judge tells them apart) unless a margin is asked for
        ([0.5, 0.5], [True, False], by("max"), 0, (0, 1), 0),
        ([0.5, 0.5], [True, False], by("max"), 0.1, BELOW_MARGIN, 0),
        # no verdict (None) is not unsafe: the unjudged sample 0 is not the rejected one, sample 2 is
        ([0.1, 0.9, 0.5], [None, True, False], by("max"), 0, (1, 2), 1),
        # ... nor with a signal-free strategy, where the first "unsafe" would have been sample 0
        ([None, None, None], [None, True, False], JSF, 0, (1, 2), 1),
        # only safe and unjudged candidates: no unsafe one to reject
        ([0.1, 0.9, 0.5], [None, True, None], by("max"), 0, NO_UNSAFE, 2),
        # no verdict at all: neither side
        ([0.1, 0.9], [None, None], by("max"), 0, NO_SAFE, 2),
        # an unjudged candidate without a score is counted too: the count is the judge's, not the pair's
        ([None, 0.9, 0.5], [None, True, False], by("max"), 0, (1, 2), 1),
    ],
)
def test_safe_unsafe_pairs(scores, safe, strategy, min_margin, expect, no_verdict):
    rows = cands(scores)
    for r, s in zip(rows, safe):
        r["judge_safe"] = s
    out = select(rows, strategy, min_margin, pairs="safe_unsafe")
    assert out.no_verdict == no_verdict
    if isinstance(expect, str):
        assert out.pairs == [] and dict(out.unpaired) == {expect: 1}
        assert not any(c["pair_role"] for c in out.candidates)
    else:
        (pair,) = out.pairs
        assert (pair["chosen_sample_idx"], pair["rejected_sample_idx"]) == expect
        assert not out.unpaired


def test_missing_verdicts_are_counted_only_where_the_judge_decides():
    # best/worst pairs by a signal never read the verdict, so a judge that failed there costs nothing
    rows = cands([0.1, 0.9])
    for r in rows:
        r["judge_safe"] = None
    assert select(rows, by("max")).no_verdict == 0
    assert select(rows, JSF, pairs="safe_unsafe").no_verdict == 2


@pytest.mark.parametrize(
    "selection, error",
    [
        # min_margin is a gap in a signal: a strategy without one cannot honour it
        (dict(strategy="judge_safe_first", pairs="safe_unsafe", judge="s", min_margin=0.5),
         "selection.min_margin is a gap in a ranking signal, and strategy 'judge_safe_first' ranks by none"),
        (dict(strategy="first_sample", pairs="safe_unsafe", judge="s", min_margin=0.1), "ranks by none"),
        # with no margin asked for, or a signal to measure it, the config stands
        (dict(strategy="judge_safe_first", pairs="safe_unsafe", judge="s"), None),
        (dict(strategy="signal", pairs="safe_unsafe", judge="s", min_margin=0.5), None),
    ],
)
def test_min_margin_needs_a_signal(selection, error):
    sel = SelectionConfig(**selection)
    if error is None:
        check_selection(sel, ["s"])
    else:
        with pytest.raises(UserError, match=error):
            check_selection(sel, ["s"])


def test_first_and_random_strategies_pick_a_best():
    rows = cands([0.3, 0.9, 0.5])
    for r, safe in zip(rows, [True, True, False]):
        r["judge_safe"] = safe
    out = select(rows, Strategy("first_sample", "first"), pairs="safe_unsafe")
    assert [b["sample_idx"] for b in out.best] == [0] and out.best[0]["scorer"] == "first_sample"


@pytest.mark.parametrize(
    "scores, safe, direction, expect_best, expect_margin",
    [
        # the highest reward is judge-unsafe: best is the best judge-safe one, never the unsafe sample 0
        ([0.9, 0.5, 0.2], [False, True, True], "max", 1, 0.5 - 0.9),
        # under argmin (the paper's rule) the lowest signal among the safe ones
        ([0.1, 0.5, 0.2], [False, True, True], "min", 2, 0.1 - 0.2),
        # no judge-safe candidate: no best row at all (the prompt counts as no_judge_safe_candidate)
        ([0.9, 0.5], [False, False], "max", None, None),
        # an unjudged candidate is not safe either
        ([0.9, 0.5], [None, False], "max", None, None),
        # every candidate safe: a best, but no pair (nothing unsafe to reject)
        ([0.9, 0.5], [True, True], "max", 0, None),
    ],
)
def test_best_in_safe_unsafe_mode_is_judge_safe_and_margins_are_signed(scores, safe, direction, expect_best,
                                                                       expect_margin):
    rows = cands(scores)
    for r, s in zip(rows, safe):
        r["judge_safe"] = s
    out = select(rows, by(direction), 0, pairs="safe_unsafe")
    assert [b["sample_idx"] for b in out.best] == ([] if expect_best is None else [expect_best])
    assert [c["sample_idx"] for c in out.candidates if c["is_best"]] == [b["sample_idx"] for b in out.best]
    if expect_best is None:
        assert dict(out.unpaired) == {NO_SAFE: 1}
    if expect_margin is None:
        assert out.pairs == []
    else:
        (pair,) = out.pairs
        assert pair["margin"] == pytest.approx(expect_margin)
        assert pair["chosen_sample_idx"] == expect_best  # the pair's chosen is the best row


@pytest.mark.parametrize(
    "chosen, rejected, direction, min_margin, paired",
    [
        # the case: chosen 0.2, rejected 0.5 by a max signal is 0.3 worse, never a 0.1 margin
        (0.2, 0.5, "max", 0.1, False),
        (0.5, 0.2, "max", 0.1, True),
        # by a min signal the same numbers are the other way round
        (0.2, 0.5, "min", 0.1, True),
        (0.5, 0.2, "min", 0.1, False),
        # exactly at the margin is enough; just under is not
        (0.75, 0.5, "max", 0.25, True),
        (0.74, 0.5, "max", 0.25, False),
    ],
)
def test_min_margin_is_signed_in_the_ranking_direction(chosen, rejected, direction, min_margin, paired):
    rows = cands([chosen, rejected])
    for r, s in zip(rows, [True, False]):
        r["judge_safe"] = s
    out = select(rows, by(direction), min_margin, pairs="safe_unsafe")
    assert (len(out.pairs) == 1) is paired
    if paired:
        sign = 1 if direction == "max" else -1
        assert out.pairs[0]["margin"] == pytest.approx(sign * (chosen - rejected))
    else:
        assert dict(out.unpaired) == {BELOW_MARGIN: 1}
