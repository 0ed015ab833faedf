"""How shards go through the stage actors: the driver's scheduling loop (stream).

Invariants:
- Items are drawn from the input lazily, only when a first-stage replica has a free slot, so a large input
  is never held in memory. Each replica holds up to its stage's `in_flight` items at once (a threaded actor):
  while one is in its model, the next is already there and the last one's parts are being written, so the
  round trips to the driver and each shard's own I/O leave the critical path (see Stage.run). An item whose
  replica died while it held others is started again alone (that try not counted): a prompt that kills
  its process is then found by itself and given up, and its neighbours are built once.
- A stage runs ahead of the next by at most twice the next stage's slots, which bounds what waits in the
  object store. Payloads go stage to stage as references; the driver fetches only the last stage's output
  (the written shard's stats, when the last stage's replicas write their own parts).
- Each call returns the payload and a tiny ok flag that the driver reads, so a failure is seen at the stage
  where it happens. The item then starts again from the first stage; after `retries` retries it is given up
  and the rest go on. Retries are counted per shard id; a try lost with a replica that died for good is not
  counted (twice at most, so that a replica whose constructor always fails cannot loop forever).
- A replica whose work failed gets none until it answers again: Ray restarts a killed one, one dead for good
  is replaced (replace_dead), and its slots still in flight come back as the replacement's. One that fails POISONED shards in a row with the same error while alive (a CUDA
  device-side assert leaves the process up and every later call failing) is killed for Ray to restart, its
  constructor and model load replayed, and gets work again only once its new process answers; the items it held beside the failing one are
  started again without counting a try.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray

from dafactory.tasks.run.stages import CANNOT_READ, StageSpec

log = logging.getLogger(__name__)

POISONED = 2  # shards a replica may fail in a row with the same error before it is restarted


@dataclass(frozen=True)
class Restarting:
    """In the in-flight table: the probe of a replica killed for a restart, and its old process id."""

    old_pid: int | None


def _lost(exc: BaseException) -> bool:
    """A failure of the cluster (a node or actor died, an object was lost), not of the work itself."""
    from ray import exceptions as rx

    infra = (rx.RayActorError, rx.ObjectLostError, rx.WorkerCrashedError, rx.NodeDiedError, rx.OwnerDiedError)
    if isinstance(exc, rx.RayTaskError):
        return isinstance(getattr(exc, "cause", None), infra)
    return isinstance(exc, infra)


def worker_error(exc: BaseException) -> str:
    """Type and message of the worker's own exception (a RayTaskError's text ends with it)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def stream(
    stages: list[StageSpec], items: Iterable[Any], on_result: Callable[[dict], None], retries: int = 2,
    poll_s: float = 1.0, load: Callable[[Any], Any] | None = None,
    on_given_up: Callable[[Any, BaseException], None] | None = None,
) -> list[tuple[Any, str]]:
    """Push items through the stages (see the module's invariants); call on_result (in the driver) with each
    last-stage output. Returns the items that failed `retries + 1` times, each with its last error.

    An item a first-stage replica could not read (a reference to input its node cannot see: CANNOT_READ) is
    read by `load` here and sent again, first. `on_given_up` (in the driver) sees each item given up, with
    its last error: it may raise to stop the loop. The wait wakes every `poll_s` so that Ctrl-C
    (KeyboardInterrupt) stops the loop promptly."""
    return Scheduler(stages, items, on_result, retries, poll_s, load, on_given_up).run()


