"""EngineFeed (tasks/generate/feed.py): many callers, one engine that takes requests between steps.

The engine is the fake backend's SimulatedEngine with step_s=0, whose steps are counted by hand below: each
sequence takes one step per token and the engine runs `limit` of them at once."""

from __future__ import annotations

import threading

import pytest

from dafactory.tasks.generate.backends.fake import SimulatedEngine
from dafactory.tasks.generate.feed import EngineFeed
from dafactory.tasks.generate.generation import Generation


def gens(*lengths: int) -> list[Generation]:
    return [Generation(f"g{i}", "stop", 1, n, tuple(range(n))) for i, n in enumerate(lengths)]


class Gated(SimulatedEngine):
    """Its first step waits for `go`, after setting `entered`; `fail_at` makes that step raise."""

    def __init__(self, limit: int, fail_at: int | None = None):
        super().__init__(limit, 0.0)
        self.entered, self.go, self.steps, self.fail_at = threading.Event(), threading.Event(), 0, fail_at
        self.resets = 0

    def step(self):
        self.steps += 1
        if self.steps == 1:
            self.entered.set()
            assert self.go.wait(10)
        if self.steps == self.fail_at:
            raise RuntimeError("engine fault")
        return super().step()

    def reset(self):
        self.resets += 1
        super().reset()


def test_one_caller_gets_its_items_in_order_and_each_step_is_counted():
    engine = Gated(limit=2)
    engine.go.set()
    feed = EngineFeed(engine)
    a, b = gens(3, 1), gens(2)
    assert feed.run([a, b]) == [a, b]
    # step 1: a0 a1 (a1 ends); 2: a0 b0; 3: a0 b0 (both end): 3 steps of 2 running, limit 2
    stats = feed.take_stats()
    assert {k: stats[k] for k in ("steps", "slot_steps", "slot_capacity")} == {
        "steps": 3, "slot_steps": 6, "slot_capacity": 6}
    assert stats["below_s"] == 0 and stats["engine_s"] > 0
    assert feed.take_stats() == {}  # handed out once


def test_a_second_callers_requests_join_the_running_engine():
    """Caller 2 queues while caller 1's first step runs: its sequence enters at step 2 and runs beside caller 1's,
    and caller 2 drives the last step alone after caller 1 has left with its output."""
    engine = Gated(limit=2)
    feed = EngineFeed(engine)
    out = {}
    first = threading.Thread(target=lambda: out.setdefault(1, feed.run([gens(4)])))
    first.start()
    assert engine.entered.wait(10)
    second = threading.Thread(target=lambda: out.setdefault(2, feed.run([gens(4)])))
    second.start()
    while not feed._queued:  # caller 2's request is queued
        threading.Event().wait(0.001)
    engine.go.set()
    first.join(10)
    second.join(10)
    assert out == {1: [gens(4)], 2: [gens(4)]}
    # running per step: 1, 2, 2, 2, 1 (a one-shard-at-a-time engine: 4 steps of 1, then 4 of 1)
    stats = feed.take_stats()
    assert (stats["steps"], stats["slot_steps"], stats["slot_capacity"]) == (5, 8, 10)


def test_a_failed_step_fails_whats_in_the_engine_and_the_next_call_runs():
    engine = Gated(limit=4, fail_at=2)
    engine.go.set()
    feed = EngineFeed(engine)
    with pytest.raises(RuntimeError, match="engine fault"):
        feed.run([gens(3), gens(1)])  # the second ends at step 1; the first is lost at step 2
    assert engine.resets == 1 and feed._out == {} and not feed._inside
    assert feed.run([gens(2)]) == [gens(2)]


class Refusing(SimulatedEngine):
    def add(self, key, item):
        if not item:
            raise ValueError("empty request")
        super().add(key, item)


def test_a_request_the_engine_refuses_fails_alone():
    feed = EngineFeed(Refusing(2, 0.0))
    errors = []

    def refused():
        try:
            feed.run([[]])
        except ValueError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=refused)
    t.start()
    assert feed.run([gens(2)]) == [gens(2)]
    t.join(10)
    assert errors == ["empty request"]


def test_many_shards_through_a_streaming_backend_leave_nothing_behind():
    """300 shards, 3 at a time (each shard's 4 batches from threads of their own) through the fake backend's
    streaming engine: every shard's rows equal those it gets from the same backend without the feed, and memory
    after the 300th shard is what it was after the 60th (the feed, the engine and the vocabulary keep nothing)."""
    import gc
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor

    from dafactory.tasks.config import ModelConfig, SamplingConfig
    from dafactory.tasks.generate.backends.fake import FakeBackend
    from dafactory.tasks.generate.generation import ChatPrompt, generate_shard
    from dafactory.tasks.io.prompts import PromptRow, Shard

    streaming = FakeBackend(ModelConfig(backend="fake", params={"step_s": 1e-6, "engine_slots": 16}))
    streaming.load()
    plain = FakeBackend(ModelConfig(backend="fake"))
    sampling, prompt = SamplingConfig(max_new_tokens=32), ChatPrompt()

    def shard(j: int) -> Shard:
        return Shard(f"s{j}", j, tuple(PromptRow(f"p{j}-{i}", f"question {i} about topic {(i + j) % 7}", None, i)
                                       for i in range(8)))

    def both(j: int) -> bool:
        return generate_shard(streaming, shard(j), 2, sampling, 4, prompt) == generate_shard(plain, shard(j), 2,
                                                                                           sampling, 4, prompt)

    tracemalloc.start()
    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(both, range(60)))
        gc.collect()  # generate_shard's recursive closure is a cycle: garbage the collector frees
        early = tracemalloc.get_traced_memory()[0]
        assert all(pool.map(both, range(60, 300)))
    gc.collect()
    late = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    feed = streaming.feed
    assert (feed._queued, feed._inside, feed._calls, feed._out) == ([], set(), {}, {})
    assert feed.engine._items == {} and not feed.engine._running and not feed.engine._waiting
    assert feed.stats["steps"] > 0
    assert late - early < 64 * 1024, (early, late)  # the prompts use no new words after the first shards
