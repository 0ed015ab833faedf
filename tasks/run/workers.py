"""Ray machinery: stage actors that load their model once, and a driver that streams shards through them.

A stage is plain data (Ray Data LLM style): the actor class, its constructor arguments and its resource
request. Shards flow stage to stage as Ray object references, so payloads do not pass through the
driver until the last stage; the driver only writes results.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import ray

from dafactory.tasks.config import ModelConfig, RayConfig, SamplingConfig, ScorerConfig, SelectionConfig
from dafactory.tasks.distill.filtering import distill_rows, forced_close_counts, judgeable, parse_rows
from dafactory.tasks.errors import UserError
from dafactory.tasks.evaluate.utility import is_correct
from dafactory.tasks.generate.backends import BACKENDS
from dafactory.tasks.generate.error_rate import ErrorBudget
from dafactory.tasks.generate.generation import ChatPrompt, generate_shard
from dafactory.tasks.io.prompts import Shard
from dafactory.tasks.io.schemas import (
    BEST,
    CANDIDATES,
    DISTILLED,
    EVAL_CANDIDATES,
    GENERATED,
    PAIRS,
    QUARANTINE,
    to_table,
)
from dafactory.tasks.io.storage import ShardRef
from dafactory.tasks.score.scorers import SCORERS
from dafactory.tasks.score.selection import NO_VERDICT, select
from dafactory.tasks.score.strategies import DEFAULT_STRATEGIES, Strategy

log = logging.getLogger(__name__)


_early: dict = {}  # the thread of ray_started_early, and what it raised


@contextlib.contextmanager
def ray_started_early(cfg: RayConfig):
    """Start Ray in a thread while the caller goes on (the CLI: while Prefect's temporary server starts
    and the input is planned, which would otherwise wait for each other); the flow's ray_session waits
    for it and uses it. Stopped on exit. A failure to start is raised by ray_session, in the flow."""
    if ray.is_initialized():
        yield
        return

    done = threading.Event()

    def start():
        try:
            _start_ray(cfg)
        except BaseException as exc:  # handed to the flow's ray_session
            _early["error"] = exc
            _early["started"].set()
            return
        _early["started"].set()
        # Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): it waits here
        # until Ray is shut down.
        done.wait()

    # ray.init from a thread sets no SIGTERM handler; none is needed: Ray's processes die with their parent
    # (PR_SET_PDEATHSIG), and during the build sigterm_stops turns SIGTERM into a graceful stop.
    _early.clear()
    _early["started"] = threading.Event()
    thread = threading.Thread(target=start, name="ray-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        _early["started"].wait()
        _early.clear()
        if ray.is_initialized():
            ray.shutdown()
            _restore_cluster_flag()
        done.set()
        thread.join()


class _NotMainThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "current thread is not the main thread" not in record.getMessage()


_saved_cluster_flag: list = []


def _start_ray(cfg: RayConfig) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers mask secrets in their logs too (tasks.redact).
    runtime_env = {"worker_process_setup_hook": "dafactory.tasks.io.redact.install_log_filter"}
    address = cfg.cluster_address()
    quiet = _NotMainThread()  # ray.init from a thread says it set no SIGTERM handler (see ray_started_early)
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
            return
        # Ray binds every server to all interfaces, and turns 127.0.0.1 into the host's address, unless
        # clusters are off (its macOS/Windows default): then a local Ray listens on loopback only.
        from ray._private import ray_constants

        _saved_cluster_flag.append(ray_constants.ENABLE_RAY_CLUSTER)
        ray_constants.ENABLE_RAY_CLUSTER = False
        # "local": a new instance, never a cluster that `ray start` left on this machine
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                 runtime_env=runtime_env)
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)


def _restore_cluster_flag() -> None:
    if _saved_cluster_flag:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = _saved_cluster_flag.pop()


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Join the cluster at `address`, or start a local Ray; leave alone a Ray the caller started (or is
    starting: see ray_started_early)."""
    if "started" in _early:
        _early["started"].wait()
        if "error" in _early:
            raise _early.pop("error")
    if ray.is_initialized():
        yield
        return
    _start_ray(cfg)
    try:
        yield
    finally:
        ray.shutdown()
        _restore_cluster_flag()


