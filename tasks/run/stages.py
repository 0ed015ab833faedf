"""The stage actors and how they are started: each loads its model (or scorers) once in its constructor and
turns one shard's payload into the next (Ray Data LLM style: a stage is plain data, its actor class, its
constructor arguments and its resource request: StageSpec).

The first stage's replicas read their shard's prompts themselves and the last stage's write its parts
themselves (with_io); the driver reads or writes only what a replica hands back (see tasks/run/scheduler.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from dafactory.tasks.config import (
    ModelConfig,
    RayConfig,
    SamplingConfig,
    ScorerConfig,
    SelectionConfig,
)
from dafactory.tasks.distill.filtering import (
    distill_rows,
    forced_close_counts,
    judgeable,
    parse_rows,
)
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


def use_cpus(num_cpus: float) -> None:
    """Give torch as many threads as the replica was granted CPUs (Ray's default is one)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, math.ceil(num_cpus)))


def check_resources(stages: list[StageSpec], local: bool) -> None:
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


CANNOT_READ = "cannot read"  # the ok flag of a first-stage replica that could not read its shard (see ShardReader)


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
    streams = False  # process() may run for several items at once (see run)
    _engine = threading.Lock()  # replaced per replica (a class attribute so that subclasses need not call us)

    @ray.method(num_returns=2)
    def run(self, work, stage: str = ""):
        """One item, read, processed and written. A replica holds up to `in_flight` of them at once (threads):
        process() (the model) takes them one at a time, unless the stage `streams` (a generate stage whose
        backend feeds one engine from every call: tasks/generate/feed.py); reading the next shard's prompts,
        handing payloads over and writing the last one's parts overlap it."""
        entered = time.time()
        if isinstance(work, ShardRef):
            # a replica whose node cannot see the folder hands the shard back: the driver reads it then
            work = None if self.reader is None else self.reader.in_replica(work)
            if work is None:
                return None, CANNOT_READ
        with contextlib.nullcontext() if self.streams else self._engine:
            t0 = time.perf_counter()
            out = self.process(work)
            busy = time.perf_counter() - t0
        out.setdefault("work", {})[stage] = {"busy_s": busy, **out.pop("usage", {})}
        # when this replica's process held the item: from its arrival to the end of process()
        out.setdefault("spans", {})[stage] = [os.getpid(), entered, time.time()]
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
        self.streams = self.backend.feed is not None
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return worker_info() | {
            "load_seconds": self.load_seconds, "model": self.backend.model_id, "revision": self.backend.revision
        }

    def process(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        engine = Counter()
        rows, quarantine = generate_shard(
            self.backend, shard, self.n, self.sampling, self.model.batch_size, self.conversation, engine=engine
        )
        if self.streams:  # the shared engine's steps since the last shard's report: shards' sums are the replica's
            engine = self.backend.feed.take_stats()
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
            "usage": generation_usage(rows) | {k: round(v, 6) for k, v in engine.items()},
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


def generate_spec(model: ModelConfig, args: tuple, others: list, ray_cfg: RayConfig) -> StageSpec:
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
            self.writer, self.reader, self._engine = writer, reader, threading.Lock()

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
    in_flight: int = 1  # items a replica holds at once (see Stage.run)
    writer: Any = None  # the last stage's: each replica writes its shards' parts (with_io)
    reader: Any = None  # the first stage's: each replica reads its shards' prompts
    actors: list = field(default_factory=list)
    retired: list = field(default_factory=list)

    def start(self, restarts: int = 2) -> None:
        # SPREAD puts replicas on different nodes; a replica lost with its node (or killed) restarts,
        # elsewhere if need be. Its lost work is retried by `stream`, not by Ray, so that it is counted.
        self._remote = ray.remote(with_io(self.cls)).options(
            num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=restarts, max_task_retries=0,
            scheduling_strategy="SPREAD", max_concurrency=max(1, self.in_flight),
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


def kill_stages(stages: list[StageSpec]) -> None:
    for st in stages:
        for a in st.actors:
            ray.kill(a)
        st.actors = []
