"""Deployments against a real Prefect server started here (SQLite, 127.0.0.1, analytics off):
serve them, trigger a run through the API as the UI's Run button does, and check schedules."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server")
        yield {"url": url, "home": home, "env": env}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    prompts = work / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    (work / "pref.yaml").write_text(yaml.safe_dump({
        "output": str(work / "out"), "dataset": "served", "prompts": {"path": str(prompts)},
        "student": {"backend": "fake", "num_cpus": 0.5}, "scoring": {"num_cpus": 0.5}, "n": 2, "shard_size": 2,
    }))
    (work / "deploy.yaml").write_text(yaml.safe_dump({
        "gpu_concurrency": 1,
        "deployments": [{"name": "nightly", "flow": "preference", "config": "pref.yaml", "cron": "0 2 * * *"}],
    }))
    env = dict(server["env"], PREFECT_API_URL=server["url"])
    log = open(work / "serve.log", "w")
    exe = Path(sys.executable).with_name("dafactory")
    proc = subprocess.Popen([str(exe), "serve", "--config", str(work / "deploy.yaml")], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            def deployed():
                try:
                    return client.read_deployment_by_name("preference/nightly")
                except Exception:
                    return None

            try:
                deployment = wait_for(deployed, 180, "the served deployment")
                yield {"client": client, "deployment": deployment, "work": work}
            finally:
                proc.terminate()
                proc.wait(30)


def test_a_run_triggered_like_the_ui_completes_with_its_artifacts(served):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    client, dep = served["client"], served["deployment"]
    params = dict(dep.parameters)
    params["config"] = dict(params["config"], dataset="from-ui", n=3)  # the form, edited
    run = client.create_flow_run_from_deployment(dep.id, parameters=params)
    final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 240, "the flow run")
    assert final.state.is_completed(), final.state
    manifest = json.loads((served["work"] / "out" / "from-ui" / "manifest.json").read_text())
    assert manifest["tables"]["candidates"]["rows"] == 4 * 3
    artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
    ours = {"from-ui-preference-summary", "from-ui-preference-progress", "from-ui-preference-sample-rows"}
    assert ours <= set(artifacts)  # the dataset names them
    assert all(artifacts[k].task_run_id is None for k in ours)  # the flow run's: the UI's Artifacts tab shows it
    assert final.name == "preference-from-ui"  # no name given: the flow and the dataset
    assert client.read_deployment(dep.id).entrypoint == "dafactory.flows.preference.preference"  # the module


def test_a_partial_run_gets_the_deployments_other_fields_keeps_its_name_and_shows_sample_rows(served):
    import re

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from dafactory.tasks.run.samples import sample_rows
    from dafactory.tasks.io.storage import DatasetDir

    client, dep = served["client"], served["deployment"]
    sent = {"config": {"dataset": "partial", "n": 3}}  # what an automation or `--param` sends
    run = client.create_flow_run_from_deployment(dep.id, parameters=sent, name="rerun after the fix")
    final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 240, "the flow run")
    assert final.state.is_completed(), final.state
    assert final.parameters == sent and final.name == "rerun after the fix"  # stored as sent, named as typed
    manifest = json.loads((served["work"] / "out" / "partial" / "manifest.json").read_text())
    given, deployed = manifest["config"], dep.parameters["config"]
    assert (given["n"], given["dataset"]) == (3, "partial")
    for field in ("output", "prompts", "student", "scoring", "shard_size"):  # the rest: the deployment's
        assert given[field] == deployed[field], field
    assert manifest["tables"]["candidates"]["rows"] == 4 * 3
    artifact = next(a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))) if a.key == "partial-preference-sample-rows")
    ds = DatasetDir(str(served["work"] / "out"), "partial")
    pairs = {m[-1]["content"] for m in ds.read_table("pairs").column("prompt").to_pylist()}
    shown = re.findall(r"^- \*\*Prompt:\*\* (.*)$", artifact.data, flags=re.M)
    assert len(shown) == min(3, len(pairs)) and set(shown) <= pairs  # rows of the table, as written
    assert artifact.data == sample_rows(ds, ds.read_manifest())  # seeded: the same build, the same rows


def test_a_user_error_is_one_line_in_the_runs_logs(served):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    client, dep = served["client"], served["deployment"]
    missing = str(served["work"] / "no-such-file.jsonl")
    run = client.create_flow_run_from_deployment(dep.id, parameters={"config": {"dataset": "bad",
                                                                                "prompts": {"path": missing}}})
    final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 240, "the flow run")
    assert final.state.is_failed() and "UserError" in final.state.message, final.state

    def shipped():  # a run's logs reach the server in batches, after its state: wait for its last line
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        return logs if any(log.message.startswith("Finished in state") for log in logs) else None

    logs = wait_for(shipped, 60, "the run's logs")
    errors = [log.message for log in logs if log.level >= 40]
    assert len(errors) == 1 and missing in errors[0], errors
    assert not any("Traceback" in log.message for log in logs)


def test_invalid_parameters_are_rejected_by_the_server(served):
    client, dep = served["client"], served["deployment"]
    params = {"config": dict(dep.parameters["config"], n=0)}  # the schema says n >= 1
    with pytest.raises(Exception, match="(?i)validation"):
        client.create_flow_run_from_deployment(dep.id, parameters=params)


def test_the_run_form_the_server_keeps_has_its_order_and_drop_downs(served):
    from tests.test_infra import check_run_form

    client, dep = served["client"], served["deployment"]
    check_run_form(client.read_deployment(dep.id).parameter_openapi_schema)  # as stored, as the UI reads it
    params = {"config": dict(dep.parameters["config"], student=dict(dep.parameters["config"]["student"],
                                                                    backend="vlm"))}
    with pytest.raises(Exception, match="(?i)validation"):  # not among the drop-down's choices
        client.create_flow_run_from_deployment(dep.id, parameters=params)


def test_the_cron_schedule_creates_runs_and_the_gpu_limit_exists(served):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    client, dep = served["client"], served["deployment"]
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]

    def scheduled():
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )

    runs = wait_for(scheduled, 60, "scheduled runs")
    assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in runs)
    assert client.read_global_concurrency_limit_by_name("dafactory-gpu").limit == 1
    # the parameter form: descriptions come from the pydantic config
    schema = dep.parameter_openapi_schema
    assert "config" in schema["properties"]
    assert "Samples per prompt." in json.dumps(schema)


def test_cancel_from_the_ui_keeps_finished_shards_under_an_incomplete_manifest(served):
    from prefect.states import Cancelling

    client, dep = served["client"], served["deployment"]
    prompts = served["work"] / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(30)))
    params = dict(dep.parameters)
    params["config"] = dict(params["config"], dataset="cancelled", shard_size=1, prompts={"path": str(prompts)},
                            student=dict(params["config"]["student"], params={"latency_s": 2.0}))
    run = client.create_flow_run_from_deployment(dep.id, parameters=params)
    staged = served["work"] / "out" / "cancelled" / "candidates"
    wait_for(lambda: staged.exists() and any(staged.glob("*.parquet")), 240, "a first shard")
    client.set_flow_run_state(run.id, Cancelling(), force=True)  # what the UI's Cancel button does
    final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 120, "the cancellation")
    assert final.state.is_cancelled(), final.state
    manifest = json.loads((served["work"] / "out" / "cancelled" / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["stopped"] == "TerminationSignal"
    assert 1 <= manifest["shards"]["done"] < 30 and manifest["accounting"]["balanced"]


def test_two_builds_with_one_gpu_slot_never_hold_actors_at_once(server, tmp_path):
    # The slot is taken before any stage actor is created or model loads, and given back after the
    # actors are gone: two builds started together run their Ray work one after the other.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dafactory.flows.deploy import ensure_gpu_limit

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        ensure_gpu_limit(1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    env = dict(server["env"], PREFECT_API_URL=server["url"])
    exe = Path(sys.executable).with_name("dafactory")
    procs = []
    for name in ("first", "second"):
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen(
            [str(exe), "run", "preference", "--set", f"prompts.path={prompts}", "--set", f"output={tmp_path / 'out'}",
             "--set", f"dataset={name}", "--set", "student.backend=fake", "--set", "student.params.latency_s=2",
             "--set", "shard_size=2", "--set", "n=2", "--set", "student.num_cpus=0.5", "--set", "scoring.num_cpus=0.5"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    manifests = [json.loads((tmp_path / "out" / name / "manifest.json").read_text()) for name in ("first", "second")]
    slots = sorted((m["gpu_slot"]["acquired_at"], m["gpu_slot"]["released_at"], m) for m in manifests)
    (a_start, a_end, a), (b_start, b_end, b) = slots
    assert a_end <= b_start  # one after the other
    for start, end, m in slots:
        assert all(start <= w["started_at"] <= end for w in m["models"]["workers"])  # actors inside the slot
    waited = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "waiting for a slot of dafactory-gpu (another build holds it)" in waited
    assert "| ERROR" not in waited  # a wait is not an error (a first short try that timed out logged one)
    assert b["gpu_slot"]["waited_s"] >= 2
