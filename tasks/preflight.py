"""Checks of user input that run before any model loads. Pure: no Prefect, Ray or torch."""

from __future__ import annotations

from tasks.config import RunConfig
from tasks.models import check_reference
from tasks.prompts import check_columns
from tasks.scorers import SCORERS
from tasks.storage import DatasetDir


def preflight(config: RunConfig) -> DatasetDir:
    """Raise UserError on bad input (one line); return the dataset folder to build into."""
    for src in config.prompt_sources:
        check_columns(src)
    gen = config.generator
    if gen.backend == "hf":
        check_reference(gen.model, gen.revision)
    for s in config.scorer_configs:
        SCORERS.get(s.name)(s)  # constructors check params; only load() is heavy
        if s.model:
            check_reference(s.model, s.revision)
    ds = DatasetDir(config.output, config.dataset, timeout_s=config.storage_timeout_s)
    if not ds.local:
        ds.check_writable()  # a missing bucket or a bad endpoint fails here, before any model loads
    ds.check_owner(config.fingerprint())
    return ds
