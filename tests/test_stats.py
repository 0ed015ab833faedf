"""Pure core: ASR uncertainty. Exact McNemar p-values, the paired bootstrap over prompts, and the glue that
feeds each strategy's per-prompt outcomes, aligned by prompt_id, into the `asr` rows."""

import math

import pytest

from dafactory.tasks.evaluate.stats import (
    UNCERTAINTY_FIELDS,
    add_uncertainty,
    discordant,
    mcnemar_exact,
    paired_bootstrap,
    uncertainty,
    unsafe_by_prompt,
)
from dafactory.tasks.score.strategies import Strategy, asr_table


def binomial_p(b: int, c: int) -> float:
    """The reference, written out: min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)); 1 without pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),  # no discordant pair: nothing to test
        (0, 5, 0.0625),  # 2 * 1/32
        (5, 0, 0.0625),  # symmetric in b and c
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
        (8, 2, 0.109375),
        (0, 1, 1.0),  # 2 * 1/2
        (3, 3, 1.0),  # 2 * 42/64 > 1: capped
        (4, 5, 1.0),  # 2 * 256/512 = 1 exactly
        (1, 10, 0.01171875),  # 2 * (1 + 11) / 2048
        (0, 20, 2 / 2**20),
    ],
)
def test_exact_mcnemar(b, c, expected):
    assert binomial_p(b, c) == expected  # the table's literals agree with the formula
    assert mcnemar_exact(b, c) == expected


def test_exact_mcnemar_stays_exact_for_large_counts():
    # 2^n overflows a float for n > 1023; the p-value is still the formula's, not nan or 0
    assert mcnemar_exact(600, 700) == pytest.approx(binomial_p(600, 700), rel=1e-12)
    assert 0 < mcnemar_exact(600, 700) < 0.01


def paired(b: int, c: int, both_unsafe: int = 0, both_safe: int = 0) -> tuple[list[int], list[int]]:
    """(first-sample, strategy) outcomes with b prompts fixed by the strategy, c broken by it, and the rest
    concordant (1 = unsafe)."""
    first = [1] * b + [0] * c + [1] * both_unsafe + [0] * both_safe
    other = [0] * b + [1] * c + [1] * both_unsafe + [0] * both_safe
    return first, other


@pytest.mark.parametrize(
    "b, c, both_unsafe, both_safe",
    [
        (0, 5, 3, 4),  # the strategy only breaks prompts
        (2, 8, 10, 20),
        (7, 1, 0, 0),  # all discordant
        (0, 0, 6, 6),  # identical outcomes
    ],
)
def test_discordant_counts_and_p_of_constructed_cases(b, c, both_unsafe, both_safe):
    first, other = paired(b, c, both_unsafe, both_safe)
    assert discordant(first, other) == (b, c)
    got = uncertainty({f"p{i}": v for i, v in enumerate(first)}, {f"p{i}": v for i, v in enumerate(other)},
                      resamples=200)
    assert (got["mcnemar_b"], got["mcnemar_c"], got["mcnemar_p"]) == (b, c, binomial_p(b, c))


@pytest.mark.parametrize(
    "first",
    [
        [1, 0, 1, 1, 0, 0, 0, 1],  # mixed
        [1] * 5 + [0] * 45,  # first-sample ASR 10%
        [1] * 12,  # every prompt attacked
    ],
)
def test_a_strategy_identical_to_first_sample_has_drop_0_and_p_1(first):
    got = paired_bootstrap(first, list(first), resamples=500, seed=3)
    assert got["drop_ci_low"] <= 0 <= got["drop_ci_high"]
    assert (got["drop_ci_low"], got["drop_ci_high"]) == (0.0, 0.0)  # every resample's drop is exactly 0
    b, c = discordant(first, first)
    assert (b, c, mcnemar_exact(b, c)) == (0, 0, 1.0)


def test_drop_undefined_when_first_sample_is_never_unsafe():
    # first-sample ASR 0 in every resample: no drop interval, and every resample counted as left out
    got = paired_bootstrap([0] * 10, [0] * 9 + [1], resamples=300)
    assert (got["drop_ci_low"], got["drop_ci_high"], got["drop_ci_skipped"]) == (None, None, 300)


def test_resamples_where_first_sample_asr_is_0_are_left_out_of_the_drop_interval():
    # one attacked prompt in 10, fixed by the strategy: a resample misses it with probability 0.9^10
    got = paired_bootstrap([1] + [0] * 9, [0] * 10, resamples=1000, seed=0)
    expected = 1000 * 0.9**10  # 348.7; binomial sd 15
    assert abs(got["drop_ci_skipped"] - expected) < 60
    assert (got["drop_ci_low"], got["drop_ci_high"]) == (1.0, 1.0)  # where defined, the drop is 100%


@pytest.mark.parametrize(
    "vector, asr",
    [
        ([1] * 20, 100.0),  # every prompt attacked
        ([0] * 20, 0.0),  # none
        ([1], 100.0),  # one prompt
    ],
)
def test_the_interval_of_a_constant_vector_is_degenerate(vector, asr):
    got = paired_bootstrap(vector, vector, resamples=200, seed=1)
    assert (got["asr_ci_low"], got["asr_ci_high"]) == (asr, asr)


def test_the_bootstrap_is_reproducible_with_its_seed():
    first, other = paired(6, 2, 10, 30)
    a = paired_bootstrap(first, other, resamples=400, seed=7)
    assert paired_bootstrap(first, other, resamples=400, seed=7) == a  # same seed, same intervals
    assert paired_bootstrap(first, other, resamples=400, seed=8) != a  # another seed, other draws


@pytest.mark.parametrize(
    "b, c, both_unsafe, both_safe",
    [
        (6, 2, 10, 30),  # a strategy that helps
        (1, 9, 5, 5),  # one that hurts
        (3, 3, 40, 4),  # high ASR, no net change
        (2, 0, 1, 97),  # low ASR
    ],
)
def test_the_intervals_cover_the_point_estimates(b, c, both_unsafe, both_safe):
    first, other = paired(b, c, both_unsafe, both_safe)
    n, unsafe_first, unsafe = len(first), sum(first), sum(other)
    got = paired_bootstrap(first, other, resamples=1000, seed=0)
    assert got["asr_ci_low"] <= 100 * unsafe / n <= got["asr_ci_high"]
    assert got["drop_ci_low"] <= (unsafe_first - unsafe) / unsafe_first <= got["drop_ci_high"]
    assert got["asr_ci_low"] < got["asr_ci_high"]  # not degenerate: the outcomes vary


def test_the_asr_interval_has_the_binomial_width():
    # 120 of 400 prompts attacked: the normal approximation's half-width is 1.96 * sqrt(0.3 * 0.7 / 400)
    vector = [1, 0, 0, 1, 0, 0, 1, 0, 0, 0] * 40
    got = paired_bootstrap(vector, vector, resamples=1000, seed=0)
    half = 100 * 1.959964 * math.sqrt(0.3 * 0.7 / 400)  # 4.49 points
    assert (got["asr_ci_high"] - got["asr_ci_low"]) / 2 == pytest.approx(half, rel=0.15)
    narrower = paired_bootstrap(vector, vector, resamples=1000, seed=0, confidence=0.5)
    assert narrower["asr_ci_high"] - narrower["asr_ci_low"] < got["asr_ci_high"] - got["asr_ci_low"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: paired_bootstrap([1, 0], [1]), "differ in length"),  # unpaired vectors
        (lambda: paired_bootstrap([1, 2], [1, 0]), "0 or 1"),  # not an outcome
        (lambda: paired_bootstrap([], []), "non-empty"),
        (lambda: paired_bootstrap([1], [1], resamples=0), "resamples >= 1"),
        (lambda: uncertainty({"a": 1, "b": 0}, {"a": 1, "c": 0}), "different prompts"),  # not aligned
        (lambda: mcnemar_exact(-1, 2), ">= 0"),
    ],
)
def test_broken_contracts_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def cand(bench, pid, idx, safe):
    return {"benchmark": bench, "prompt_id": pid, "sample_idx": idx, "judge_safe": safe, "scores": []}


SAFE_FIRST = Strategy("judge_safe_first", "judge_safe_first")
FIRST = Strategy("first_sample", "first")
CANDIDATES = [  # benchmark a: 4 prompts of 2 samples; b: 2 prompts. Listed out of order on purpose.
    cand("a", "p1", 1, True), cand("a", "p1", 0, False),  # first unsafe, a safe one exists: b
    cand("a", "p2", 0, False), cand("a", "p2", 1, False),  # unsafe under both
    cand("a", "p3", 0, True), cand("a", "p3", 1, False),  # safe under both
    cand("a", "p4", 0, False), cand("a", "p4", 1, True),  # b again
    cand("b", "q1", 0, True), cand("b", "q1", 1, True),
    cand("b", "q2", 0, False), cand("b", "q2", 1, False),
]


def test_outcomes_per_prompt_are_the_selected_candidates_verdicts():
    got = unsafe_by_prompt(CANDIDATES, [SAFE_FIRST])
    assert got == {
        "a": {"first_sample": {"p1": 1, "p2": 1, "p3": 0, "p4": 1},
              "judge_safe_first": {"p1": 0, "p2": 1, "p3": 0, "p4": 0}},
        "b": {"first_sample": {"q1": 0, "q2": 1}, "judge_safe_first": {"q1": 0, "q2": 1}},
    }


def test_asr_rows_get_every_uncertainty_column():
    rows = asr_table(CANDIDATES, [FIRST, SAFE_FIRST])
    add_uncertainty(rows, unsafe_by_prompt(CANDIDATES, [FIRST, SAFE_FIRST]), resamples=300, seed=0)
    got = {(r["benchmark"], r["strategy"]): r for r in rows}
    assert all(set(UNCERTAINTY_FIELDS) <= set(r) for r in rows)
    # judge-safe-first fixes p1 and p4 on a and breaks nothing
    a = got[("a", "judge_safe_first")]
    assert (a["mcnemar_b"], a["mcnemar_c"], a["mcnemar_p"]) == (2, 0, binomial_p(2, 0))
    assert a["asr_ci_low"] <= a["asr"] == 25.0 <= a["asr_ci_high"]
    # first-sample against itself, and a strategy that selects the same on b
    for key in (("a", "first_sample"), ("b", "first_sample"), ("b", "judge_safe_first")):
        r = got[key]
        got_row = (r["mcnemar_b"], r["mcnemar_c"], r["mcnemar_p"], r["drop_ci_low"], r["drop_ci_high"])
        assert got_row == (0, 0, 1.0, 0.0, 0.0)


def test_a_row_that_disagrees_with_its_outcomes_is_a_bug():
    rows = asr_table(CANDIDATES, [SAFE_FIRST])
    rows[0]["unsafe"] += 1
    with pytest.raises(ValueError, match="unsafe prompts in the outcomes"):
        add_uncertainty(rows, unsafe_by_prompt(CANDIDATES, [SAFE_FIRST]))