def use_cpus(num_cpus: float) -> None:
    """Give torch as many threads as the replica was granted CPUs (Ray's default is one)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, math.ceil(num_cpus)))


def check_resources(stages: list["StageSpec"], local: bool) -> None:
    """Fail fast (local Ray) or warn (a cluster may autoscale) when stages ask for more than exists,
    instead of waiting forever for actors that cannot be placed."""
    have = ray.cluster_resources()
    for kind, key in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        need = sum(getattr(st, key) * st.num_replicas for st in stages)
        if need > have.get(kind, 0) + 1e-9:
            detail = ", ".join(f"{st.name}: {st.num_replicas} x {getattr(st, key):g}" for st in stages)
            msg = f"the stages ask for {need:g} {kind} ({detail}) but Ray has {have.get(kind, 0):g}"
            if local:
                raise UserError(msg + "; lower num_replicas/num_gpus/num_cpus in the config")
            log.warning("%s; waiting for the cluster to scale up", msg)


STARTED_AT = time.time()  # when this worker process imported us: before its actor loaded anything


def worker_info() -> dict:
    return {
        "node": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "started_at": STARTED_AT,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


@contextlib.contextmanager
def gc_loading():
    """Around a replica's model and scorer loading. Imports and weights make objects by the hundred thousand and
    keep them: the collector is paused meanwhile (0.7-0.9 s of 3.0-3.2 s for the embedded model here), and what
    was loaded then goes out of its sight for good (gc.freeze). Otherwise each full collection, which the many row
    dicts of every shard set off, walks all of it again: 40-45% of a stage's CPU on the fake backend here
    (benchmarks/bench_vs_raydata.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # collect first: garbage that loading left in cycles (temporary graphs, parsed configs) would
        # otherwise be frozen with the rest and kept for the replica's life
        gc.collect()
        gc.freeze()
        if enabled:
            gc.enable()


@contextlib.contextmanager
def gc_frozen():
    """In the driver, around a build: what is alive when it starts (Prefect, Ray, the config) goes out of
    the garbage collector's sight, as in the replicas (gc_loading), and back after it. Planning 100k prompts
    took 1.27 s with it in sight, 0.85 s without; the build's driver loop gains as much."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


POISONED = 2  # shards a replica may fail in a row with the same error before it is restarted


@dataclass(frozen=True)
class Restarting:
    """In stream's in-flight table: the probe of a replica killed for a restart, and its old process id."""

    old_pid: int | None
UNREAD = "unread"  # the ok flag of a first-stage replica that could not read its shard (see ShardReader)


class Stage:
    """Base of the stage actors: `run` returns the payload and a tiny ok flag, so that the driver learns
    of a failure where it happens without fetching the payload (see stream). The first stage's replicas
    are given the shard reader and the last stage's the shard writer, as constructor arguments (see
    with_io: Ray replays the constructor when it restarts a replica, so a restarted one has them too): a
    shard travels to the first as a reference and they read its prompts themselves; the last write its
    parts themselves and return only its stats.

    `run` files what the work cost under the payload's `work[stage]`: the seconds spent in process()
    (`busy_s`) and what process() reports under `usage` (samples; tokens for the generate stage)."""

    writer = reader = None

    @ray.method(num_returns=2)
    def run(self, work, stage: str = ""):
        if isinstance(work, ShardRef):
            # a replica whose node cannot see the folder hands the shard back: the driver reads it then
            work = None if self.reader is None else self.reader.in_replica(work)
            if work is None:
                return None, UNREAD
        t0 = time.perf_counter()
        out = self.process(work)
        out.setdefault("work", {})[stage] = {"busy_s": time.perf_counter() - t0, **out.pop("usage", {})}
        return (out if self.writer is None else self.writer.in_replica(out)), True


def error_types(quarantine: list[dict]) -> Counter:
    """Exception type -> prompts, over the shard's generation_error quarantine rows ("Type: message")."""
    return Counter(q["detail"].split(":", 1)[0] for q in quarantine if q["reason"] == "generation_error")


def generation_usage(rows: list[dict]) -> dict:
    """Samples and tokens of a shard's GENERATED rows. A prompt's tokens count once per prompt (not once
    per sample): the prompt as the model read it, whatever number of samples or requests it got."""
    prompt_tokens = {r["prompt_id"]: r["prompt_tokens"] for r in rows}
    return {"samples": len(rows), "prompt_tokens": sum(prompt_tokens.values()),
            "generated_tokens": sum(r["response_tokens"] for r in rows)}


class GenerateStage(Stage):
    """Loads a model once; turns a shard into GENERATED rows and too-long quarantine rows.
    `conversation` builds each prompt's messages (a ChatPrompt, or a TeacherPrompt under a spec).
    Prompts whose generation raised are quarantined and counted. The shard fails (TooManyErrors: retried,
    on another replica if need be) only when its own errors are surely above `max_error_rate` (the confidence
    rule of tasks/generate/error_rate.py: a replica whose every call fails, not a few bad rows); the driver
    holds the run to the same rule over all its shards."""

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, n: int, conversation,
                 max_error_rate: float = 0.05):
        t0 = time.perf_counter()
        self.model, self.sampling, self.n, self.conversation = model, sampling, n, conversation
        self.max_error_rate = max_error_rate
        self.backend = BACKENDS.get(model.backend)(model)
        with gc_loading():
            self.backend.load()
        use_cpus(model.num_cpus)
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return worker_info() | {
            "load_seconds": self.load_seconds, "model": self.backend.model_id, "revision": self.backend.revision
        }

    def process(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        rows, quarantine = generate_shard(
            self.backend, shard, self.n, self.sampling, self.model.batch_size, self.conversation
        )
        errors = error_types(quarantine)
        first = next((q["detail"] for q in quarantine if q["reason"] == "generation_error"), None)
        budget = ErrorBudget(self.max_error_rate)
        budget.add(len(shard.rows), errors, first)
        if budget.exceeded():
            raise budget.error("of the shard")
        return {
            "shard_id": shard.shard_id,
            "shard_index": shard.index,
            "prompts": len(shard.rows),
            "generated": to_table(rows, GENERATED),
            "quarantine": quarantine,
            "errors": {"generation_error": dict(errors)} if errors else {},
            "first_error": first,
            "seconds": {"generate": time.perf_counter() - t0},
            "usage": generation_usage(rows),
        }


class _ScoringStage(Stage):
    """Loads every scorer once per actor."""

    def __init__(self, scorers: list[ScorerConfig], num_cpus: float):
        t0 = time.perf_counter()
        self.scorers = [SCORERS.get(s.name)(s) for s in scorers]
        with gc_loading():
            for s in self.scorers:
                s.load()
        use_cpus(num_cpus)
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return worker_info() | {"load_seconds": self.load_seconds}

    @staticmethod
    def entry(scorer, view: str, result: dict) -> dict:
        return {"scorer": scorer.name, "view": view, "heuristic": scorer.heuristic, "details": None, **result}

    @staticmethod
    def in_context(rows: list[dict], conversation: ChatPrompt) -> list[dict]:
        """Copies of the rows with the rest of the conversation their responses were generated in, for
        scorers that read the student's own context (the rows themselves stay table rows)."""
        return [dict(r, system_prompt=conversation.system_prompt, prefill=conversation.prefill) for r in rows]


class ScoreSelectStage(_ScoringStage):
    """Scores a generated shard with every scorer, then selects best and pairs. `conversation` is the
    generate stage's own ChatPrompt: scorers see the system prompt and prefill the student saw."""

    def __init__(self, scorers, selection: SelectionConfig, signal: str | None, conversation: ChatPrompt,
                 num_cpus=1, seed=0):
        super().__init__(scorers, num_cpus)
        self.selection, self.conversation, self.seed = selection, conversation, seed
        by_name = {s.name: s for s in self.scorers}
        if selection.strategy == "signal":
            direction = selection.direction or by_name[signal.split(":")[0]].direction
            self.strategy = Strategy("signal", "signal", signal, direction)
        else:
            named = next(s for s in DEFAULT_STRATEGIES if s.name == selection.strategy)
            self.strategy = Strategy(named.name, named.kind, named.signal, selection.direction or named.direction)
        self.judge = by_name.get(selection.judge) if selection.judge else None

    def process(self, payload: dict) -> dict:
        t0 = time.perf_counter()
        rows = payload.pop("generated").to_pylist()
        seen = self.in_context(rows, self.conversation)
        per_scorer = [s.score(seen) for s in self.scorers]
        for i, row in enumerate(rows):
            row["scores"] = [self.entry(s, "response", res[i]) for s, res in zip(self.scorers, per_scorer)]
            if self.judge is not None:
                verdict = per_scorer[self.scorers.index(self.judge)][i]
                row["judge_safe"] = self.judge.passes(verdict)  # None: no verdict, which select leaves out
        t1 = time.perf_counter()
        sel = select(
            rows, self.strategy, self.selection.min_margin, self.selection.require_stop,
            self.conversation.system_prompt, self.selection.pairs, self.seed,
        )
        for c in sel.candidates:
            c.pop("judge_safe", None)
        payload["tables"] = {
            "candidates": to_table(sel.candidates, CANDIDATES),
            "pairs": to_table(sel.pairs, PAIRS),
            "best": to_table(sel.best, BEST),
            "quarantine": to_table(payload.pop("quarantine"), QUARANTINE),
        }
        # there, though it counts candidates.
        payload["outcomes"] = dict(sel.unpaired)
        payload["candidates"] = {NO_VERDICT: sel.no_verdict} if sel.no_verdict else {}  # counted in candidates
        payload["seconds"] |= {"score": t1 - t0, "select": time.perf_counter() - t1}
        payload["usage"] = {"samples": len(rows)}
        return payload


class JudgeFilterStage(_ScoringStage):
    """Parses teacher samples into reasoning and answer, judges each configured view of the samples
    that parsed, and splits them into train and filtered."""

    def __init__(self, judges: list[ScorerConfig], student_system_prompt: str | None, num_cpus: float = 1,
                 keep_forced_close: bool = True, keep_cut_answers: bool = False):
        super().__init__(judges, num_cpus)
        self.reads = [cfg.reads for cfg in judges]
        self.system_prompt, self.keep_forced_close = student_system_prompt, keep_forced_close
        self.keep_cut_answers = keep_cut_answers

    def process(self, payload: dict) -> dict:
        t0 = time.perf_counter()
        rows = parse_rows(payload.pop("generated").to_pylist())
        parsed = [r for r in rows if judgeable(r, self.keep_cut_answers)]  # the others are not worth a judge call
        for r in rows:
            r["scores"], r["verdicts"] = [], []
        for judge, views in zip(self.scorers, self.reads):
            for view in views:
                results = judge.score([dict(r, response=r["views"][view]) for r in parsed])
                for r, res in zip(parsed, results):
                    r["scores"].append(self.entry(judge, view, res))
                    r["verdicts"].append((f"{judge.name}@{view}", judge.passes(res), res["label"], res["reason"]))
        t1 = time.perf_counter()
        train, filtered, counts = distill_rows(rows, self.system_prompt, self.keep_forced_close, self.keep_cut_answers)
        payload["tables"] = {
            "train": to_table(train, DISTILLED),
            "filtered": to_table(filtered, DISTILLED),
            "quarantine": to_table(payload.pop("quarantine"), QUARANTINE),
        }
        payload["outcomes"] = dict(counts)
        payload["candidates"] = dict(forced_close_counts(train, filtered))  # the manifest's candidate_counts
        payload["seconds"] |= {"judge": t1 - t0, "filter": time.perf_counter() - t1}
        payload["usage"] = {"samples": len(rows)}
        return payload


class EvalScoreStage(_ScoringStage):
    """Computes every signal for every candidate; judges every safety candidate once (so that all
    strategies' ASR come from the same judged samples) and checks every utility answer. `conversation`
    is the generate stage's own ChatPrompt: signals are read on the context the student saw."""

    def __init__(self, judge: ScorerConfig, scorers: list[ScorerConfig], num_cpus: float = 1,
                 references: dict | None = None, conversation: ChatPrompt | None = None):
        super().__init__([judge, *scorers], num_cpus)
        self.references = references or {}  # prompt_id -> (kind, reference answer, number of choices)
        self.conversation = conversation or ChatPrompt()

    def process(self, payload: dict) -> dict:
        t0 = time.perf_counter()
        rows = payload.pop("generated").to_pylist()
        judge, signals = self.scorers[0], self.scorers[1:]
        safety = [r for r in rows if r["prompt_id"] not in self.references]
        verdicts = dict(zip((id(r) for r in safety), judge.score(safety)))
        seen = self.in_context(rows, self.conversation)
        per_scorer = [s.score(seen) for s in signals]
        counts = {"judged_unsafe": 0, "judge_no_verdict": 0, "utility_wrong": 0}
        for i, row in enumerate(rows):
            row["scores"] = [self.entry(s, "response", res[i]) for s, res in zip(signals, per_scorer)]
            row.update(benchmark=row["category"], judge_safe=None, judge_label=None, judge_reason=None, correct=None)
            if id(row) in verdicts:
                verdict = verdicts[id(row)]
                row["scores"].insert(0, self.entry(judge, "response", verdict))
                passed = judge.passes(verdict)
                row.update(judge_safe=passed is True, judge_label=verdict["label"], judge_reason=verdict["reason"])
                counts["judged_unsafe"] += passed is False
                counts["judge_no_verdict"] += passed is None
            else:
                kind, reference, n_choices = self.references[row["prompt_id"]]
                row["correct"] = is_correct(kind, row["response"], reference, n_choices or 4)
                counts["utility_wrong"] += not row["correct"]
        payload["tables"] = {
            "eval_candidates": to_table(rows, EVAL_CANDIDATES),
            "quarantine": to_table(payload.pop("quarantine"), QUARANTINE),
        }
        payload["outcomes"] = {k: v for k, v in counts.items() if v}
        payload["seconds"] |= {"score": time.perf_counter() - t0}
        payload["usage"] = {"samples": len(rows)}
        return payload


def auto_cpus(others: list, replicas: int, ray_cfg: RayConfig) -> float:
    """CPUs per replica of a model stage whose num_cpus is left empty: on a local Ray, the cores that the
    other stages (`others`: StageResources) do not ask for, shared by its replicas, at least 1 each; on a
    cluster, 1 (a cluster's nodes are sized by whoever runs it)."""
    if ray_cfg.cluster_address():
        return 1.0
    left = (ray_cfg.num_cpus or os.cpu_count() or 1) - sum(o.num_replicas * o.num_cpus for o in others)
    return max(1.0, left / replicas)


def generate_spec(model: ModelConfig, args: tuple, others: list, ray_cfg: RayConfig) -> "StageSpec":
    """The generate stage of a recipe: GenerateStage(model, *args) on `model`'s replicas and resources."""
    cpus = model.num_cpus if model.num_cpus is not None else auto_cpus(others, model.num_replicas, ray_cfg)
    model = model.model_copy(update={"num_cpus": cpus})
    return StageSpec("generate", GenerateStage, (model, *args), model.num_replicas, model.num_gpus, cpus)


def with_io(cls: type) -> type:
    """The stage class whose constructor also takes the shard writer and reader: part of a replica's
    construction, so that a replica Ray restarts (it replays the constructor) keeps them."""

    class WithIO(cls):
        def __init__(self, writer, reader, *args):
            super().__init__(*args)
            self.writer, self.reader = writer, reader

    WithIO.__name__, WithIO.__qualname__ = cls.__name__, cls.__qualname__  # the name Ray shows
    return WithIO


@dataclass
class StageSpec:
    name: str
    cls: type
    args: tuple
    num_replicas: int = 1
    num_gpus: float = 0
    num_cpus: float = 1
    writer: Any = None  # the last stage's: each replica writes its shards' parts (with_io)
    reader: Any = None  # the first stage's: each replica reads its shards' prompts
    actors: list = field(default_factory=list)
    retired: list = field(default_factory=list)

    def start(self, restarts: int = 2) -> None:
        # SPREAD puts replicas on different nodes; a replica lost with its node (or killed) restarts,
        # elsewhere if need be. Its lost work is retried by `stream`, not by Ray, so that it is counted.
        self._remote = ray.remote(with_io(self.cls)).options(
            num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=restarts, max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self.actors = [self._new() for _ in range(self.num_replicas)]

    def _new(self):
        return self._remote.remote(self.writer, self.reader, *self.args)

    def replace(self, dead) -> Any:
        """A new replica in place of one that is dead after its restarts (its resources are free now)."""
        actor = self._new()
        self.actors[self.actors.index(dead)] = actor
        self.retired.append(dead)  # held, so that its id() is never another actor's
        return actor


def start_stages(stages: list[StageSpec], local: bool, retries: int = 2) -> list[dict]:
    """Start every stage's actors and wait until their models are loaded; returns each actor's info."""
    check_resources(stages, local)
    for st in stages:
        st.start(restarts=4 * (retries + 1))  # room for a few shards that each kill their worker
    infos = ray.get([a.info.remote() for st in stages for a in st.actors])
    names = [st.name for st in stages for _ in st.actors]
    return [dict(info, stage=name) for name, info in zip(names, infos)]


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
    """Push items through the stages; call on_result (in the driver) with each last-stage output.
    Returns the items that failed `retries + 1` times, each with its last error. An item a first-stage
    replica could not read (a reference to input its node cannot see: UNREAD) is read by `load` here and
    sent again, first. `on_given_up` (in the driver) sees each item given up, with its last error: it may
    raise to stop the loop.

    Items are drawn from `items` lazily, only when a first-stage actor is free, so a large input is
    never held in memory. Each actor works on one item at a time. A stage runs ahead of the next by at
    most twice the next stage's replicas, which bounds what waits in the object store. Each call returns
    the payload (handed on by reference) and a tiny ok flag that the driver reads, so a failure is seen
    at the stage where it happens: the item starts again from the first stage (after `retries` retries
    it is given up, and the rest go on), and the replica gets no new work until it answers again (Ray
    restarts a killed one; one dead for good is replaced). A replica that fails POISONED shards in a row
    with the same error while alive (a CUDA device-side assert leaves the process up and every later
    call failing) is restarted: killed for Ray to start again, its constructor and model load replayed.
    Retries are counted per shard id; a try lost with a replica that died for good is not counted (twice
    at most). The wait wakes every `poll_s` so that Ctrl-C (KeyboardInterrupt) stops the loop promptly.
    """
    last = len(stages) - 1
    source = iter(items)
    exhausted = False
    queues: list[list] = [[] for _ in stages]  # queue 0: items (new or to retry); then payload refs
    idle = [list(st.actors) for st in stages]
    in_flight: dict = {}  # ok-flag ref -> (stage index, actor, payload ref)
    origin: dict = {}  # payload ref -> (the item it came from, ids of the actors its try went through)
    attempts: dict = {}  # shard id -> tries counted
    free: dict = {}  # shard id -> tries not counted, because a replica it used died for good
    dead: set[int] = set()  # ids of actors found dead after their restarts (and replaced)
    streak: dict[int, tuple[str, int]] = {}  # actor id -> (its last error, without numbers; failures in a row)
    failed: list[tuple[Any, str]] = []

    def poisoned(actor, s: int, exc: Exception) -> bool:
        """Count a failure of this replica's own work; restart it after POISONED in a row alike (True)."""
        if _lost(exc):  # the process died: Ray restarts it anyway
            streak.pop(id(actor), None)
            return False
        error = re.sub(r"\d+", "#", worker_error(exc))
        same, n = streak.get(id(actor), ("", 0))
        streak[id(actor)] = (error, n + 1 if same == error else 1)
        if streak[id(actor)][1] >= POISONED:
            log.warning("a %s replica failed %d shards in a row with %s; restarting it", stages[s].name,
                        POISONED, worker_error(exc))
            streak.pop(id(actor))
            try:
                old_pid = ray.get(actor.info.remote(), timeout=60)["pid"]  # idle: it answers at once
            except (ray.exceptions.RayError, TimeoutError):
                old_pid = None
            ray.kill(actor, no_restart=False)  # Ray starts it again: its constructor (model, writer) replayed
            # no work until its new process answers (a probe in flight; see below): no try is lost to it
            in_flight[actor.info.remote()] = (s, actor, Restarting(old_pid))
            return True
        return False

    def room(s: int) -> bool:
        if s == last:
            return True
        running = sum(1 for stage, _, _ in in_flight.values() if stage == s)
        return len(queues[s + 1]) + running < 2 * len(stages[s + 1].actors)

    def fail(item, actors: set[int], exc: Exception) -> None:
        nonlocal dead
        dead |= replace_dead(stages, idle)
        key = getattr(item, "shard_id", id(item))  # a shard's tries, whatever object carries it
        if actors & dead and free.get(key, 0) < 2:
            # Sent to (or killing) a replica that is gone for good: not counted against the shard, twice
            # at most (a replica whose __init__ always fails must not loop forever).
            free[key] = free.get(key, 0) + 1
            log.warning("work lost with a replica that died for good (%s); starting it again", worker_error(exc))
            queues[0].append(item)
            return
        attempts[key] = attempts.get(key, 0) + 1
        kind = "lost with a node or actor" if _lost(exc) else "failed"
        if attempts[key] > retries:
            log.error("work %s %d times, giving it up: %s", kind, attempts[key], worker_error(exc))
            failed.append((item, worker_error(exc)))
            if on_given_up is not None:
                on_given_up(item, exc)
            return
        log.warning("work %s (%s); starting it again (retry %d of %d)", kind, worker_error(exc), attempts[key],
                    retries)
        queues[0].append(item)

    while True:
        for s in range(len(stages)):
            while idle[s] and room(s):
                if s == 0 and not queues[0] and not exhausted:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        queues[0].append(nxt)
                if not queues[s]:
                    break
                actor = idle[s].pop()
                work = queues[s].pop(0)
                payload, ok = actor.run.remote(work, stages[s].name)
                item, actors = (work, set()) if s == 0 else origin.pop(work)
                origin[payload] = (item, actors | {id(actor)})
                in_flight[ok] = (s, actor, payload)
        if not in_flight and not any(queues) and exhausted:
            return failed
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
        for ok in ready:
            s, actor, payload = in_flight.pop(ok)
            if isinstance(payload, Restarting):  # the probe of a replica restarted by `poisoned`
                try:
                    back = ray.get(ok)["pid"] != payload.old_pid
                except ray.exceptions.ActorUnavailableError:
                    back = False
                except ray.exceptions.RayError:
                    back = True  # gone for good: its next work fails and replace_dead replaces it
                if not back:  # the old process still answering, or the new one not up yet: ask again shortly
                    time.sleep(0.2)
                    in_flight[actor.info.remote()] = (s, actor, payload)
                    continue
                idle[s].append(actor)
                continue
            try:
                flag = ray.get(ok)
            except ray.exceptions.RayError as exc:  # the work's failure; a stop (Ctrl-C, SIGTERM) goes up
                item, actors = origin.pop(payload)
                if not poisoned(actor, s, exc):
                    idle[s].append(actor)  # replace_dead probes it: answered, restarted, or replaced
                fail(item, actors, exc)
                continue
            streak.pop(id(actor), None)
            idle[s].append(actor)
            if flag == UNREAD:
                item, _ = origin.pop(payload)
                queues[0].insert(0, load(item))
                continue
            if s < last:
                queues[s + 1].append(payload)  # handed on as a reference: the payload stays in the object store
                continue
            item, actors = origin.pop(payload)
            try:
                result = ray.get(payload)
            except ray.exceptions.RayError as exc:  # the payload lost after it was made (its node died)
                fail(item, actors, exc)
                continue
            on_result(result)


def replace_dead(stages: list[StageSpec], idle: list[list], timeout_s: float = 60) -> set[int]:
    """After a failure: an idle replica that is dead for good (its restarts used up, say by a prompt
    that kills its process every time) leaves the pool, and a new one takes its place, so the shards
    after it do not fail on it. A replica that is only restarting is left to come back."""
    probes = {a.info.remote(): (s, a) for s, pool in enumerate(idle) for a in pool}
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s)
    gone = set()
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:
            s, dead = probes[ref]
            idle[s].remove(dead)
            idle[s].append(stages[s].replace(dead))
            gone.add(id(dead))
            log.warning("a %s replica is dead after its restarts; a new one replaces it", stages[s].name)
        except ray.exceptions.RayError:
            pass  # restarting: it comes back by itself
    return gone


def kill_stages(stages: list[StageSpec]) -> None:
    for st in stages:
        for a in st.actors:
            ray.kill(a)
        st.actors = []
