"""Prefect task wrappers shared by the flows: prepare, build shards on Ray, finalize.

A Recipe is what differs between flows: the Ray stages, the tables each shard writes, and the name of
the per-shard outcome counts in the manifest. Everything else (claiming the output, resume by shard,
progress, retries, the manifest written last) is the same code for every flow.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_API_URL

from dafactory.tasks.config import RunConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.error_rate import ErrorBudget, TooManyErrors
from dafactory.tasks.io.manifest import CARD, artifact_key, build_manifest, code_version, dataset_card, summary_rows
from dafactory.tasks.io.prompts import (
    PromptRow,
    PromptSet,
    add_late,
    bucket_of,
    choose_buckets,
    id_hashes,
    iter_prompts,
    shard_id_of,
    source_path,
)
from dafactory.tasks.io.redact import redact
from dafactory.tasks.io.commit import clear_rebuild, commit, record_rebuild, vacuum, write_pointer_file
from dafactory.tasks.io.schemas import PROMPTS, QUARANTINE, TABLES, to_table
from dafactory.tasks.io.storage import (
    REBUILD,
    DatasetDir,
    ShardReader,
    ShardRef,
    ShardWriter,
    failpoint,
    load_shard,
    part_key,
    part_name,
    storage_options,
)
from dafactory.tasks.run.workers import (
    StageSpec, gc_frozen, kill_stages, ray_session, start_stages, stream, worker_error,
)

GPU_LIMIT = "dafactory-gpu"
# API URLs of the Prefect servers that a command started for itself (flows.cli): like Prefect's temporary
# server, no other build shares them, so they hold no GPU limit
TEMPORARY_SERVERS: set[str] = set()


@dataclass
class Recipe:
    name: str
    stages: list[StageSpec]
    tables: list[str]  # written per shard, in order; the last marks the shard done
    outcomes_key: str  # manifest key of per-shard outcome counts, e.g. "unpaired_prompts"
    salt: str  # shard ids hash this with their prompt ids: what decides the generated text
    sample_tables: list[str]  # tables that together hold one row per generated sample (for progress)
    one_row_per_prompt: list[str] = field(default_factory=list)  # e.g. pairs: at most one row per prompt
    manifest_extra: dict = field(default_factory=dict)
    # Runs after the last shard, before the manifest: whole-dataset summaries (evaluation's ASR tables
    # and report) over this version's parts (table -> part names). Returns more manifest fields; the
    # tables it writes are listed in summary_tables.
    post: Callable[[DatasetDir, dict[str, set[str]]], dict] | None = None
    summary_tables: list[str] = field(default_factory=list)
    main_table: str = ""  # the dataset card's default config (what a trainer reads)


@dataclass
class Plan:
    shards: list[ShardRef] = field(default_factory=list)
    source_rows: int = 0
    duplicates: int = 0
    quarantined: Counter = field(default_factory=Counter)  # input rows set aside, by reason
    quarantine_parts: list[str] = field(default_factory=list)
    buckets: int = 0  # id ranges the prompts were cut into (kept by the next build of the folder)
    screened: dict = field(default_factory=dict)  # what the screen set aside, by rule (see tasks/screen/rules.py)

    @property
    def unique(self) -> int:
        return sum(s.prompts for s in self.shards)


class Planner:
    """Plans the input into shards by content, streaming it: every unique prompt goes to the shard of
    the id range its prompt id falls in (about `shard_size` prompts per range; see choose_buckets), so
    a reordered input plans the same shards and an edit changes only the shards of the prompts it
    touches. Within a shard, prompts are in id order.

    The input is held whole neither in memory nor on the store: batches are split by id range into
    2**GROUP_BITS spill files on local disk, then each file is read alone, cut into shards, and each shard's
    prompts staged (with the input quarantine) in the dataset's `prompts` table."""

    GROUP_BITS = 6  # 64 spill files, each an equal range of ids (their top bits)

    def __init__(self, ds: DatasetDir, shard_size: int, salt: str, previous_buckets: int | None = None,
                 quarantine_rows: int = 50_000):
        self.ds, self.shard_size, self.salt, self.quarantine_rows = ds, shard_size, salt, quarantine_rows
        self.previous_buckets = previous_buckets
        self.plan, self.quarantine, self.unique = Plan(), [], 0
        # parts an earlier plan of the same content wrote (one listing each): not uploaded again
        self.existing = {t: set(ds.parts(t)) for t in ("prompts", "quarantine")}
        self.spill = tempfile.TemporaryDirectory(prefix="dafactory-plan-")
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        # Categories that repeats brought to prompts already spilled (iter_prompts' `late`): added when
        # their spill file is read back, so that the input is read once.
        self.late: dict[str, tuple[str, ...]] = {}

    def add(self, batch: PromptSet) -> None:
        self.plan.source_rows += batch.source_rows
        self.plan.duplicates += batch.duplicates
        self.plan.quarantined.update(q["reason"] for q in batch.quarantine)
        self.quarantine += batch.quarantine
        if batch.rows:
            self._spill(batch.rows)
        if len(self.quarantine) >= self.quarantine_rows:
            self._quarantine()

    def _spill(self, rows: list[PromptRow]) -> None:
        h = id_hashes([r.prompt_id for r in rows])
        table = pa.table({
            "h": h, "prompt_id": [r.prompt_id for r in rows], "source_row": [r.source_row for r in rows],
            "prompt": [r.prompt for r in rows], "category": [r.category for r in rows],
            "categories": [list(r.categories) for r in rows],
            "reference": [None if r.reference is None else json.dumps(r.reference) for r in rows],
        }, schema=SPILL)
        groups = h >> np.uint64(64 - self.GROUP_BITS)
        for g in np.unique(groups).tolist():
            if g not in self.writers:
                self.writers[g] = pa.ipc.new_file(os.path.join(self.spill.name, f"{g:02d}.arrow"), SPILL)
            self.writers[g].write_table(table.filter(pa.array(groups == g)))
        self.unique += len(rows)

    def _shard(self, rows: pa.Table) -> None:
        # what decides a shard's rows besides the salt (model, sampling, spec, template): each prompt's id,
        # its categories (the teacher's policy, the rows' category) and its reference (utility scoring)
        keys = [f"{pid}\x1f{chr(30).join(cats or ())}\x1f{ref or ''}" for pid, cats, ref in zip(
            rows.column("prompt_id").to_pylist(), rows.column("categories").to_pylist(),
            rows.column("reference").to_pylist())]
        shard_id = shard_id_of(self.salt, keys)
        part = self.ds.write_keyed("prompts", shard_id, rows.drop_columns(["h"]).append_column(
            "shard_id", pa.array([shard_id] * rows.num_rows, pa.string())), self.existing["prompts"])
        self.plan.shards.append(ShardRef(shard_id, len(self.plan.shards), rows.num_rows, part))
        failpoint("plan")

    def _add_late(self, table: pa.Table) -> pa.Table:
        if not self.late:
            return table
        ids = table.column("prompt_id").to_pylist()
        hits = [j for j, pid in enumerate(ids) if pid in self.late]
        if not hits:
            return table
        cats, joined = table.column("categories").to_pylist(), table.column("category").to_pylist()
        for j in hits:
            merged, joined[j] = add_late(tuple(cats[j] or ()), self.late[ids[j]])
            cats[j] = list(merged)
        table = table.set_column(table.schema.get_field_index("categories"), "categories",
                                 pa.array(cats, table.schema.field("categories").type))
        return table.set_column(table.schema.get_field_index("category"), "category",
                                pa.array(joined, table.schema.field("category").type))

    def _quarantine(self) -> None:
        key = f"input-{len(self.plan.quarantine_parts):05d}"
        self.plan.quarantine_parts.append(self.ds.write_keyed("quarantine", key, to_table(self.quarantine, QUARANTINE),
                                                              self.existing["quarantine"]))
        self.quarantine = []

    def finish(self) -> Plan:
        for writer in self.writers.values():
            writer.close()
        self.plan.buckets = choose_buckets(self.unique, self.shard_size, self.previous_buckets)
        carry = None  # the last bucket of a group file may go on in the next one (same id range)
        for g in sorted(self.writers):
            with pa.memory_map(os.path.join(self.spill.name, f"{g:02d}.arrow")) as source:
                table = pa.ipc.open_file(source).read_all()
            table = self._add_late(table if carry is None else pa.concat_tables([carry, table]))
            table = table.take(pc.sort_indices(table, [("h", "ascending")]))
            buckets = bucket_of(table.column("h").to_numpy(), self.plan.buckets)
            starts = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist()]
            for lo, hi in zip(starts[:-1], starts[1:]):
                self._shard(table.slice(lo, hi - lo))
            carry = table.slice(starts[-1])
        if carry is not None:
            self._shard(carry)
        self.spill.cleanup()
        if self.quarantine or not self.plan.quarantine_parts:
            self._quarantine()
        return self.plan


