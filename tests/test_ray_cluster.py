"""The same flow on a local multi-node Ray cluster: replicas spread across nodes, and a run survives
losing a worker node mid-run with nothing lost and nothing duplicated. Each scenario runs in its own
process, so its cluster never meets the session's local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
SCENARIO = Path(__file__).with_name("ray_cluster_scenario.py")


def run(tmp_path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path), mode], capture_output=True, text=True,
                          timeout=600, cwd=SCENARIO.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_replicas_spread_over_the_worker_nodes(tmp_path):
    out = run(tmp_path, "keep")
    assert out["generate_nodes"] == out["worker_nodes"]  # one replica on each GPU node
    assert out["rows"] == out["unique"] == 24 * 3 and out["status"] == "complete"


def test_ray_address_in_the_environment_joins_that_cluster(tmp_path):
    out = run(tmp_path, "env")
    assert out["generate_nodes"] == out["worker_nodes"]  # the replicas ran on the cluster's GPU nodes
    assert out["rows"] == out["unique"] == 24 * 3 and out["status"] == "complete"


def test_a_worker_node_removed_mid_run(tmp_path):
    out = run(tmp_path, "remove")
    assert out["removed"]["after_parts"] >= 2  # the node went away while shards were still to do
    assert out["rows"] == out["unique"] == 24 * 3 and out["status"] == "complete"
    assert out["verify_problems"] == []
