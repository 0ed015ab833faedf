"""Prefect deployments of the flows: `dafactory serve --config deploy.yaml` registers them with cron
schedules from the config and serves them, so runs can be scheduled and triggered from the Prefect UI
(the pydantic config of each flow is the UI's form, validated by the server). The form lists fields in
the config's form order (`form_order`, what a user changes first), and names chosen from a registry
(backends, scorers, strategies) are drop-downs: their enums are added here, where the registries are
known, since the config models may not import them.

A global concurrency limit (`dafactory-gpu`, slots from the config) guards the Ray work of every build,
so two scheduled builds cannot oversubscribe the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dafactory.tasks.config import (
    DistillConfig,
    EvaluateConfig,
    ModelConfig,
    PreferenceConfig,
    ScorerConfig,
    SelectionConfig,
    build_config,
)
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends import BACKENDS
from dafactory.tasks.run.control import GPU_LIMIT
from dafactory.tasks.run.preflight import check_names
from dafactory.tasks.score.scorers import SCORERS
from dafactory.tasks.score.selection import NAMED

CONFIGS = {"preference": PreferenceConfig, "distill": DistillConfig, "evaluate": EvaluateConfig}


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Deployment name, e.g. nightly-preference.")
    flow: Literal["preference", "distill", "evaluate"] = Field(description="Which flow it runs.")
    config: str | None = Field(None, description="YAML config file of the flow (its default parameters).")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of that config.")
    cron: str | None = Field(None, description="Cron schedule, e.g. '0 2 * * *' for 02:00 nightly.")
    timezone: str = Field("UTC", description="Time zone of the cron schedule.")
    description: str | None = Field(None, description="Shown in the Prefect UI.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=value)  # raises ValueError on a bad expression
        return value


class DeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployments: list[DeploymentSpec] = Field(min_length=1, description="Deployments to register and serve.")
    gpu_concurrency: int = Field(1, ge=1, description="Builds allowed to run their Ray work at the same time.")


def flow_of(name: str):
    if name == "preference":
        from dafactory.flows.preference import preference

        return preference
    if name == "distill":
        from dafactory.flows.distill import distill

        return distill
    from dafactory.flows.evaluate import evaluate

    return evaluate


def load_deploy_config(path: str) -> DeployConfig:
    return build_config(DeployConfig, path)


def registry_choices() -> dict[tuple[type[BaseModel], str], list[str]]:
    """The config fields whose value names a registry entry, and the names each may take."""
    return {
        (ModelConfig, "backend"): BACKENDS.names(),
        (ScorerConfig, "name"): SCORERS.names(),
        (SelectionConfig, "strategy"): ["signal", *NAMED],
        (SelectionConfig, "judge"): SCORERS.names(),  # the UI cannot narrow it to the configured scorers
        (EvaluateConfig, "strategies"): list(NAMED),
    }


def _enum_strings(prop: dict[str, Any], names: list[str]) -> bool:
    """Put `enum` on the string schema in `prop`: itself, the string branch of an optional (`anyOf`), or
    the items of a list. False if it holds none."""
    found = False
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch["enum"] = list(names)
            found = True
        elif branch.get("type") == "array":
            found = _enum_strings(branch["items"], names) or found
    return found


def add_registry_choices(definitions: dict[str, Any]) -> None:
    """Make every registry-backed field of a flow's parameter schema a drop-down (a JSON-schema `enum`).
    The server then rejects other names too; preflight still checks them by name for the CLI."""
    for (model, field), names in registry_choices().items():
        if field not in model.model_fields:
            raise AssertionError(f"{model.__name__} has no field {field!r}")
        if model.__name__ in definitions and not _enum_strings(definitions[model.__name__]["properties"][field], names):
            raise AssertionError(f"{model.__name__}.{field} is not a string or a list of strings in the schema")


# Fields of classes the flows share that only distill uses: not on the other flows' forms. The schemas
# forbid extra fields, so the server refuses a run that sends one of them too.
DISTILL_ONLY = {"SamplingConfig": ["reasoning_budget", "answer_budget"], "ScorerConfig": ["reads"]}
NOT_ON_FORM = {"preference": DISTILL_ONLY, "evaluate": DISTILL_ONLY, "distill": {}}


def drop_fields(definitions: dict[str, Any], fields: dict[str, list[str]]) -> None:
    """Take fields off a flow's form: out of their class's schema, its required list and its positions."""
    for name, names in fields.items():
        definition = definitions.get(name)
        if definition is None:
            continue
        for field in names:
            definition["properties"].pop(field, None)
        if "required" in definition:
            definition["required"] = [f for f in definition["required"] if f not in names]
        ordered = sorted(definition["properties"].values(), key=lambda p: p.get("position", 0))
        for i, prop in enumerate(ordered):
            if "position" in prop:
                prop["position"] = i


def form_values(config: BaseModel, fields: dict[str, list[str]]) -> dict:
    """The config as the deployment's parameters: without the fields its form does not have (the server
    validates the parameters against the form's schema)."""

    def exclude(model: BaseModel) -> dict:
        out: dict = {}
        for name in type(model).model_fields:
            value = getattr(model, name)
            if name in fields.get(type(model).__name__, []):
                out[name] = True
            elif isinstance(value, BaseModel) and (sub := exclude(value)):
                out[name] = sub
            elif isinstance(value, list):
                items = {i: sub for i, v in enumerate(value) if isinstance(v, BaseModel) and (sub := exclude(v))}
                if items:
                    out[name] = items
        return out

    return config.model_dump(mode="json", exclude=exclude(config))


def deployment(spec: DeploymentSpec, base_dir: Path) -> Any:
    """A served deployment whose default parameters are the validated config."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    config_path = None if spec.config is None else str((base_dir / spec.config).resolve())
    config = build_config(CONFIGS[spec.flow], config_path, spec.overrides)
    check_names(config)  # a misspelt scorer fails when serving, not at 02:00
    served = flow_of(spec.flow).to_deployment(
        name=spec.name,
        schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
        parameters={"config": form_values(config, NOT_ON_FORM[spec.flow])},
        description=spec.description or f"{spec.flow} build of {config.dataset}",
        tags=["dafactory", spec.flow],
        enforce_parameter_schema=True,
        # the installed module (dafactory.flows.preference.preference), wherever `serve` was started
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # Prefect built the schema from the flow's signature (this deployment's own copy); it is what the
    # server validates runs against and the UI renders.
    add_registry_choices(served._parameter_openapi_schema.definitions)
    drop_fields(served._parameter_openapi_schema.definitions, NOT_ON_FORM[spec.flow])
    return served


def ensure_gpu_limit(slots: int) -> None:
    """Create or resize the global concurrency limit that every build's Ray work occupies."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def serve(path: str) -> None:
    """Register every deployment of the deploy config and serve them until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError("serving deployments needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    spec = load_deploy_config(path)
    deployments = [deployment(d, Path(path).parent) for d in spec.deployments]
    ensure_gpu_limit(spec.gpu_concurrency)
    prefect_serve(*deployments, print_starting_message=True)