# A planned prompt on its way through the spill files: PROMPTS without shard_id, with the id as uint64.
SPILL = pa.schema([("h", pa.uint64()), *(f for f in PROMPTS if f.name != "shard_id")])


@task(name="prepare", cache_policy=NONE)
def plan_input(
    config: RunConfig,
    ds: DatasetDir,
    salt: str,
    screen: Callable[[PromptSet, dict], PromptSet] | None = None,
    load: Callable[[], PromptSet] | None = None,
) -> Plan:
    """Stream the prompts (config.prompts unless `load` is given) through the flow's screen, and stage
    them as shards. No model loads here."""
    logger = get_run_logger()
    previous = ds.read_manifest()  # the id ranges of the folder's last version, kept while the input fits
    planner = Planner(ds, config.shard_size, salt, (previous or {}).get("shards", {}).get("buckets"))
    # With no screen, the input is read once (categories of repeats are added at the end, see Planner);
    # a screen must see each row's categories whole, so the input is read twice then.
    late = planner.late if screen is None else None
    for batch in [load()] if load is not None else iter_prompts(config.prompts, late=late):
        # the screen hands categories of the duplicates it drops to their first rows through planner.late
        planner.add(screen(batch, planner.late) if screen is not None else batch)
    plan = planner.finish()
    if screen is not None and hasattr(screen, "summary"):
        plan.screened = screen.summary()
    logger.info(
        "%d source rows: %d unique prompts in %d shards, %d set aside (%s) into %s",
        plan.source_rows, plan.unique, len(plan.shards), sum(plan.quarantined.values()),
        ", ".join(f"{k} {v}" for k, v in sorted(plan.quarantined.items())) or "none", ds.uri,
    )
    return plan


