"""Prefect task wrappers of the preference build: thin layers over the pure cores and the Ray stages."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from tasks.config import PreferenceConfig
from tasks.errors import UserError
from tasks.manifest import build_manifest, summary_rows
from tasks.preflight import preflight
from tasks.prompts import PromptSet, Shard, load_prompts, make_shards
from tasks.schemas import QUARANTINE, to_table
from tasks.storage import DatasetDir
from tasks.workers import GenerateStage, ScoreSelectStage, StageSpec, kill_stages, start_stages, stream

SHARD_TABLES = ["pairs", "best", "quarantine", "candidates"]  # candidates last: it marks the shard done


@task(cache_policy=NONE)
def prepare(config: PreferenceConfig) -> tuple[DatasetDir, PromptSet, list[Shard]]:
    """Validate input, claim the output folder, load prompts and plan shards. No model loads here."""
    logger = get_run_logger()
    ds = preflight(config)
    ds.claim(config.fingerprint(), config.model_dump(mode="json"))
    prompts = load_prompts(config.prompts)
    ds.write_part("quarantine", "input", to_table(prompts.quarantine, QUARANTINE))
    shards = make_shards(prompts.rows, config.shard_size, salt=config.generation_key())
    logger.info(
        "%d source rows: %d unique prompts, %d duplicates, %d quarantined; %d shards into %s",
        prompts.source_rows, len(prompts.rows), prompts.duplicates, len(prompts.quarantine), len(shards), ds.uri,
    )
    return ds, prompts, shards


def stages_for(config: PreferenceConfig) -> list[StageSpec]:
    st = config.student
    return [
        StageSpec(
            "generate", GenerateStage, (st, config.sampling, config.n, config.system_prompt),
            st.num_replicas, st.num_gpus, st.num_cpus,
        ),
        StageSpec(
            "score", ScoreSelectStage,
            (config.scorers, config.selection, config.selection_scorer, config.system_prompt,
             config.scoring.num_cpus),
            config.scoring.num_replicas, config.scoring.num_gpus, config.scoring.num_cpus,
        ),
    ]


def write_shard(ds: DatasetDir, result: dict) -> dict:
    tables = result["tables"]
    stats = {
        "shard_index": result["shard_index"],
        "prompts": result["prompts"],
        "candidates": tables["candidates"].num_rows,
        "quarantined": {"too_long": tables["quarantine"].num_rows} if tables["quarantine"].num_rows else {},
        "unpaired": result["unpaired"],
        "seconds": result["seconds"],
    }
    for name in SHARD_TABLES:
        if name != "quarantine" or tables[name].num_rows:
            ds.write_part(name, result["shard_id"], tables[name], stats if name == "candidates" else None)
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
def build_shards(config: PreferenceConfig, ds: DatasetDir, shards: list[Shard]) -> dict:
    """Generate, score and select every shard not yet written, on Ray; write each as it finishes."""
    logger = get_run_logger()
    pending = [s for s in shards if not ds.shard_done(s.shard_id)]
    report = {"resumed": len(shards) - len(pending), "workers": [], "seconds": {}}
    if report["resumed"]:
        logger.info("resuming: %d of %d shards already written", report["resumed"], len(shards))
    if not pending:
        return report
    progress = create_progress_artifact(0.0, key="preference-progress", description=f"shards of {ds.uri}")
    stages = stages_for(config)
    t0 = time.perf_counter()
    try:
        report["workers"] = start_stages(stages, local=config.ray.address is None)
        report["seconds"]["load_models"] = time.perf_counter() - t0
        logger.info("workers ready in %.1fs: %s", report["seconds"]["load_models"],
                    ", ".join(f"{w['stage']}@{w['node']}" for w in report["workers"]))
        done, candidates, t1 = 0, 0, time.perf_counter()

        def on_result(result: dict) -> None:
            nonlocal done, candidates
            stats = write_shard(ds, result)
            done += 1
            candidates += stats["candidates"]
            for k, v in stats["seconds"].items():
                report["seconds"][k] = report["seconds"].get(k, 0.0) + v
            rate = candidates / (time.perf_counter() - t1)
            logger.info("shard %d/%d written: %d candidates (%.1f candidates/s)", done, len(pending),
                        stats["candidates"], rate)
            update_progress_artifact(progress, 100.0 * done / len(pending))

        stream(stages, pending, on_result)
        report["seconds"]["build_wall"] = time.perf_counter() - t1
    finally:
        kill_stages(stages)
    return report


@task(cache_policy=NONE)
def finalize(
    config: PreferenceConfig, ds: DatasetDir, prompts: PromptSet, shards: list[Shard], report: dict, timings: dict
) -> dict:
    """Drop stale parts, count what was written, write manifest.json last and publish the summary."""
    pruned = ds.prune({s.shard_id for s in shards} | {"input"}, list(SHARD_TABLES))
    manifest = build_manifest(
        config=config.model_dump(mode="json"),
        fingerprint=config.fingerprint(),
        prompts=prompts,
        shard_stats=ds.shard_stats(),
        counts=ds.row_counts(),
        timings=timings | {f"workers_{k}": round(v, 3) for k, v in report["seconds"].items()},
        models={
            "student": {"model": config.student.model, "revision": config.student.revision,
                        "backend": config.student.backend},
            "scorers": [s.model_dump(mode="json", include={"name", "model", "revision"}) for s in config.scorers],
            "workers": report["workers"],
        },
        shards_total=len(shards),
        shards_resumed=report["resumed"],
        pruned_parts=pruned,
    )
    ds.write_manifest(manifest)
    create_table_artifact(
        summary_rows(manifest), key="preference-summary", description=f"Preference dataset {ds.uri}"
    )
    return manifest
