"""infra/ cannot be run here (no Docker engine): check that it parses and agrees with the code."""

import json
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


FORMS = {  # the Run form of each flow, top to bottom: what a user changes first, the run plumbing last
    "PreferenceConfig": ["dataset", "output", "prompts", "system_prompt", "student", "n", "sampling", "scorers",
                         "selection", "scoring", "dedup", "decontamination"],
    "DistillConfig": ["dataset", "output", "prompts", "teacher", "k", "sampling", "judges", "keep_forced_close",
                      "keep_cut_answers", "spec", "template",
                      "missing_category", "student_system_prompt", "dedup", "decontamination", "judging"],
    "EvaluateConfig": ["dataset", "output", "benchmarks", "system_prompt", "student", "base", "base_revision", "n", "sampling",
                       "judge", "scorers", "strategies", "layers", "bootstrap_resamples", "bootstrap_seed",
                       "confidence", "scoring"],
}
PLUMBING = ["shard_size", "ray", "retries", "shard_retries", "max_error_rate", "gpu_slot_timeout_s", "keep_versions",
            "retention_hours", "shards_in_flight", "compact_shards", "storage_block",
            "storage_timeout_s", "storage_retries", "result_storage", "cost"]
SCORER_NAMES = ["latent_attribution", "llama_guard", "refusal_heuristic", "reward_model", "rubric_judge",
                "yes_no_judge"]
STRATEGY_NAMES = ["first_sample", "random", "latent_argmin_cos", "kl_ft_base_argmax", "kl_base_ft_argmax",
                  "perplexity_argmin", "self_certainty_argmax", "judge_safe_first"]


def form_fields(definition: dict) -> list[str]:
    """Field names as the Prefect UI's form lists them: sorted by `position`."""
    return sorted(definition["properties"], key=lambda n: definition["properties"][n]["position"])


def check_run_form(schema: dict) -> None:
    """A deployment's parameter schema: its form order and its registry drop-downs (shared with the
    server test, which reads the schema back from a real server)."""
    defs = schema["definitions"]
    (name,) = set(FORMS) & set(defs)
    assert form_fields(defs[name]) == FORMS[name] + PLUMBING
    assert list(defs[name]["properties"]) == FORMS[name] + PLUMBING  # the keys too, for other readers
    for definition in defs.values():  # nested forms number every field, as declared
        positions = sorted(p["position"] for p in definition["properties"].values())
        assert positions == list(range(len(definition["properties"])))
    assert form_fields(defs["ModelConfig"])[:3] == ["model", "revision", "backend"]
    # one form per flow: the reasoning budget and what a judge reads are distill's alone
    budget = ["reasoning_budget", "answer_budget"] if name == "DistillConfig" else []
    assert form_fields(defs["SamplingConfig"]) == ["temperature", "top_p", "top_k", "max_new_tokens", "seed", *budget]
    assert defs["ModelConfig"]["properties"]["backend"]["enum"] == ["fake", "hf", "vllm"]
    assert defs["ScorerConfig"]["properties"]["name"]["enum"] == SCORER_NAMES
    assert ("reads" in form_fields(defs["ScorerConfig"])) == (name == "DistillConfig")
    if name == "DistillConfig":
        assert defs["ScorerConfig"]["properties"]["reads"]["items"]["enum"] == ["full", "answer", "reasoning"]
    if name == "PreferenceConfig":
        sel = defs["SelectionConfig"]["properties"]
        assert form_fields(defs["SelectionConfig"]) == ["strategy", "scorer", "direction", "pairs", "judge",
                                                         "min_margin", "require_stop"]
        assert sel["strategy"]["enum"] == ["signal", *STRATEGY_NAMES]
        assert sel["judge"]["anyOf"] == [{"type": "string", "enum": SCORER_NAMES}, {"type": "null"}]
        assert "enum" not in json.dumps(sel["scorer"])  # scorer:detail is free text
    if name == "EvaluateConfig":
        strategies = defs["EvaluateConfig"]["properties"]["strategies"]
        assert strategies["anyOf"] == [{"type": "array", "items": {"type": "string", "enum": STRATEGY_NAMES}},
                                       {"type": "null"}]


def test_the_run_form_lists_what_a_user_changes_first_and_registry_names_as_drop_downs():
    from dafactory.flows.deploy import deployment
    from dafactory.tasks.config import DistillConfig, EvaluateConfig, PreferenceConfig

    for cls in (PreferenceConfig, DistillConfig, EvaluateConfig):  # every field has its place
        assert sorted(cls.form_order()) == sorted(cls.model_fields)
        assert cls.form_order() == FORMS[cls.__name__] + PLUMBING
    path = ROOT / "configs" / "deploy.yaml"
    for spec in load_deploy_config(str(path)).deployments:
        schema = deployment(spec, path.parent)._parameter_openapi_schema.model_dump_for_openapi()
        check_run_form(json.loads(json.dumps(schema)))


def test_every_form_description_renders_as_written():
    """The UI renders descriptions as Markdown, where a raw tag (`</think>`) is dropped as HTML: tags stay in
    backticks. Every description of every form, nested ones included."""
    from dafactory.tasks.config import DistillConfig, EvaluateConfig, PreferenceConfig

    def descriptions(node):
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                yield node["description"]
            for value in node.values():
                yield from descriptions(value)
        elif isinstance(node, list):
            for value in node:
                yield from descriptions(value)

    seen, raw = 0, []
    for cls in (PreferenceConfig, DistillConfig, EvaluateConfig):
        for text in descriptions(cls.model_json_schema()):
            seen += 1
            if re.search(r"<[^>]*>", re.sub(r"`[^`]*`", "", text)):
                raw.append(text[:80])
    assert seen > 100 and raw == []


def test_a_bad_cron_is_one_clear_line(tmp_path):
    import pytest

    from dafactory.tasks.errors import UserError

    bad = tmp_path / "deploy.yaml"
    bad.write_text("deployments:\n  - {name: x, flow: preference, cron: 'every night'}\n")
    with pytest.raises(UserError, match="invalid config: deployments.0.cron"):
        load_deploy_config(str(bad))