def plan_key(context, parameters: dict) -> str | None:
    """What decides a plan: the dataset, the config's content, the salt, the code version and the input
    file's identity (size and modification time, or the object's ETag). None (no caching) for inputs
    the flow loads itself (evaluation benchmarks)."""
    if parameters.get("load") is not None:
        return None
    config, ds = parameters["config"], parameters["ds"]
    src = source_path(config.prompts)
    fs, path = fsspec.core.url_to_fs(src)
    ident = [ds.uri, config.fingerprint(), parameters["salt"], code_version().get("git_commit", ""),
             src, str(fs.ukey(path))]
    return "dafactory-plan-" + hashlib.sha256("\x00".join(ident).encode()).hexdigest()[:32]


def result_options(config: RunConfig) -> dict:
    """Task options that persist results to `config.result_storage` and cache the plan there."""
    if not config.result_storage:
        return {}
    from prefect.cache_policies import CacheKeyFnPolicy
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    uri = config.result_storage
    if "://" in uri and not uri.startswith("file://"):
        # Prefect keeps result storage as a block on its server, so it carries no credentials: they come
        # from the worker's AWS environment or profile (a storage_block's keys are not copied into it).
        storage = RemoteFileSystem(basepath=uri.rstrip("/"), settings=storage_options(uri, config.storage_timeout_s))
    else:
        storage = LocalFileSystem(basepath=str(Path(uri.removeprefix("file://")).expanduser().resolve()))
    storage.save(f"dafactory-results-{hashlib.sha256(storage.basepath.encode()).hexdigest()[:12]}", overwrite=True)
    return {"persist_result": True, "result_storage": storage, "cache_policy": CacheKeyFnPolicy(cache_key_fn=plan_key)}


