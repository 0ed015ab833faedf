"""Evaluation: benchmarks -> N samples per prompt -> every signal + one judge verdict -> ASR per strategy."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from tasks.build import build_shards, conclude, finalize, prepare
from tasks.config import EvaluateConfig
from tasks.evaluate import evaluate_models, evaluate_recipe, load_benchmarks, references
from tasks.preflight import preflight
from tasks.workers import ray_session


@flow(name="evaluate", flow_run_name="evaluate-{config.dataset}", log_prints=False)
def evaluate(config: EvaluateConfig) -> dict:
    """Attack success rate of each Best-of-N selection strategy on safety benchmarks (the paper's Table 1)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    ds = preflight(config)
    benchmarks = load_benchmarks(config)
    recipe = evaluate_recipe(config, references(benchmarks))
    plan = prepare(config, ds, recipe.salt, load=lambda: benchmarks)
    t1 = time.perf_counter()
    with ray_session(config.ray):
        report = build_shards.with_options(retries=config.retries)(config, ds, plan, recipe)
    t2 = time.perf_counter()
    timings = {"prepare": round(t1 - t0, 3), "build": round(t2 - t1, 3)}
    manifest = conclude(finalize(config, ds, plan, report, timings, recipe, evaluate_models(config)), report, ds.uri)
    if manifest["degenerate_latent"]:
        logger.warning("the latent ranking is degenerate: FT and base are the same weights (see report.md)")
    logger.info("evaluation complete: %s/report.md", ds.uri)
    return manifest
