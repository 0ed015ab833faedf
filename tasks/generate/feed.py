"""One engine fed by many callers: a replica's streaming generation. Pure: threads only, no torch or vLLM.

A replica holds several shards in flight (`RunConfig.shards_in_flight`), and each of a shard's batches calls the
backend from a thread of its own (generate_shard). A backend whose engine takes requests between decoding steps
(vLLM's LLMEngine; the fake backend's simulated engine with `step_s`) runs every call through one EngineFeed:
a caller queues its requests and waits, and whichever caller finds the engine undriven drives it (adds what is
queued, runs a step, hands finished requests to their callers) until its own requests are done, then wakes one
waiting caller to take the wheel. Each caller sleeps on an event of its own: a step wakes only the callers it
finished. So the next shards' requests enter the engine while the current shard's longest samples finish: the
engine does not drain between shards or batches while work is queued. A request's output depends only on the
request (its prompt, params and seed), never on what shares the engine with it, so a shard's rows are those it
gets alone.

An engine is any object with `limit` (sequences it runs at once), `add(key, item)`, `step() -> (finished, running)`
(finished: (key, output) pairs; running: the sequences that step advanced) and `reset()` (drop every request it
holds). A step that raises fails every request in the engine with its error (the engine is reset; their callers
split and retry as they do for a failed call); an `add` that raises fails that request alone.

The feed counts occupancy as generation.occupancy does for the static engines: seconds stepping (`engine_s`), of
them those with fewer running sequences than FULL of the limit (`below_s`), and sequence-steps used and offered.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

from dafactory.tasks.generate.generation import FULL


class _Call:
    """One run(): its requests not yet finished, and the event that wakes its thread (to return, or to drive)."""

    def __init__(self, left: int):
        self.left, self.wake = left, threading.Event()


class EngineFeed:
    def __init__(self, engine):
        self.engine = engine
        self.stats: Counter = Counter()  # engine_s, below_s, slot_steps, slot_capacity, steps
        self._lock = threading.Lock()
        self._queued: list[tuple[int, object]] = []
        self._inside: set[int] = set()  # keys added to the engine and not finished
        self._calls: dict[int, _Call] = {}  # key -> its call, until the call returns
        self._out: dict[int, tuple[bool, object]] = {}  # key -> (ok, output or exception)
        self._driving = False
        self._keys = itertools.count()
        self._taken = Counter()  # stats already handed out by take_stats()

    def run(self, items: list) -> list:
        """Each item's output, in order, once all are done; raises the error of the first that failed."""
        if not items:
            return []
        call = _Call(len(items))
        with self._lock:
            keys = [next(self._keys) for _ in items]
            self._queued += zip(keys, items)
            self._calls.update((k, call) for k in keys)
        while True:
            with self._lock:
                if not call.left:
                    break
                drive = not self._driving
                self._driving = True
                call.wake.clear()
            if not drive:
                call.wake.wait()  # set when its requests are done, or when the driver leaves
                continue
            try:
                self._drive(call)
            finally:
                with self._lock:
                    self._driving = False
                    waiting = next((c for c in self._calls.values() if c.left and c is not call), None)
                if waiting is not None:
                    waiting.wake.set()  # it takes the wheel
        with self._lock:
            out = [self._out.pop(k) for k in keys]
            for k in keys:
                del self._calls[k]
        failed = next((o for ok, o in out if not ok), None)
        if failed is not None:
            raise failed
        return [o for _, o in out]

    def _drive(self, call: _Call) -> None:
        while call.left:
            with self._lock:
                batch, self._queued = self._queued, []
            for key, item in batch:
                try:
                    self.engine.add(key, item)
                    self._inside.add(key)
                except Exception as exc:  # a request the engine refuses: that one alone fails
                    self._settle([(key, (False, exc))])
            if not self._inside:
                continue
            t0 = time.perf_counter()
            try:
                finished, running = self.engine.step()
            except Exception as exc:  # the engine's state is lost: everything in it fails and is retried
                self.engine.reset()
                self._settle([(k, (False, exc)) for k in list(self._inside)])
                continue
            seconds = time.perf_counter() - t0
            limit = self.engine.limit
            with self._lock:
                self.stats.update(engine_s=seconds, below_s=seconds if running < FULL * limit else 0.0,
                                  slot_steps=running, slot_capacity=limit, steps=1)
            self._settle([(k, (True, out)) for k, out in finished])

    def _settle(self, outcomes: list[tuple[int, tuple[bool, object]]]) -> None:
        with self._lock:
            for key, outcome in outcomes:
                self._inside.discard(key)
                self._out[key] = outcome
                call = self._calls[key]
                call.left -= 1
                if not call.left:
                    call.wake.set()

    def take_stats(self) -> Counter:
        """The occupancy counted since the last call (a shard's share of a replica's figures)."""
        with self._lock:
            now = Counter(self.stats)
            new = Counter({k: v - self._taken[k] for k, v in now.items() if v != self._taken[k]})
            self._taken = now
            return new