def not_user_error(task, task_run, state) -> bool:
    """Retry crashes and transient faults, not bad input: that fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


STOPS = (KeyboardInterrupt, TerminationSignal)  # Ctrl-C, and SIGTERM (a cancel from the Prefect UI)


def stop_in(exc: BaseException) -> BaseException | None:
    """The stop (Ctrl-C, SIGTERM) behind an exception: a signal that lands inside Ray's C code surfaces
    as a SystemError whose context is the stop."""
    while exc is not None:
        if isinstance(exc, STOPS):
            return exc
        exc = exc.__context__
    return None


@contextmanager
def sigterm_stops():
    """While shards stream, SIGTERM (how a Prefect runner cancels a run, and how Kubernetes stops a pod)
    stops the build like Ctrl-C does, instead of Ray's driver handler (installed by ray.init) exiting the
    process at once. The handler is Prefect's own SIGTERM bridge: it raises TerminationSignal, and a
    runner that sees it installed can record the cancellation, so the run ends Cancelled, not Crashed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        from prefect.utilities.engine import _prefect_sigterm_handler as stop
    except ImportError:  # another Prefect: the same behaviour, without the runner's acknowledgement

        def stop(signum, frame):
            raise TerminationSignal(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@task(cache_policy=NONE, retry_delay_seconds=5, retry_condition_fn=not_user_error)
def build_shards(config: RunConfig, ds: DatasetDir, plan: Plan, recipe: Recipe) -> dict:
    """Run every shard not yet written through the recipe's Ray stages; stage each as it finishes.
    A stop (Ctrl-C, SIGTERM) keeps what is written and returns; shards that keep failing are listed."""
    logger = get_run_logger()
    done = resumable(ds, plan, recipe, ds.read_manifest())
    pending = [s for s in plan.shards if s.shard_id not in done]
    report = {"resumed": len(plan.shards) - len(pending), "built": 0, "workers": [], "seconds": {},
              "failed": [], "stopped": None, "stats": {}, "resumed_stats": done, "held_s": 0.0,
              # what each stage's actors asked Ray for (the manifest's resource-seconds)
              "stages": [{"name": st.name, "replicas": st.num_replicas, "num_cpus": st.num_cpus,
                          "num_gpus": st.num_gpus} for st in recipe.stages]}
    if report["resumed"]:
        logger.info("resuming: %d of %d shards already written", report["resumed"], len(plan.shards))
    budget = ErrorBudget(config.max_error_rate)
    for stats in done.values():
        budget.add_stats(stats)
    if budget.exceeded():
        report["error_rate"] = budget.message()
    if not pending or budget.exceeded():
        return report
    progress = create_progress_artifact(0.0, key=artifact_key(config.dataset, f"{recipe.name}-progress"),
                                        description=f"shards of {ds.uri}")
    report["gpu_slot"] = {}
    with gpu_slot(config.gpu_slot_timeout_s, report["gpu_slot"]):
        _run_stages(config, ds, pending, recipe, report, progress, budget)
    return report


class SlotTimeout(Exception):
    """No slot of the global GPU limit came free within gpu_slot_timeout_s."""


@contextmanager
def gpu_slot(timeout_s: float, record: dict):
    """One slot of the global GPU limit (`dafactory serve` creates it on the Prefect server), taken
    before any stage actor is created or any model loads and held until they are gone: two scheduled
    builds never hold the cluster's GPUs at once. Logs while it waits; ephemeral runs have no limit."""
    if not PREFECT_API_URL.value() or PREFECT_API_URL.value() in TEMPORARY_SERVERS:
        yield
        return
    logger = get_run_logger()
    t0 = time.time()
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(GPU_LIMIT, occupy=1, timeout_seconds=1, strict=False))
        except TimeoutError:
            logger.info("waiting for a slot of %s (another build holds it), at most %gs", GPU_LIMIT, timeout_s)
            try:
                stack.enter_context(concurrency(GPU_LIMIT, occupy=1, timeout_seconds=timeout_s, strict=False))
            except TimeoutError:
                raise SlotTimeout(f"no slot of {GPU_LIMIT} came free within {timeout_s:g}s "
                                  "(gpu_slot_timeout_s); another build holds it") from None
        record.update(acquired_at=time.time(), waited_s=round(time.time() - t0, 3))
        if record["waited_s"] >= 1:
            logger.info("took a slot of %s after %.1fs", GPU_LIMIT, record["waited_s"])
        try:
            yield
        finally:
            record["released_at"] = time.time()


