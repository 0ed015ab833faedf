"""Evaluation: benchmarks -> N samples per prompt -> every signal + one judge verdict -> ASR per strategy."""

from __future__ import annotations

from prefect import flow, get_run_logger

from dafactory.tasks.config import EvaluateConfig
from dafactory.tasks.run.build import build_dataset
from dafactory.tasks.run.naming import run_name
from dafactory.tasks.run.parameters import merged
from dafactory.tasks.run.evaluate import evaluate_models, evaluate_recipe, load_benchmarks, references
from dafactory.tasks.run.preflight import preflight


@flow(name="evaluate", flow_run_name=run_name("evaluate"), log_prints=False)
def evaluate(config: EvaluateConfig) -> dict:
    """Attack success rate of each Best-of-N selection strategy on safety benchmarks (the paper's Table 1)."""
    logger = get_run_logger()
    config = merged(config)  # a run that gave some fields gets its deployment's for the rest
    ds = preflight(config)
    benchmarks = load_benchmarks(config)
    recipe = evaluate_recipe(config, references(benchmarks))
    manifest = build_dataset(config, ds, recipe, evaluate_models(config), load=lambda: benchmarks)
    if manifest["degenerate_latent"]:
        logger.warning("the latent ranking is degenerate: FT and base are the same weights (see report.md)")
    logger.info("evaluation complete: %s/report.md", ds.uri)
    return manifest
