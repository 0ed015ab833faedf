"""The max_error_rate rule (tasks/generate/error_rate.py): judged with confidence over the run so far."""

import pickle
import random

import pytest
from dafactory.tasks.generate.error_rate import ErrorBudget, TooManyErrors, wilson_lower


@pytest.mark.parametrize("errors,n,expected", [
    # by hand, z = 4: (p + 8/n - 4 sqrt(p(1-p)/n + 4/n^2)) / (1 + 16/n)
    (0, 10, 0.0),
    (1, 1, 1 / 17),  # (1 + 8 - 4*2) / 17
    (2, 2, 1 / 9),  # (1 + 4 - 4*1) / 9
    (8, 8, 1 / 3),  # (1 + 1 - 4*0.25) / 3
    (16, 16, 0.5),  # (1 + 0.5 - 4*0.125) / 2
    (0, 0, 0.0),
])
def test_wilson_lower_bound_by_hand(errors, n, expected):
    assert wilson_lower(errors, n) == pytest.approx(expected, abs=1e-12)


def run_fails_at(rate: float, shards: int, size: int, rng: random.Random, limit: float = 0.05) -> int | None:
    """The shard after which a run with a random fault on `rate` of its prompts fails, None if never."""
    budget = ErrorBudget(limit)
    for i in range(shards):
        budget.add(size, {"RuntimeError": sum(rng.random() < rate for _ in range(size))})
        if budget.exceeded():
            return i
    return None


def test_a_3pct_random_fault_under_5pct_never_fails_a_run():
    rng = random.Random(0)
    # 2,000 runs of 100 shards of 64 prompts, looked at after every shard
    assert [run_fails_at(0.03, 100, 64, rng) for _ in range(2000)].count(None) == 2000
    # where the old per-shard rule (more than 5% of a shard's 64 prompts) failed about 13% of shards
    old = sum(sum(rng.random() < 0.03 for _ in range(64)) > 0.05 * 64 for _ in range(4000)) / 4000
    assert 0.10 < old < 0.17


@pytest.mark.parametrize("rate,size,within", [(1.0, 64, 0), (1.0, 1, 0), (1.0, 8, 0), (0.5, 8, 3), (0.2, 64, 3)])
def test_a_systematic_fault_fails_within_the_first_shards(rate, size, within):
    rng = random.Random(1)
    at = [run_fails_at(rate, 100, size, rng) for _ in range(200)]
    assert None not in at and max(at) <= within


def test_rate_zero_fails_on_the_first_error():
    budget = ErrorBudget(0.0)
    budget.add(10_000, {})
    assert not budget.exceeded()
    budget.add(1, {"ValueError": 1}, "ValueError: bad")
    assert budget.exceeded()


def test_the_error_names_the_counts_and_first_error_and_pickles():
    budget = ErrorBudget(0.05)
    budget.add(8, {"RuntimeError": 7, "ValueError": 1}, "RuntimeError: CUDA error")
    budget.add(8, {}, "ignored: not the first")
    exc = pickle.loads(pickle.dumps(budget.error("of the shard")))
    assert isinstance(exc, TooManyErrors) and (exc.prompts, exc.errors, exc.first) == (
        16, {"RuntimeError": 7, "ValueError": 1}, "RuntimeError: CUDA error")
    assert str(exc) == (
        "generation failed on 8 of 16 prompts of the shard (RuntimeError 7, ValueError 1): the rate is above "
        "max_error_rate 0.05 with 99.99% confidence (Wilson lower bound 0.146); first: RuntimeError: CUDA error")
