"""Deliberative-alignment distillation: prompts -> teacher reasoning under the spec -> judge -> filter -> SFT."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from tasks.build import build_shards, conclude, finalize, prepare
from tasks.config import DistillConfig
from tasks.distill import distill_models, distill_recipe, screen, setup
from tasks.preflight import preflight
from tasks.workers import ray_session


@flow(name="distill", flow_run_name="distill-{config.dataset}", log_prints=False)
def distill(config: DistillConfig) -> dict:
    """Have the teacher reason under the safety spec, judge every sample, and keep the safe ones as SFT data."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    ds = preflight(config)
    spec = setup(config)
    recipe = distill_recipe(config, spec)
    plan = prepare(config, ds, recipe.salt, screen(config, spec))
    t1 = time.perf_counter()
    with ray_session(config.ray):
        report = build_shards.with_options(retries=config.retries)(config, ds, plan, recipe)
    t2 = time.perf_counter()
    timings = {"prepare": round(t1 - t0, 3), "build": round(t2 - t1, 3)}
    manifest = conclude(finalize(config, ds, plan, report, timings, recipe, distill_models(config)), report, ds.uri)
    logger.info("dataset complete: %s (%d training rows)", ds.uri, manifest["tables"]["train"]["rows"])
    return manifest
