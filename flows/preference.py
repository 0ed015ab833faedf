"""The main job: a Best-of-N preference set (load -> shard -> generate -> score -> select -> write)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from dafactory.tasks.config import PreferenceConfig
from dafactory.tasks.run.build import build_dataset
from dafactory.tasks.run.naming import run_name
from dafactory.tasks.run.parameters import merged
from dafactory.tasks.run.preference import preference_models, preference_recipe
from dafactory.tasks.run.preflight import preflight
from dafactory.tasks.run.screening import LazyScreen


@flow(name="preference", flow_run_name=run_name("preference"), log_prints=False)
def preference(config: PreferenceConfig) -> dict:
    """Sample N answers per prompt from the student, score them, and write chosen/rejected pairs."""
    logger = get_run_logger()
    config = merged(config)  # a run that gave some fields gets its deployment's for the rest
    ds = preflight(config)
    manifest = build_dataset(config, ds, preference_recipe(config), preference_models(config),
                             screen=LazyScreen(config))
    logger.info("dataset complete: %s (%d pairs)", ds.uri, manifest["tables"]["pairs"]["rows"])
    return manifest