def _run_stages(config: RunConfig, ds: DatasetDir, pending: list[ShardRef], recipe: Recipe, report: dict,
                progress, budget: ErrorBudget) -> None:
    """Start the recipe's actors, stream the pending shards through them, stop them. The run stops early
    when its generation errors so far break `max_error_rate` (`budget`)."""
    logger = get_run_logger()
    t0 = ready = time.perf_counter()
    try:
        on_cluster = bool(config.ray.cluster_address())
        # The last stage's replicas write their shards' parts; the driver writes those they hand back.
        writer = ShardWriter(ds, tuple(recipe.tables), tuple(recipe.sample_tables))
        replicas_ds = ds.for_replicas()
        recipe.stages[-1].writer = ShardWriter(replicas_ds, writer.tables, writer.sample_tables)
        recipe.stages[0].reader = ShardReader(replicas_ds)
        report["workers"] = start_stages(recipe.stages, local=not on_cluster, retries=config.shard_retries)
        ready = time.perf_counter()  # every replica holds its resources and its model from here
        report["seconds"]["load_models"] = ready - t0
        logger.info("workers ready in %.1fs: %s", report["seconds"]["load_models"],
                    ", ".join(f"{w['stage']}@{w['node']}" for w in report["workers"]))
        rows, t1 = 0, time.perf_counter()

        handed_back, read_back = [], []

        def read_here(ref: ShardRef):
            read_back.append(ref.shard_id)
            return load_shard(ds, ref)

        def on_result(result: dict) -> None:
            nonlocal rows
            if "written" in result:
                stats = result["written"]
            else:
                if result.get("unwritten") and not handed_back:
                    logger.warning("the driver writes shards a replica could not: %s", result["unwritten"])
                handed_back.append(result["shard_id"])
                stats = writer(result)
            report["stats"][stats["shard_id"]] = stats
            budget.add_stats(stats)
            failpoint("shard")
            report["built"] += 1
            rows += sum(stats["rows"][t] for t in recipe.sample_tables)
            for k, v in stats["seconds"].items():
                report["seconds"][k] = report["seconds"].get(k, 0.0) + v
            logger.info("shard %d/%d written: %s (%.1f samples/s)", report["built"], len(pending),
                        ", ".join(f"{k} {v}" for k, v in stats["rows"].items() if k != "quarantine"),
                        rows / (time.perf_counter() - t1))
            update_progress_artifact(progress, 100.0 * report["built"] / len(pending))
            if budget.exceeded():
                raise budget.error()

        def on_given_up(ref, exc: BaseException) -> None:
            report["failed"].append({"shard_id": ref.shard_id, "index": ref.index, "error": worker_error(exc),
                                     "prompts": ref.prompts if isinstance(ref, ShardRef) else len(ref.rows)})
            # a shard that failed on its own error rate every try still counts in the run's
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, TooManyErrors):
                budget.add(cause.prompts, cause.errors, cause.first)
                if budget.exceeded():
                    raise budget.error()

        try:
            with sigterm_stops():
                # shards go as references: the first stage's replicas read them (ShardReader)
                stream(recipe.stages, pending, on_result, retries=config.shard_retries, load=read_here,
                       on_given_up=on_given_up)
        except TooManyErrors as exc:  # not retried: the same seeds would meet the same fault
            report["error_rate"] = str(exc)
            logger.error("stopping the build after %d of %d shards: %s", report["built"], len(pending), exc)
        except BaseException as exc:
            stop = stop_in(exc)
            if stop is None:
                raise
            report["stopped"] = type(stop).__name__
            logger.warning("stopped (%s) after %d of %d shards; keeping them", report["stopped"],
                           report["built"], len(pending))
        report["seconds"]["build_wall"] = time.perf_counter() - t1
        report["written_by_driver"], report["read_by_driver"] = len(handed_back), len(read_back)
    finally:
        kill_stages(recipe.stages)
        if report["workers"]:
            report["held_s"] = time.perf_counter() - ready


