"""Checks of user input that run before any model loads. Pure: no Prefect, Ray or torch."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from tasks.config import RunConfig
from tasks.errors import UserError
from tasks.models import check_reference
from tasks.prompts import check_columns
from tasks.redact import install_log_filter
from tasks.scorers import SCORERS
from tasks.storage import DatasetDir, credentials_from_block


def preflight(config: RunConfig) -> DatasetDir:
    """Raise UserError on bad input (one line); return the dataset folder to build into. First, from
    here on every log record of the process masks secrets (the flows start with this)."""
    install_log_filter()
    for src in config.prompt_sources:
        check_columns(src)
    gen = config.generator
    if gen.backend == "hf":
        check_reference(gen.model, gen.revision, gen.allow_pickle_weights)
    for s in config.scorer_configs:
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
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
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
