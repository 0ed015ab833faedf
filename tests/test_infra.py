"""infra/ cannot be run here (no Docker engine): check that it parses and agrees with the code."""

import re
import tomllib
from pathlib import Path

import yaml

from dafactory.flows.cli import parser
from dafactory.flows.deploy import load_deploy_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def test_yaml_parses_and_the_kuberay_cluster_scales_gpus_from_zero():
    cluster = yaml.safe_load((INFRA / "kuberay-cluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert (gpu["minReplicas"], gpu["replicas"]) == (0, 0) and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    compose = yaml.safe_load((INFRA / "docker-compose.yaml").read_text())
    assert {"postgres", "prefect-server", "minio", "minio-init", "worker"} <= set(compose["services"])
    published = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)  # the local stack is this host's only


def test_ray_version_matches_the_installed_ray():
    import ray

    dockerfile = (INFRA / "Dockerfile").read_text()
    (image_version,) = re.findall(r"FROM rayproject/ray:([\d.]+)", dockerfile)
    cluster = yaml.safe_load((INFRA / "kuberay-cluster.yaml").read_text())
    assert image_version == cluster["spec"]["rayVersion"] == ray.__version__


def test_images_commands_and_paths_are_consistent():
    dockerfile = (INFRA / "Dockerfile").read_text()
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        if path != "pyproject.toml":
            assert (ROOT / path).exists(), path
    for line in re.findall(r"^COPY (.+) \./", dockerfile, flags=re.M):
        for name in line.split():
            assert (ROOT / name).exists(), name
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "dafactory" in scripts
    compose = yaml.safe_load((INFRA / "docker-compose.yaml").read_text())
    worker = compose["services"]["worker"]
    assert worker["image"] == "dafactory:latest"
    command = worker["command"].split()
    assert command[0] == "dafactory" and command[1] in parser()._subparsers._group_actions[0].choices
    deploy_config = ROOT / command[command.index("--config") + 1]
    assert deploy_config.exists()
    assert load_deploy_config(str(deploy_config)).deployments  # the config it serves validates


def test_every_bundled_deployment_builds_with_its_schedule_and_form():
    from dafactory.flows.deploy import deployment

    path = ROOT / "configs" / "deploy.yaml"
    spec = load_deploy_config(str(path))
    built = {d.name: deployment(d, path.parent) for d in spec.deployments}
    assert set(built) == {"nightly-preference", "weekly-distill", "evaluate-on-demand"}
    nightly = built["nightly-preference"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["config"]["student"]["model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert nightly.enforce_parameter_schema and "config" in nightly._parameter_openapi_schema.properties
    assert not built["evaluate-on-demand"].schedules


def test_a_bad_cron_is_one_clear_line(tmp_path):
    import pytest

    from dafactory.tasks.errors import UserError

    bad = tmp_path / "deploy.yaml"
    bad.write_text("deployments:\n  - {name: x, flow: preference, cron: 'every night'}\n")
    with pytest.raises(UserError, match="invalid config: deployments.0.cron"):
        load_deploy_config(str(bad))
