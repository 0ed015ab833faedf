"""Prefect task wrappers shared by the flows: prepare, build shards on Ray, finalize.

A Recipe is what differs between flows: the Ray stages, the tables each shard writes, and the name of
the per-shard outcome counts in the manifest. Everything else (claiming the output, resume by shard,
progress, retries, the manifest written last) is the same code for every flow.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from tasks.config import RunConfig
from tasks.errors import UserError
from tasks.manifest import build_manifest, summary_rows
from tasks.prompts import PromptSet, Shard, load_prompts, make_shards
from tasks.schemas import QUARANTINE, to_table
from tasks.storage import DatasetDir
from tasks.workers import StageSpec, kill_stages, start_stages, stream

GPU_LIMIT = "dafactory-gpu"


@dataclass
class Recipe:
    name: str
    stages: list[StageSpec]
    tables: list[str]  # written per shard, in order; the last marks the shard done
    outcomes_key: str  # manifest key of per-shard outcome counts, e.g. "unpaired_prompts"
    salt: str  # shard ids hash this with their prompt ids: what decides the generated text
    sample_tables: list[str]  # tables that together hold one row per generated sample (for progress)
    manifest_extra: dict = field(default_factory=dict)
    # Runs after the last shard, before the manifest: whole-dataset summaries (evaluation's ASR tables
    # and report). Returns more manifest fields; the tables it writes are listed in summary_tables.
    post: Callable[[DatasetDir], dict] | None = None
    summary_tables: list[str] = field(default_factory=list)


@task(cache_policy=NONE)
def prepare(
    config: RunConfig,
    ds: DatasetDir,
    salt: str,
    screen: Callable[[PromptSet], PromptSet] | None = None,
    load: Callable[[], PromptSet] | None = None,
) -> tuple[PromptSet, list[Shard]]:
    """Claim the output folder, load prompts (config.prompts unless `load` is given), screen them
    (flow-specific) and plan shards. No model loads here."""
    logger = get_run_logger()
    ds.claim(config.fingerprint(), config.model_dump(mode="json"))
    prompts = load() if load is not None else load_prompts(config.prompts)
    if screen is not None:
        prompts = screen(prompts)
    ds.write_part("quarantine", "input", to_table(prompts.quarantine, QUARANTINE))
    shards = make_shards(prompts.rows, config.shard_size, salt=salt)
    logger.info(
        "%d source rows: %d unique prompts, %d duplicates, %d quarantined; %d shards into %s",
        prompts.source_rows, len(prompts.rows), prompts.duplicates, len(prompts.quarantine), len(shards), ds.uri,
    )
    return prompts, shards


def write_shard(ds: DatasetDir, recipe: Recipe, result: dict) -> dict:
    tables = result["tables"]
    stats = {
        "shard_index": result["shard_index"],
        "prompts": result["prompts"],
        "rows": {name: tables[name].num_rows for name in recipe.tables},
        "quarantined": {"too_long": tables["quarantine"].num_rows} if tables["quarantine"].num_rows else {},
        "outcomes": result["outcomes"],
        "seconds": result["seconds"],
    }
    for name in recipe.tables:
        if name != "quarantine" or tables[name].num_rows:
            ds.write_part(name, result["shard_id"], tables[name], stats if name == recipe.tables[-1] else None)
    return stats


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
def build_shards(config: RunConfig, ds: DatasetDir, shards: list[Shard], recipe: Recipe) -> dict:
    """Run every shard not yet written through the recipe's Ray stages; write each as it finishes."""
    logger = get_run_logger()
    marker = recipe.tables[-1]
    pending = [s for s in shards if not ds.shard_done(s.shard_id, marker)]
    report = {"resumed": len(shards) - len(pending), "workers": [], "seconds": {}}
    if report["resumed"]:
        logger.info("resuming: %d of %d shards already written", report["resumed"], len(shards))
    if not pending:
        return report
    progress = create_progress_artifact(0.0, key=f"{recipe.name}-progress", description=f"shards of {ds.uri}")
    t0 = time.perf_counter()
    try:
        on_cluster = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
        report["workers"] = start_stages(recipe.stages, local=not on_cluster)
        report["seconds"]["load_models"] = time.perf_counter() - t0
        logger.info("workers ready in %.1fs: %s", report["seconds"]["load_models"],
                    ", ".join(f"{w['stage']}@{w['node']}" for w in report["workers"]))
        done, rows, t1 = 0, 0, time.perf_counter()

        def on_result(result: dict) -> None:
            nonlocal done, rows
            stats = write_shard(ds, recipe, result)
            done += 1
            rows += sum(stats["rows"][t] for t in recipe.sample_tables)
            for k, v in stats["seconds"].items():
                report["seconds"][k] = report["seconds"].get(k, 0.0) + v
            logger.info("shard %d/%d written: %s (%.1f samples/s)", done, len(pending),
                        ", ".join(f"{k} {v}" for k, v in stats["rows"].items() if k != "quarantine"),
                        rows / (time.perf_counter() - t1))
            update_progress_artifact(progress, 100.0 * done / len(pending))

        # One slot of the global GPU limit while the Ray work runs, on a Prefect server (`dafactory
        # serve` creates it): two scheduled builds never oversubscribe the cluster. Ephemeral runs skip it.
        guard = concurrency(GPU_LIMIT, occupy=1, strict=False) if PREFECT_API_URL.value() else nullcontext()
        with guard:
            stream(recipe.stages, pending, on_result)
        report["seconds"]["build_wall"] = time.perf_counter() - t1
    finally:
        kill_stages(recipe.stages)
    return report


@task(cache_policy=NONE)
def finalize(
    config: RunConfig, ds: DatasetDir, prompts: PromptSet, shards: list[Shard], report: dict, timings: dict,
    recipe: Recipe, models: dict,
) -> dict:
    """Drop stale parts, count what was written, write manifest.json last and publish the summary."""
    tables = list(dict.fromkeys(recipe.tables + ["quarantine"] + recipe.summary_tables))
    pruned = ds.prune({s.shard_id for s in shards} | {"input"}, recipe.tables)
    extra = dict(recipe.manifest_extra)
    if recipe.post is not None:
        extra |= recipe.post(ds)
    manifest = build_manifest(
        config=config.model_dump(mode="json"),
        fingerprint=config.fingerprint(),
        prompts=prompts,
        shard_stats=ds.shard_stats(recipe.tables[-1]),
        counts=ds.row_counts(tables),
        outcomes_key=recipe.outcomes_key,
        timings=timings | {f"workers_{k}": round(v, 3) for k, v in report["seconds"].items()},
        models=models | {"workers": report["workers"]},
        shards_total=len(shards),
        shards_resumed=report["resumed"],
        pruned_parts=pruned,
        extra=extra,
    )
    ds.write_manifest(manifest)
    create_table_artifact(
        summary_rows(manifest), key=f"{recipe.name}-summary", description=f"{recipe.name} dataset {ds.uri}"
    )
    return manifest
