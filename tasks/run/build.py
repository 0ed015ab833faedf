"""The Prefect tasks shared by the flows: prepare (tasks/run/planner.py), build shards on Ray
(tasks/run/stages.py, tasks/run/scheduler.py), finalize (tasks/run/versioning.py, tasks/io/commit.py).

A Recipe is what differs between flows: the Ray stages, the tables each shard writes, and the name of
the per-shard outcome counts in the manifest. Everything else (claiming the output, resume by shard,
progress, retries, the manifest written last) is the same code for every flow.
"""

from __future__ import annotations

import hashlib
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal

from dafactory.tasks.config import RunConfig
from dafactory.tasks.errors import UserError, first_line
from dafactory.tasks.generate.error_rate import ErrorBudget, TooManyErrors
from dafactory.tasks.io.compact import Compactor, groups, reader_files, write_compacts
from dafactory.tasks.io.commit import clear_rebuild, commit, vacuum, write_pointer_file
from dafactory.tasks.io.manifest import CARD, artifact_key, build_manifest, code_version, dataset_card, summary_rows
from dafactory.tasks.io.prompts import PromptSet, check_budget_column, iter_prompts, source_path
from dafactory.tasks.io.redact import redact
from dafactory.tasks.io.schemas import TABLES
from dafactory.tasks.io.storage import (
    REBUILD,
    DatasetDir,
    ShardReader,
    ShardRef,
    ShardWriter,
    failpoint,
    load_shard,
    storage_options,
)
from dafactory.tasks.run.control import gpu_slot, sigterm_stops, stop_in
from dafactory.tasks.run.planner import Plan, Planner
from dafactory.tasks.run.samples import sample_rows
from dafactory.tasks.run.scheduler import stream, worker_error
from dafactory.tasks.run.session import gc_frozen, ray_session
from dafactory.tasks.run.stages import StageSpec, kill_stages, start_stages
from dafactory.tasks.run.versioning import keep_previous, resumable, shard_parts


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
    try:
        for batch in [load()] if load is not None else iter_prompts(config.prompts, late=late):
            # the screen hands categories of the duplicates it drops to their first rows through planner.late
            planner.add(screen(batch, planner.late) if screen is not None else batch)
    finally:
        if hasattr(screen, "close"):
            screen.close()  # its encoder's replicas: their resources go to the build
    plan = planner.finish()
    if load is None:  # a prompt file (evaluation loads its benchmarks itself)
        check_budget_column(config.prompts, plan.quarantined, plan.source_rows)
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


@task(cache_policy=NONE, retry_delay_seconds=5, retry_condition_fn=not_user_error)
def build_shards(config: RunConfig, ds: DatasetDir, plan: Plan, recipe: Recipe, progress=None) -> dict:
    """Run every shard not yet written through the recipe's Ray stages; stage each as it finishes.
    A stop (Ctrl-C, SIGTERM) keeps what is written and returns; shards that keep failing are listed."""
    logger = get_run_logger()
    done = resumable(ds, plan, recipe.tables, ds.read_manifest())
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
    # groups of shards compacted for readers while the build goes on (finalize does the rest)
    compactor = Compactor(ds, plan.shards, recipe.tables, config.compact_shards)
    for sid, stats in done.items():
        compactor.done(sid, stats["part"])
    report["gpu_slot"] = {}
    try:
        with gpu_slot(config.gpu_slot_timeout_s, report["gpu_slot"]):
            _run_stages(config, ds, pending, recipe, report, progress, budget, compactor)
    finally:
        t0 = time.perf_counter()
        report["compacted_in_build"] = compactor.wait()
        report["seconds"]["compact_wait"] = time.perf_counter() - t0
    return report


LOG_EVERY_S, PROGRESS_EVERY_S = 5.0, 1.0  # the build's shard log line and progress artifact, at most this often


def occupancy_so_far(engine: dict, replica_s: float) -> str | None:
    """The progress artifact's line on the generate engines so far (the manifest's cost has the run's)."""
    if not engine["engine_s"] or replica_s <= 0:
        return None
    below = min(1.0, (engine["below_s"] + max(0.0, replica_s - engine["engine_s"])) / replica_s)
    return f"generate engines below 90% of their batch limit {below:.0%} of the time so far"


