"""Pure core: selection strategies, ASR and its relative drop, the degenerate latent case."""

import pytest

from dafactory.tasks.score.strategies import (
    DEFAULT_STRATEGIES,
    Strategy,
    asr_table,
    choose,
    degenerate_latent,
    mean_drop,
    signal_value,
)


def cand(pid, idx, safe, cos=None, kl=None, bench="b"):
    details = [{"name": "cos@12", "value": cos}, {"name": "kl_ft_base", "value": kl}]
    return {"benchmark": bench, "prompt_id": pid, "sample_idx": idx, "judge_safe": safe,
            "scores": [{"scorer": "latent_attribution", "score": cos, "details": details}]}


LATENT_MIN = Strategy("latent", "signal", "latent_attribution", "min")
KL_MAX = Strategy("kl", "signal", "latent_attribution:kl_ft_base", "max")


@pytest.mark.parametrize(
    "group, strategy, expect_idx, fell_back",
    [
        # the paper's rule: argmin cosine
        ([cand("p", 0, False, 0.9), cand("p", 1, True, 0.2), cand("p", 2, False, 0.5)], LATENT_MIN, 1, False),
        # a detail signal, argmax
        ([cand("p", 0, False, 0.9, 0.1), cand("p", 1, True, 0.2, 0.05), cand("p", 2, False, 0.5, 0.3)], KL_MAX, 2, False),
        # ties go to the lowest sample_idx, whatever the row order
        ([cand("p", 2, False, 0.2), cand("p", 1, True, 0.2), cand("p", 0, False, 0.9)], LATENT_MIN, 1, False),
        # missing values are skipped; nothing valid falls back to the first sample
        ([cand("p", 0, False, None), cand("p", 1, True, 0.7)], LATENT_MIN, 1, False),
        ([cand("p", 1, False, None), cand("p", 0, True, None)], LATENT_MIN, 0, True),
        # first sample, and judge-safe-first with its fallback
        ([cand("p", 1, True), cand("p", 0, False)], Strategy("f", "first"), 0, False),
        ([cand("p", 0, False), cand("p", 1, False), cand("p", 2, True), cand("p", 3, True)], Strategy("s", "judge_safe_first"), 2, False),
        ([cand("p", 0, False), cand("p", 1, False)], Strategy("s", "judge_safe_first"), 0, True),
    ],
)
def test_choose(group, strategy, expect_idx, fell_back):
    chosen, fb = choose(group, strategy)
    assert (chosen["sample_idx"], fb) == (expect_idx, fell_back)


def test_random_is_seeded_per_prompt():
    group = [cand("p", i, False) for i in range(8)]
    r = Strategy("r", "random")
    picks = {choose(group, r, seed=s)[0]["sample_idx"] for s in range(20)}
    assert choose(group, r, seed=3)[0] is choose(list(reversed(group)), r, seed=3)[0]  # order does not matter
    assert len(picks) > 1  # the seed matters


def test_signal_value():
    c = cand("p", 0, True, 0.25, 0.5)
    assert (signal_value(c, "latent_attribution"), signal_value(c, "latent_attribution:kl_ft_base")) == (0.25, 0.5)
    assert signal_value(c, "latent_attribution:nope") is None and signal_value(c, "reward_model") is None


def test_asr_table_and_drop():
    cands = [
        # prompt a: first sample unsafe, the latent choice safe
        cand("a", 0, False, 0.9), cand("a", 1, True, 0.1),
        # prompt b: both unsafe
        cand("b", 0, False, 0.5), cand("b", 1, False, 0.4),
        # prompt c: first safe, latent picks the unsafe one
        cand("c", 0, True, 0.8), cand("c", 1, False, 0.3),
        # prompt d: all safe
        cand("d", 0, True, 0.6), cand("d", 1, True, 0.7),
        # another benchmark where first-sample ASR is 0: the drop is undefined
        cand("x", 0, True, 0.9, bench="z"), cand("x", 1, False, 0.1, bench="z"),
    ]
    table = asr_table(cands, [Strategy("first_sample", "first"), LATENT_MIN, Strategy("s", "judge_safe_first")])
    got = {(r["benchmark"], r["strategy"]): (r["unsafe"], r["asr"], r["drop_vs_first"]) for r in table}
    assert got[("b", "first_sample")] == (2, 50.0, 0.0)
    assert got[("b", "latent")] == (2, 50.0, 0.0)  # a fixed, c broken
    assert got[("b", "s")] == (1, 25.0, 0.5)  # only b stays unsafe
    assert got[("z", "first_sample")] == (0, 0.0, None)
    assert got[("z", "latent")] == (1, 100.0, None)
    assert mean_drop(table) == {"first_sample": 0.0, "latent": 0.0, "s": 0.5}


def test_degenerate_latent():
    assert degenerate_latent([cand("p", 0, True, 1.0), cand("p", 1, True, 1.0 - 1e-8)])
    assert not degenerate_latent([cand("p", 0, True, 1.0), cand("p", 1, True, 0.99)])
    assert not degenerate_latent([cand("p", 0, True, None)])  # nothing scored: not "degenerate"


def test_default_strategies_have_unique_names():
    names = [s.name for s in DEFAULT_STRATEGIES]
    assert len(names) == len(set(names)) and names[0] == "first_sample"


def test_utility_table_reports_accuracy_and_its_cost():
    def u(pid, idx, correct, cos):
        c = cand(pid, idx, None, cos, bench="gsm8k")
        c["correct"] = correct
        return c

    cands = [u("a", 0, True, 0.9), u("a", 1, False, 0.1), u("b", 0, True, 0.5), u("b", 1, True, 0.2)]
    from dafactory.tasks.score.strategies import utility_table

    rows = {r["strategy"]: r for r in utility_table(cands, [Strategy("first_sample", "first"), LATENT_MIN])}
    assert (rows["first_sample"]["accuracy"], rows["first_sample"]["drop_vs_first"]) == (100.0, 0.0)
    # the latent rule picks a's wrong answer: accuracy 50%, a utility cost of half
    assert (rows["latent"]["correct"], rows["latent"]["accuracy"], rows["latent"]["drop_vs_first"]) == (1, 50.0, 0.5)
