"""Deliberative-alignment distillation: prompts -> teacher reasoning under the spec -> judge -> filter -> SFT."""

from __future__ import annotations

from prefect import flow, get_run_logger

from dafactory.tasks.config import DistillConfig
from dafactory.tasks.run.build import build_dataset
from dafactory.tasks.run.naming import run_name
from dafactory.tasks.run.parameters import merged
from dafactory.tasks.run.distill import distill_models, distill_recipe, screen, setup
from dafactory.tasks.run.preflight import preflight


@flow(name="distill", flow_run_name=run_name("distill"), log_prints=False)
def distill(config: DistillConfig) -> dict:
    """Have the teacher reason under the safety spec, judge every sample, and keep the safe ones as SFT data."""
    logger = get_run_logger()
    config = merged(config)  # a run that gave some fields gets its deployment's for the rest
    ds = preflight(config)
    spec = setup(config)
    manifest = build_dataset(config, ds, distill_recipe(config, spec), distill_models(config),
                             screen=screen(config, spec))
    logger.info("dataset complete: %s (%d training rows)", ds.uri, manifest["tables"]["train"]["rows"])
    return manifest