class Pace:
    """True at the first call and then at most once every `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.next = seconds, 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.seconds
        return True


def _run_stages(config: RunConfig, ds: DatasetDir, pending: list[ShardRef], recipe: Recipe, report: dict,
                progress, budget: ErrorBudget, compactor: Compactor) -> None:
    """Start the recipe's actors, stream the pending shards through them, stop them. The run stops early
    when its generation errors so far break `max_error_rate` (`budget`)."""
    logger = get_run_logger()
    t0 = ready = time.perf_counter()
    try:
        on_cluster = bool(config.ray.cluster_address())
        # The last stage's replicas write their shards' parts; the driver writes those they hand back.
        writer = ShardWriter(ds, tuple(recipe.tables), tuple(recipe.sample_tables))
        replicas_ds = ds.for_replicas()
        for st in recipe.stages:
            st.in_flight = config.shards_in_flight
        recipe.stages[-1].writer = ShardWriter(replicas_ds, writer.tables, writer.sample_tables)
        recipe.stages[0].reader = ShardReader(replicas_ds)
        report["workers"] = start_stages(recipe.stages, local=not on_cluster, retries=config.shard_retries)
        ready = time.perf_counter()  # every replica holds its resources and its model from here
        report["seconds"]["load_models"] = ready - t0
        logger.info("workers ready in %.1fs: %s", report["seconds"]["load_models"],
                    ", ".join(f"{w['stage']}@{w['node']}" for w in report["workers"]))
        rows, t1 = 0, time.perf_counter()

        handed_back, read_back = [], []
        log_pace, progress_pace = Pace(LOG_EVERY_S), Pace(PROGRESS_EVERY_S)
        engine_so_far = {"engine_s": 0.0, "below_s": 0.0}  # the generate engines' occupancy (manifest.occupancy)

        def replica_s() -> float:  # generate replicas x seconds held so far
            return recipe.stages[0].num_replicas * (time.perf_counter() - ready)

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
            compactor.done(stats["shard_id"], stats["part"])
            budget.add_stats(stats)
            failpoint("shard")
            report["built"] += 1
            rows += sum(stats["rows"][t] for t in recipe.sample_tables)
            for k, v in stats["seconds"].items():
                report["seconds"][k] = report["seconds"].get(k, 0.0) + v
            last = report["built"] == len(pending)
            # a log line and an artifact update are calls to the Prefect server: paced, not one per shard
            if last or log_pace.due():
                logger.info("shard %d/%d written: %s (%.1f samples/s)", report["built"], len(pending),
                            ", ".join(f"{k} {v}" for k, v in stats["rows"].items() if k != "quarantine"),
                            rows / (time.perf_counter() - t1))
            engine = stats.get("work", {}).get("generate", {})
            for k in ("engine_s", "below_s"):
                engine_so_far[k] += engine.get(k, 0.0)
            if progress is not None and (last or progress_pace.due()):  # the flow run's artifact
                update_progress_artifact(progress, 100.0 * report["built"] / len(pending),
                                         description=occupancy_so_far(engine_so_far, replica_s()))
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
    chosen, listed = shard_parts(ds, plan, recipe.tables, previous, built)
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
    # Delta's OPTIMIZE for readers: groups of consecutive shards in one file each (unchanged ones kept)
    order = {s.shard_id: i for i, s in enumerate(plan.shards)}
    compact = write_compacts(ds, groups(files, order, config.compact_shards))
    extra["parts_table"] = ds.write_parts_table(files, {t: [rows[(t, n)] for n in ns] for t, ns in names.items()},
                                                compact)
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
    card = dataset_card(manifest, recipe.main_table or recipe.tables[0], reader_files(files, compact))
    write_pointer_file(ds, CARD, card.encode(), manifest["version"])
    removed = vacuum(ds, list(TABLES), config.keep_versions, config.retention_hours)
    logger.info("version %d committed; vacuum removed %d files and %d versions older than %gh that no kept "
                "version lists", manifest["version"], removed["files"], removed["versions"], config.retention_hours)
    return manifest


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
        with ExitStack() as ray_first:
            if getattr(screen, "uses_encoder", False):  # its encoder runs in Ray replicas: Ray from the plan on
                ray_first.enter_context(ray_session(config.ray))
            planned = plan_input.with_options(**result_options(config))
            plan = planned(config, ds, recipe.salt, screen, load)
            if not {s.part for s in plan.shards} <= set(ds.parts("prompts")):
                logger.warning("the cached plan's shards are not in %s any more: planning again", ds.uri)
                plan = planned.with_options(refresh_cache=True)(config, ds, recipe.salt, screen, load)
            t1 = time.perf_counter()
            # the run's artifacts belong to the flow run (the UI's Artifacts tab), not to a task run
            progress = create_progress_artifact(0.0, key=artifact_key(config.dataset, f"{recipe.name}-progress"),
                                                description=f"shards of {ds.uri}")
            with ray_session(config.ray):  # else Ray starts here (the CLI's early start overlaps the plan)
                report = build_shards.with_options(retries=config.retries)(config, ds, plan, recipe, progress)
        if not (report["failed"] or report["stopped"] or report.get("error_rate")):
            update_progress_artifact(progress, 100.0)  # every shard is done, resumed ones too
        timings = {"prepare": round(t1 - t0, 3), "build": round(time.perf_counter() - t1, 3)}
        manifest = finalize(config, ds, plan, report, timings, recipe, models)
        if "rebuild" not in manifest:  # this run committed it
            publish_artifacts(config.dataset, recipe.name, ds, manifest)
        return conclude(manifest, report, ds.uri)


def publish_artifacts(dataset: str, flow: str, ds: DatasetDir, manifest: dict) -> None:
    """The committed version's summary table and sample rows, as the flow run's artifacts."""
    create_table_artifact(redact(summary_rows(manifest)), key=artifact_key(dataset, f"{flow}-summary"),
                          description=f"{flow} dataset {ds.uri}")
    try:
        rows = sample_rows(ds, manifest)
    except Exception as exc:  # noqa: BLE001 - a view of the data never fails a build that committed
        get_run_logger().warning("no sample-rows artifact: %s", first_line(exc))
        return
    create_markdown_artifact(rows, key=artifact_key(dataset, f"{flow}-sample-rows"),
                             description=f"sample rows of {ds.uri}, version {manifest['version']}")


class ShardsFailed(Exception):
    """Some shards failed after their retries; the manifest (marked incomplete) lists them."""

    one_line = True


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