class Scheduler:
    """The state of one stream() call; each method is one of its events."""

    def __init__(self, stages, items, on_result, retries, poll_s, load, on_given_up):
        self.stages, self.on_result, self.retries, self.poll_s = stages, on_result, retries, poll_s
        self.load, self.on_given_up = load, on_given_up
        self.last = len(stages) - 1
        self.source, self.exhausted = iter(items), False
        self.queues: list[list] = [[] for _ in stages]  # queue 0: items (new or to retry); then payload refs
        self.idle = [[a for a in st.actors for _ in range(st.in_flight)] for st in stages]  # free slots
        self.parked: dict[int, int] = {}  # id of a replica restarting -> its slots come back so far
        self.spared: set = set()  # payload refs of items in flight on a replica we restarted: tries not counted
        self.replaced: dict[int, Any] = {}  # id of a replica dead for good -> the one that took its place
        self.together: set = set()  # payload refs that shared their replica with another item in flight
        self.alone: set = set()  # keys of items to run with no other item on their replica
        self.exclusive: dict = {}  # payload ref of an item running alone -> the replica's other slots it holds
        self.in_flight: dict = {}  # ok-flag ref -> (stage index, actor, payload ref or Restarting)
        self.origin: dict = {}  # payload ref -> (the item it came from, ids of the actors its try went through)
        self.attempts: dict = {}  # shard id -> tries counted
        self.uncounted: dict = {}  # shard id -> tries not counted, because a replica it used died for good
        self.dead: set[int] = set()  # ids of actors found dead after their restarts (and replaced)
        self.streak: dict[int, tuple[str, int]] = {}  # actor id -> (its last error, numbers masked; failures in a row)
        self.failed: list[tuple[Any, str]] = []

    def run(self) -> list[tuple[Any, str]]:
        while True:
            self.dispatch()
            if not self.in_flight and not any(self.queues) and self.exhausted:
                return self.failed
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=self.poll_s)
            for ok in ready:
                self.settle(ok)

    def dispatch(self) -> None:
        """Give every idle replica work, as far as its queue and the next stage's room allow."""
        for s in range(len(self.stages)):
            while self.idle[s] and self.room(s):
                if s == 0 and not self.queues[0] and not self.exhausted:
                    nxt = next(self.source, None)
                    if nxt is None:
                        self.exhausted = True
                    else:
                        self.queues[0].append(nxt)
                if not self.queues[s]:
                    break
                work = self.queues[s][0]
                alone = self.key(work if s == 0 else self.origin[work][0]) in self.alone
                if alone:  # a replica with every slot free, all of them taken; none yet: let one drain
                    actor = next((a for a in self.idle[s] if self.idle[s].count(a) >= self.stages[s].in_flight),
                                 None)
                    if actor is None:
                        break
                    self.idle[s] = [a for a in self.idle[s] if a is not actor]
                else:
                    actor = self.idle[s].pop()
                self.queues[s].pop(0)
                payload, ok = actor.run.remote(work, self.stages[s].name)
                item, actors = (work, set()) if s == 0 else self.origin.pop(work)
                self.origin[payload] = (item, actors | {id(actor)})
                neighbours = {p for _, a, p in self.in_flight.values() if a is actor and not isinstance(p, Restarting)}
                if neighbours:
                    self.together |= neighbours | {payload}
                if alone:
                    self.exclusive[payload] = self.stages[s].in_flight - 1
                self.in_flight[ok] = (s, actor, payload)

    @staticmethod
    def key(item):
        return getattr(item, "shard_id", id(item))  # a shard's tries, whatever object carries it

    def room(self, s: int) -> bool:
        if s == self.last:
            return True
        running = sum(1 for stage, _, _ in self.in_flight.values() if stage == s)
        nxt = self.stages[s + 1]
        return len(self.queues[s + 1]) + running < 2 * len(nxt.actors) * nxt.in_flight

    def free(self, s: int, actor) -> None:
        """A slot of this replica is free again (held back while it restarts; its replacement's if it died)."""
        while id(actor) in self.replaced:
            actor = self.replaced[id(actor)]
        if id(actor) in self.parked:
            self.parked[id(actor)] += 1
        else:
            self.idle[s].append(actor)

    def settle(self, ok) -> None:
        """One call answered: hand its payload on, or deliver it, or count its failure."""
        s, actor, payload = self.in_flight.pop(ok)
        if isinstance(payload, Restarting):
            self.restarted(ok, s, actor, payload)
            return
        for _ in range(self.exclusive.pop(payload, 0)):  # the slots an item running alone held
            self.free(s, actor)
        together = payload in self.together
        self.together.discard(payload)
        try:
            flag = ray.get(ok)
        except ray.exceptions.RayError as exc:  # the work's failure; a stop (Ctrl-C, SIGTERM) goes up
            item, actors = self.origin.pop(payload)
            if payload in self.spared:  # lost to a restart we made for a neighbour's fault: not its try
                self.spared.discard(payload)
                self.free(s, actor)
                self.queues[0].append(item)
                return
            if not self.poisoned(actor, s, exc):
                self.free(s, actor)  # replace_dead probes it: answered, restarted, or replaced
            self.fail(item, actors, exc, together)
            return
        self.spared.discard(payload)
        self.streak.pop(id(actor), None)
        self.free(s, actor)
        if flag == CANNOT_READ:
            item, _ = self.origin.pop(payload)
            self.queues[0].insert(0, self.load(item))
            return
        if s < self.last:
            self.queues[s + 1].append(payload)  # handed on as a reference: the payload stays in the object store
            return
        item, actors = self.origin.pop(payload)
        try:
            result = ray.get(payload)
        except ray.exceptions.RayError as exc:  # the payload lost after it was made (its node died)
            self.fail(item, actors, exc)
            return
        self.alone.discard(self.key(item))
        self.on_result(result)

    def restarted(self, ok, s: int, actor, probe: Restarting) -> None:
        """The probe of a replica restarted by `poisoned` answered: idle again once its new process is up."""
        try:
            back = ray.get(ok)["pid"] != probe.old_pid
        except ray.exceptions.ActorUnavailableError:
            back = False
        except ray.exceptions.RayError:
            back = True  # gone for good: its next work fails and replace_dead replaces it
        if not back:  # the old process still answering, or the new one not up yet: ask again shortly
            time.sleep(0.2)
            self.in_flight[actor.info.remote()] = (s, actor, probe)
            return
        slots = 1 + self.parked.pop(id(actor), 0)  # its own and those its neighbours' calls gave back
        self.free(s, actor)
        self.idle[s].extend([self.idle[s][-1]] * (slots - 1))

    def poisoned(self, actor, s: int, exc: Exception) -> bool:
        """Count a failure of this replica's own work; restart it after POISONED in a row alike (True)."""
        if _lost(exc):  # the process died: Ray restarts it anyway
            self.streak.pop(id(actor), None)
            return False
        error = re.sub(r"\d+", "#", worker_error(exc))
        same, n = self.streak.get(id(actor), ("", 0))
        self.streak[id(actor)] = (error, n + 1 if same == error else 1)
        if self.streak[id(actor)][1] < POISONED:
            return False
        log.warning("a %s replica failed %d shards in a row with %s; restarting it", self.stages[s].name,
                    POISONED, worker_error(exc))
        self.streak.pop(id(actor))
        try:
            old_pid = ray.get(actor.info.remote(), timeout=60)["pid"]  # idle: it answers at once
        except (ray.exceptions.RayError, TimeoutError):
            old_pid = None
        # the other items it holds die with its process: started again, their tries not counted
        self.spared |= {p for st, a, p in self.in_flight.values() if a is actor and not isinstance(p, Restarting)}
        self.parked[id(actor)] = 0
        ray.kill(actor, no_restart=False)  # Ray starts it again: its constructor (model, writer) replayed
        # no work until its new process answers (a probe in flight, see restarted): no try is lost to it
        self.in_flight[actor.info.remote()] = (s, actor, Restarting(old_pid))
        return True

    def fail(self, item, actors: set[int], exc: Exception, together: bool = False) -> None:
        """A try of `item` failed: retry it from the first stage, or give it up after `retries` retries. A try
        lost with a replica that died for good, or with one that held other items (any of them may have
        killed it), is not counted (twice at most); the latter goes again alone."""
        self.dead |= replace_dead(self.stages, self.idle, self.replaced)
        key = self.key(item)
        shared = together and _lost(exc) and key not in self.alone
        if (actors & self.dead or shared) and self.uncounted.get(key, 0) < 2:
            self.uncounted[key] = self.uncounted.get(key, 0) + 1
            if shared:
                self.alone.add(key)
                log.warning("work lost with its replica, which held other work too (%s); starting it again alone",
                            worker_error(exc))
            else:
                log.warning("work lost with a replica that died for good (%s); starting it again", worker_error(exc))
            self.queues[0].append(item)
            return
        self.attempts[key] = self.attempts.get(key, 0) + 1
        kind = "lost with a node or actor" if _lost(exc) else "failed"
        if self.attempts[key] > self.retries:
            log.error("work %s %d times, giving it up: %s", kind, self.attempts[key], worker_error(exc))
            self.failed.append((item, worker_error(exc)))
            self.alone.discard(key)
            if self.on_given_up is not None:
                self.on_given_up(item, exc)
            return
        log.warning("work %s (%s); starting it again (retry %d of %d)", kind, worker_error(exc), self.attempts[key],
                    self.retries)
        self.queues[0].append(item)


def replace_dead(stages: list[StageSpec], idle: list[list], replaced: dict, timeout_s: float = 60) -> set[int]:
    """After a failure: an idle replica that is dead for good (its restarts used up, say by a prompt
    that kills its process every time) leaves the pool, and a new one takes its place (its free slots, and
    `replaced` maps the dead one to it for the slots still in flight), so the shards after it do not fail on
    it. A replica that is only restarting is left to come back."""
    unique = {id(a): (s, a) for s, pool in enumerate(idle) for a in pool}
    probes = {a.info.remote(): (s, a) for s, a in unique.values()}
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s)
    gone = set()
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:
            s, dead = probes[ref]
            new = stages[s].replace(dead)
            replaced[id(dead)] = new
            idle[s][:] = [new if a is dead else a for a in idle[s]]
            gone.add(id(dead))
            log.warning("a %s replica is dead after its restarts; a new one replaces it", stages[s].name)
        except ray.exceptions.RayError:
            pass  # restarting: it comes back by itself
    return gone
