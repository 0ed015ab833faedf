"""Checks of user input that run before any model loads. Pure: no Prefect, Ray or torch."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from dafactory.tasks.config import EvaluateConfig, PreferenceConfig, PromptSource, RunConfig, ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends import BACKENDS
from dafactory.tasks.generate.models import check_reference
from dafactory.tasks.io.prompts import check_columns
from dafactory.tasks.io.redact import install_log_filter
from dafactory.tasks.io.storage import DatasetDir, credentials_from_block
from dafactory.tasks.score.scorers import SCORERS
from dafactory.tasks.score.selection import check_selection
from dafactory.tasks.score.strategies import DEFAULT_STRATEGIES


def preflight(config: RunConfig) -> DatasetDir:
    """Raise UserError on bad input (one line); return the dataset folder to build into. First, from
    here on every log record of the process masks secrets (the flows start with this)."""
    install_log_filter()
    check_names(config)
    sources, scorers = _inputs(config)
    for src in sources:
        check_columns(src)
    gen = config.generator
    if gen.backend in ("hf", "vllm"):
        check_reference(gen.model, gen.revision, gen.allow_pickle_weights)
    for s in scorers:
        SCORERS.get(s.name)(s)  # constructors check params; only load() is heavy
        if s.model:
            check_reference(s.model, s.revision, s.allow_pickle_weights)
    credentials = credentials_from_block(config.storage_block) if config.storage_block else None
    ds = DatasetDir(config.output, config.dataset, timeout_s=config.storage_timeout_s, retries=config.storage_retries,
                    credentials=credentials)
    if not ds.local:
        ds.check_writable()  # a missing bucket or a bad endpoint fails here, before any model loads
    ds.check_owner(config.fingerprint())
    return ds


def _inputs(config: RunConfig) -> tuple[list[PromptSource], list[ScorerConfig]]:
    """The prompt files and every scorer the run will read and build."""
    if isinstance(config, EvaluateConfig):
        from dafactory.tasks.run.evaluate import benchmark_sources, signal_scorers

        return benchmark_sources(config), [config.judge, *signal_scorers(config)]
    return [config.prompts], config.scorer_configs


def check_names(config: RunConfig) -> None:
    """Names of backends, scorers and strategies against their registries: the one place they are
    checked, with a one-line error that suggests the closest names."""
    BACKENDS.get(config.generator.backend)(config.generator)  # constructors check params (the engine); load() loads
    names = [s.name for s in config.scorer_configs]
    for name in names:
        SCORERS.check(name)
    if len(set(names)) != len(names):
        raise UserError(f"scorers are listed twice: {names}")
    if isinstance(config, PreferenceConfig):
        check_selection(config.selection, names)
    if isinstance(config, EvaluateConfig):
        known = [s.name for s in DEFAULT_STRATEGIES]
        for name in config.strategies or []:
            if name not in known:
                raise UserError(f"unknown strategy {name!r}; known: {', '.join(known)}")


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_endpoints(config: RunConfig) -> None:
    """A Ray address or Prefect API that cannot be reached fails with one line, within the timeout,
    instead of hanging in a client's retries."""
    timeout = config.ray.connect_timeout_s
    address = config.ray.cluster_address()
    if address and address not in ("auto", "local"):
        parsed = urlparse(address if "://" in address else f"tcp://{address}")
        if parsed.hostname and parsed.port and not _reachable(parsed.hostname, parsed.port, timeout):
            raise UserError(f"the Ray cluster at {address} is unreachable (no answer within {timeout:g}s)")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        import httpx

        try:
            httpx.get(api.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except httpx.HTTPError as exc:
            raise UserError(f"the Prefect API at {api} is unreachable ({type(exc).__name__})") from None
