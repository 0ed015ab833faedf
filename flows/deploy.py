"""Prefect deployments of the flows: `dafactory serve --config deploy.yaml` registers them with cron
schedules from the config and serves them, so runs can be scheduled and triggered from the Prefect UI
(the pydantic config of each flow is the UI's form, validated by the server).

A global concurrency limit (`dafactory-gpu`, slots from the config) guards the Ray work of every build,
so two scheduled builds cannot oversubscribe the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dafactory.tasks.config import DistillConfig, EvaluateConfig, PreferenceConfig, build_config
from dafactory.tasks.errors import UserError
from dafactory.tasks.run.build import GPU_LIMIT
from dafactory.tasks.run.preflight import check_names

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


def deployment(spec: DeploymentSpec, base_dir: Path) -> Any:
    """A served deployment whose default parameters are the validated config."""
    from prefect.schedules import Cron

    config_path = None if spec.config is None else str((base_dir / spec.config).resolve())
    config = build_config(CONFIGS[spec.flow], config_path, spec.overrides)
    check_names(config)  # a misspelt scorer fails when serving, not at 02:00
    return flow_of(spec.flow).to_deployment(
        name=spec.name,
        schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
        parameters={"config": config.model_dump(mode="json")},
        description=spec.description or f"{spec.flow} build of {config.dataset}",
        tags=["dafactory", spec.flow],
        enforce_parameter_schema=True,
    )


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
