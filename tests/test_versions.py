"""A failed rebuild never takes away the last good dataset: the CLI is SIGKILLed at each step of a
rebuild over changed input (planning, mid-shard, while publishing, right after the commit), and after
each kill the folder verifies clean for the version it holds; a re-run then finishes the new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.io.storage import FAILPOINT, DatasetDir
from dafactory.tasks.io.verify import verify
from tests.conftest import ROOT, write_jsonl


def run_cli(tmp_path, cfg, failpoint: str | None = None) -> int:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    (tmp_path / "home").mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    env.pop(FAILPOINT, None)
    if failpoint:
        env[FAILPOINT] = failpoint
    with open(tmp_path / "cli.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dafactory.flows.cli", "run", "preference", "--config", str(path)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=600)
    if code < 0:  # the flow process died; its Ray workers and Prefect server would live on
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code


def killed_rebuilds(tmp_path, output: str, points: list[str]) -> None:
    def config(prompts: list[str]) -> PreferenceConfig:
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
        return build_config(PreferenceConfig, None, [
            f"output={output}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2", "shard_size=2",
            "student.num_cpus=0.5", "scoring.num_cpus=0.5",
        ])

    first = [f"question number {i}" for i in range(8)]
    assert run_cli(tmp_path, config(first)) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    ds = DatasetDir(output, "v")
    v1 = ds.read_manifest()
    assert (v1["version"], v1["accounting"]["source_rows"], verify(ds).problems) == (1, 8, [])

    changed = config(["a new first question", *first[:5], "question number 5, reworded", *first[6:], "one more"])
    for point in points:
        assert run_cli(tmp_path, changed, failpoint=point) == -signal.SIGKILL, point
        current = ds.read_manifest()
        expected = 2 if point == "commit" else 1  # the kill after the commit leaves the new version
        assert (point, current["version"], current["status"]) == (point, expected, "complete")
        assert (point, verify(ds).problems) == (point, [])
        assert ds.read_table("candidates").num_rows == current["tables"]["candidates"]["rows"]

    assert run_cli(tmp_path, changed) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    last = ds.read_manifest()
    assert (last["accounting"]["source_rows"], last["status"], verify(ds).problems) == (10, "complete", [])
    assert last["shards"]["resumed"] > 0  # the killed runs' staged shards were kept
    assert ds.unlisted(last) == []  # every part an older version alone listed is gone
    assert ds.versions() == [last["version"] - 1, last["version"]]  # keep_versions: 1


@pytest.mark.slow
def test_a_killed_rebuild_keeps_the_last_version_on_local_disk(tmp_path):
    killed_rebuilds(tmp_path, str(tmp_path / "out"), ["plan", "shard", "publish", "commit"])


@pytest.mark.slow
def test_a_failed_rebuild_keeps_the_last_version(tmp_path, run_flow):
    from dafactory.tasks.run.build import ShardsFailed

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)])
    common = [f"output={tmp_path / 'out'}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2",
              "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "shard_retries=0", "retries=0",
              "student.params.fail_on=poison"]  # the backend raises on any prompt holding "poison"
    run_flow(build_config(PreferenceConfig, None, common))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)]
                + [{"prompt": "poison question"}])
    # the new prompt's shard (the folder keeps its 3 id ranges: the poison shares one with "question
    # number 3") fails every time: the rebuild fails, and version 1 stays the dataset
    with pytest.raises(ShardsFailed, match=r"1 of 3 shards failed after retries; version 1 stays the dataset"):
        run_flow(build_config(PreferenceConfig, None, common))
    ds = DatasetDir(str(tmp_path / "out"), "v")
    assert ds.read_manifest()["version"] == 1 and verify(ds).problems == []
    assert ds.read_rebuild()["shards"]["failed"][0]["prompts"] == 2
    shown = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "inspect", ds.uri], capture_output=True,
                           text=True, cwd=ROOT)
    assert "a rebuild is INCOMPLETE (2 of 3 shards, 1 failed" in shown.stdout
    # fixed input: the re-run resumes the staged shards, commits version 2 and shows what changed
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)]
                + [{"prompt": "a good question"}])
    manifest = run_flow(build_config(PreferenceConfig, None, common))
    assert (manifest["version"], manifest["shards"]["resumed"], manifest["shards"]["built"]) == (2, 2, 1)
    assert ds.read_rebuild() is None
    diff = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "inspect", ds.uri, "--version", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert "version 1" in diff.stdout and "-> version 2" in diff.stdout
    assert "candidates rows                12 -> 14       (+2)" in diff.stdout
