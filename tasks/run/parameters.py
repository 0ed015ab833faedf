"""Deployment parameters that merge. Prefect merges a run's parameters with its deployment's only at the
top level, and a flow has one parameter, `config`, so a run sent `{"config": {"n": 2}}` (the API, `prefect
deployment run --param`, an automation) would otherwise run with every other field at its default. Here the
fields a run gave (pydantic's `model_fields_set`, nested models included) are laid over the deployment's
config; a run from the form gives every field, so it runs as sent.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import BaseModel

C = TypeVar("C", bound=BaseModel)
log = logging.getLogger(__name__)


def deployment_config() -> dict | None:
    """The config of the deployment this flow run was started from (None outside a deployment)."""
    from prefect.runtime import deployment

    dep_id = deployment.id
    if not dep_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return (client.read_deployment(dep_id).parameters or {}).get("config")


def overlay(base: dict, given: BaseModel) -> dict:
    """`base` with the fields `given` set laid over it, nested models field by field."""
    out = dict(base)
    for name in given.model_fields_set:
        value = getattr(given, name)
        if isinstance(value, BaseModel) and isinstance(base.get(name), dict):
            out[name] = overlay(base[name], value)
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def merged(config: C, base: dict | None = None) -> C:
    """The run's effective config: what it gave over its deployment's (`base`, read from the server
    when not given); the config itself outside a deployment or when it gave every field."""
    base = deployment_config() if base is None else base
    if not base or set(type(config).model_fields) <= config.model_fields_set:
        return config
    effective = type(config).model_validate(overlay(base, config))
    log.info("this run gave %s; the deployment's config gives the rest", ", ".join(sorted(config.model_fields_set)))
    return effective
