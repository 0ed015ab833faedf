"""The main job: a Best-of-N preference set (load -> shard -> generate -> score -> select -> write)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from tasks.build import build_shards, conclude, finalize, prepare
from tasks.config import PreferenceConfig
from tasks.preference import preference_models, preference_recipe
from tasks.preflight import preflight
from tasks.workers import ray_session


@flow(name="preference", flow_run_name="preference-{config.dataset}", log_prints=False)
def preference(config: PreferenceConfig) -> dict:
    """Sample N answers per prompt from the student, score them, and write chosen/rejected pairs."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    ds = preflight(config)
    recipe = preference_recipe(config)
    plan = prepare(config, ds, recipe.salt)
    t1 = time.perf_counter()
    with ray_session(config.ray):
        report = build_shards.with_options(retries=config.retries)(config, ds, plan, recipe)
    t2 = time.perf_counter()
    timings = {"prepare": round(t1 - t0, 3), "build": round(t2 - t1, 3)}
    manifest = conclude(finalize(config, ds, plan, report, timings, recipe, preference_models(config)), report, ds.uri)
    logger.info("dataset complete: %s (%d pairs)", ds.uri, manifest["tables"]["pairs"]["rows"])
    return manifest
