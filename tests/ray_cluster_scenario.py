"""Run in a subprocess by test_ray_cluster.py: a preference build on a local multi-node Ray cluster
(ray.cluster_utils.Cluster, two worker nodes with logical GPUs), optionally removing a worker node
mid-run, or joining it through RAY_ADDRESS alone (as a Ray job or a KubeRay pod is told where its
cluster is). Prints one JSON line with what the test checks."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(out_dir: str, mode: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from dafactory.tasks.config import PreferenceConfig, build_config
    from dafactory.tasks.io.storage import DatasetDir
    from dafactory.tasks.io.verify import verify

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    if mode == "env":
        # ray.address unset, RAY_ADDRESS set: the flow joins that cluster (it starts no Ray of its own)
        os.environ["RAY_ADDRESS"] = cluster.address
    else:
        ray.init(address=cluster.address)
    prompts = os.path.join(out_dir, "p.jsonl")
    with open(prompts, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"question number {i}"}) + "\n")
    cfg = build_config(PreferenceConfig, None, [
        f"output={out_dir}/out", "dataset=c", f"prompts.path={prompts}", "student.backend=fake", "n=3",
        "shard_size=2", "student.num_replicas=2", "student.num_gpus=1", "student.num_cpus=1",
        "student.params.latency_s=1.5", "scoring.num_cpus=0.5",
        *([] if mode == "env" else [f"ray.address={cluster.address}"]),
    ])
    ds = DatasetDir(cfg.output, cfg.dataset)
    removed = {}
    result = {}

    from dafactory.flows.preference import preference

    # The flow runs in a thread; the main thread plays the failing node (Ray starts nodes only from it).
    runner = threading.Thread(target=lambda: result.update(manifest=preference(cfg)), daemon=True)
    runner.start()
    if mode == "remove":
        while len(ds.parts("candidates")) < 2 and runner.is_alive():
            time.sleep(0.1)
        removed["after_parts"] = len(ds.parts("candidates"))
        cluster.remove_node(workers[1])  # the node dies with its replica and the work on it
        cluster.add_node(num_cpus=2, num_gpus=1)  # a replacement, as an autoscaler would bring
    runner.join(timeout=400)
    manifest = result["manifest"]
    keys = [(c["prompt_id"], c["sample_idx"]) for c in ds.read_table("candidates").to_pylist()]
    gen = [w for w in manifest["models"]["workers"] if w["stage"] == "generate"]
    print(json.dumps({
        "rows": len(keys), "unique": len(set(keys)), "status": manifest["status"],
        "generate_nodes": sorted(w["node_id"] for w in gen), "removed": removed,
        "worker_nodes": sorted(n.node_id for n in workers), "verify_problems": verify(ds).problems,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