def shard_parts(ds: DatasetDir, plan: Plan, recipe: Recipe, previous: dict | None,
                built: dict[str, dict] | None = None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Which planned shards are done, and the part name (`<shard id>@<token>`) of each: a shard is done
    when a marker part (its table written last) and every other table's part of that name are there.
    When several writes of a shard are (a retry, a concurrent run), this run's is taken, else the one
    the current version lists, else the first by name. One listing per table. Returns (shard id -> part
    name, table -> its listing)."""
    tables = list(dict.fromkeys(recipe.tables))
    listed = {t: ds.parts(t) for t in tables}
    required = [t for t in tables if t != "quarantine"]  # an empty quarantine has no part
    whole: dict[str, list[str]] = {}
    for name in listed[recipe.tables[-1]]:
        if all(name in listed[t] for t in required):
            whole.setdefault(part_key(name), []).append(name)
    in_previous = {part_name(f) for f in (ds.files(previous).get(recipe.tables[-1], []) if previous else [])}
    built = built or {}
    chosen = {}
    for ref in plan.shards:
        names = sorted(whole.get(ref.shard_id, ()))
        if not names:
            continue
        ours = built.get(ref.shard_id, {}).get("part")
        chosen[ref.shard_id] = ours if ours in names else next((n for n in names if n in in_previous), names[0])
    return chosen, listed


def resumable(ds: DatasetDir, plan: Plan, recipe: Recipe, previous: dict | None) -> dict[str, dict]:
    """The stats (with their part name) of the planned shards that are done, read from their markers'
    footers, concurrently. A marker that is not whole Parquet (a truncated upload, a bad actor) does
    not count: its shard is built again. So does a shard with generation errors that no complete version
    holds (a run that failed on its error rate): what failed is retried, what a complete version holds is kept."""
    chosen, listed = shard_parts(ds, plan, recipe, previous)
    names = list(chosen.values())
    kept = set()
    if previous is not None and previous["status"] == "complete":
        kept = {part_name(f) for f in ds.files(previous).get(recipe.tables[-1], [])}
    done, retried = {}, 0
    for name, stats in zip(names, ds.marker_stats([listed[recipe.tables[-1]][n] for n in names], errors=True)):
        if isinstance(stats, Exception):
            get_run_logger().warning("%s: the marker part %s is unreadable (%s); its shard is built again", ds.uri, name,
                        str(stats).splitlines()[0][:120])
        elif stats.get("errors", {}).get("generation_error") and name not in kept:
            retried += 1
        else:
            done[part_key(name)] = stats | {"part": name}
    if retried:
        get_run_logger().info("%d shards written with generation errors are built again", retried)
    return done




@task(cache_policy=NONE)
def finalize(
    config: RunConfig, ds: DatasetDir, plan: Plan, report: dict, timings: dict, recipe: Recipe, models: dict,
) -> dict:
    """Commit this run's version of the dataset (tasks/io/commit.py): every planned shard that is done
    (this run's parts or earlier ones'), the plan's prompts and input quarantine, and summaries; then
    point the dataset card at it and vacuum what no retained version needs.

    A run that failed or was stopped while a complete version stands commits nothing: that version stays
    the dataset, and `_rebuild.json` says how far this run got (its parts are there for the re-run). On a
    first build it commits a version marked incomplete."""
    logger = get_run_logger()
    previous = ds.read_manifest()
    built = report["stats"] | {sid: st for sid, st in report.get("resumed_stats", {}).items()
                               if sid not in report["stats"]}
    chosen, listed = shard_parts(ds, plan, recipe, previous, built)
    marker = recipe.tables[-1]
    shard_stats = [built[sid] for sid, name in chosen.items() if built.get(sid, {}).get("part") == name]
    # shards another run finished meanwhile: their stats from their markers' footers
    others = [name for sid, name in chosen.items() if built.get(sid, {}).get("part") != name]
    shard_stats += [st | {"part": n} for st, n in zip(ds.marker_stats([listed[marker][n] for n in others]), others)]
    # the run-level error rule over every shard this version would hold, decided before anything commits
    budget = ErrorBudget(config.max_error_rate)
    for st in shard_stats:
        budget.add_stats(st)
    if budget.exceeded() and not report.get("error_rate"):
        report["error_rate"] = budget.message()
    complete = not report["failed"] and not report["stopped"] and not report.get("error_rate")
    if not complete and previous is not None and previous["status"] == "complete":
        return keep_previous(ds, plan, report, previous)
    names = {t: sorted(chosen.values()) for t in recipe.tables}
    names["quarantine"] = sorted({n for n in chosen.values() if n in listed.get("quarantine", {})}
                                 | set(plan.quarantine_parts))
    names["prompts"] = sorted({s.part for s in plan.shards})
    rows = {(t, s["part"]): n for s in shard_stats for t, n in s["rows"].items()}
    rows |= {("prompts", s.part): s.prompts for s in plan.shards}
    extra = dict(recipe.manifest_extra) | {"flow": recipe.name, "layout": {
        "marker": marker, "tables": recipe.tables, "sample_tables": recipe.sample_tables,
        "one_row_per_prompt": recipe.one_row_per_prompt,
    }}
    if recipe.post is not None and complete:
        extra |= recipe.post(ds, names)
        names |= {t: [n] for t, n in extra.pop("summary_parts", {}).items()}
    names = {t: names.get(t, []) for t in dict.fromkeys(["prompts"] + recipe.tables + ["quarantine"]
                                                         + recipe.summary_tables)}
    unknown = [(t, n) for t, ns in names.items() for n in ns if (t, n) not in rows]  # input quarantine, summaries
    for (t, n), meta in zip(unknown, ds.footers([ds.part_path(t, n) for t, n in unknown])):
        rows[(t, n)] = meta.num_rows
    counts = {t: {"rows": sum(rows[(t, n)] for n in parts), "parts": len(parts)} for t, parts in names.items()}
    files = {t: [f"{t}/part-{n}.parquet" for n in parts] for t, parts in names.items()}
    before = {f for fs in (ds.files(previous) if previous else {}).values() for f in fs}
    now = {f for fs in files.values() for f in fs}
    extra["parts_table"] = ds.write_parts_table(files, {t: [rows[(t, n)] for n in ns] for t, ns in names.items()})
    manifest = redact(build_manifest(
        config=config.model_dump(mode="json"),
        fingerprint=config.fingerprint(),
        plan=plan,
        shard_stats=shard_stats,
        counts=counts,
        outcomes_key=recipe.outcomes_key,
        timings=timings | {f"workers_{k}": round(v, 3) for k, v in report["seconds"].items()},
        models=models | {"workers": report["workers"]},
        report=report,
        replaced_parts=len(before - now),
        extra=extra,
    ))
    failpoint("parts")

    def decide(current: dict | None) -> dict | None:
        # another run may have committed meanwhile: a failed rebuild still never replaces a complete version
        return None if not complete and (current or {}).get("status") == "complete" else manifest

    manifest, committed = commit(ds, decide)
    if not committed:
        return keep_previous(ds, plan, report, manifest)
    clear_rebuild(ds)
    write_pointer_file(ds, CARD, dataset_card(manifest, recipe.main_table or recipe.tables[0], files).encode(),
                       manifest["version"])
    removed = vacuum(ds, list(TABLES), config.keep_versions, config.retention_hours)
    logger.info("version %d committed; vacuum removed %d files and %d versions older than %gh that no kept "
                "version lists", manifest["version"], removed["files"], removed["versions"], config.retention_hours)
    create_table_artifact(
        redact(summary_rows(manifest)), key=artifact_key(config.dataset, f"{recipe.name}-summary"),
        description=f"{recipe.name} dataset {ds.uri}"
    )
    return manifest


def keep_previous(ds: DatasetDir, plan: Plan, report: dict, previous: dict) -> dict:
    """A rebuild that failed or was stopped: the last complete version stays the dataset; what this run
    got to is recorded in `_rebuild.json`, and its parts stay for the re-run."""
    rebuild = {
        "status": "incomplete", "stopped": report["stopped"], "version_kept": previous["version"],
        "error_rate": report.get("error_rate"),
        "shards": {"total": len(plan.shards), "resumed": report["resumed"], "built": report["built"],
                   "failed": report["failed"]},
    }
    record_rebuild(ds, redact(rebuild))
    get_run_logger().warning(
        "the rebuild is incomplete: version %d of %s stays the dataset; re-run to finish the new one",
        previous["version"], ds.uri)
    return previous | {"rebuild": rebuild}


def build_dataset(
    config: RunConfig,
    ds: DatasetDir,
    recipe: Recipe,
    models: dict,
    screen: Callable[[PromptSet, dict], PromptSet] | None = None,
    load: Callable[[], PromptSet] | None = None,
) -> dict:
    """What every flow does once its recipe is set: claim the output folder, plan the input into shards
    (the `prepare` task), build the shards on Ray, finalize, and end the run as what happened (see
    conclude). Returns the manifest.

    With `result_storage` set, the plan is a cached, persisted Prefect result: a run retried on another
    machine that shares the storage skips the planning, unless the planned shards are gone."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    # The run's config in its log (secrets masked by the log filter that preflight installed).
    logger.info("config %s: %s", config.fingerprint(), config.model_dump_json(exclude_defaults=True))
    ds.claim(config.fingerprint(), redact(config.model_dump(mode="json")))
    with gc_frozen():
        planned = plan_input.with_options(**result_options(config))
        plan = planned(config, ds, recipe.salt, screen, load)
        if not {s.part for s in plan.shards} <= set(ds.parts("prompts")):
            logger.warning("the cached plan's shards are not in %s any more: planning again", ds.uri)
            plan = planned.with_options(refresh_cache=True)(config, ds, recipe.salt, screen, load)
        t1 = time.perf_counter()
        with ray_session(config.ray):
            report = build_shards.with_options(retries=config.retries)(config, ds, plan, recipe)
        timings = {"prepare": round(t1 - t0, 3), "build": round(time.perf_counter() - t1, 3)}
        return conclude(finalize(config, ds, plan, report, timings, recipe, models), report, ds.uri)


class ShardsFailed(Exception):
    """Some shards failed after their retries; the manifest (marked incomplete) lists them."""


def conclude(manifest: dict, report: dict, uri: str) -> dict:
    """End the flow run as what happened: stopped runs re-raise the stop (so the run shows Cancelled or
    Crashed), failed shards fail the run; either way after the incomplete manifest is written."""
    if report["stopped"] == "TerminationSignal":
        raise TerminationSignal(signal.SIGTERM)
    if report["stopped"]:
        raise KeyboardInterrupt
    if report.get("error_rate"):
        kept = (f"version {manifest['rebuild']['version_kept']} stays the dataset" if "rebuild" in manifest
                else "the manifest is marked incomplete")
        raise TooManyErrors(f"{report['error_rate']}; {kept}, {uri}; fix the fault and re-run (the shards "
                            "with errors are built again)")
    if report["failed"] and "rebuild" in manifest:
        r = manifest["rebuild"]
        raise ShardsFailed(
            f"{len(r['shards']['failed'])} of {r['shards']['total']} shards failed after retries; version "
            f"{r['version_kept']} stays the dataset, {uri}/{REBUILD} lists them; re-run to retry them"
        )
    if report["failed"]:
        raise ShardsFailed(
            f"{len(report['failed'])} of {manifest['shards']['total']} shards failed after retries; "
            f"{uri}/manifest.json (status incomplete) lists them; re-run to retry them"
        )
    return manifest
