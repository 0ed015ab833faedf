"""What a build costs outside the GPUs: plan, build (fake backend), finalize (the commit) and `verify`, on
local disk and on a moto S3 server, with the store calls of each phase by kind.

    python benchmarks/bench_commit.py --prompts 1000000 --n 8 --store local
    python benchmarks/bench_commit.py --prompts 100000 --n 8 --store s3

The preference flow runs in this process (Prefect's temporary server, a local Ray), so that its phases
are timed from inside: planning ends at the last planned shard, the build at the start of finalize.
Store calls: on S3 every request the moto server answers, from every process (LIST, GET, HEAD, PUT,
COPY, DELETE); on local disk this process's filesystem calls (finalize and verify run here; the build's
parts are written by the replicas, one PUT each, and are counted from the parts written; a local write's
rename into place is counted as RENAME). Prints
seconds, calls per phase and per shard, the manifest's and the parts table's bytes, finalize + verify as
a share of the build, and each figure extrapolated linearly to 10M prompts (calls per shard do not grow
with the number of shards: the second run with --prompts / 4 shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_SCREEN, write_prompts  # noqa: E402

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CALLS: Counter = Counter()
LOCK = threading.Lock()


def count(kind: str) -> None:
    with LOCK:
        CALLS[kind] += 1


def s3_kind(environ) -> str:
    method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
    if method == "GET":
        return "LIST" if any(k in query for k in ("list-type", "prefix=", "delimiter=")) else "GET"
    if method == "PUT":
        return "COPY" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "PUT"
    if method == "POST" and "delete" in query:
        return "DELETE"
    return method


def start_counting_s3() -> str:
    """A moto S3 server on loopback whose every request is counted by kind."""
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    app = DomainDispatcherApplication(create_backend_app)

    def counted(environ, start_response):
        count(s3_kind(environ))
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
    CALLS.clear()
    return url


def count_local_calls() -> None:
    """This process's local filesystem calls, by the kind they would be on an object store."""
    from fsspec.implementations.local import LocalFileSystem

    depth = threading.local()  # only the outermost call counts (a local `ls` calls `info` per entry)

    def wrap(name, kind):
        original = getattr(LocalFileSystem, name)

        def counted(self, *a, **k):
            if not getattr(depth, "n", 0):
                if kind == "open":
                    mode = a[1] if len(a) > 1 else k.get("mode", "rb")
                    count("PUT" if "w" in mode or "x" in mode else "GET")
                else:
                    count(kind)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, *a, **k)
            finally:
                depth.n -= 1

        setattr(LocalFileSystem, name, counted)

    # a write is a temporary file renamed into place: the rename is counted apart (no bytes move)
    for name, kind in (("ls", "LIST"), ("glob", "LIST"), ("open", "open"), ("rm", "DELETE"), ("exists", "HEAD"),
                       ("info", "HEAD"), ("mv", "RENAME")):
        wrap(name, kind)

    # parts that pyarrow opens itself on local disk (DatasetDir.parquet): a GET each, as through s3fs
    from dafactory.tasks.io.storage import DatasetDir

    opened = DatasetDir.parquet

    def parquet(self, path):
        if self.local:
            count("GET")
        return opened(self, path)

    DatasetDir.parquet = parquet


def run(args, prompts: Path, output: str) -> dict:
    from dafactory.flows.preference import preference
    from dafactory.tasks.config import PreferenceConfig, build_config
    from dafactory.tasks.io.storage import DatasetDir
    from dafactory.tasks.io.verify import verify
    from dafactory.tasks.run import build, planner

    marks: dict[str, tuple[float, Counter]] = {}

    def snap(name: str) -> None:
        with LOCK:
            marks[name] = (time.perf_counter(), Counter(CALLS))

    original_failpoint, original_finalize, original_compacts = planner.failpoint, build.finalize, build.write_compacts
    compacting = {"s": 0.0}

    def write_compacts(*a, **k):  # the compaction inside finalize (Delta's OPTIMIZE, for readers)
        t0 = time.perf_counter()
        try:
            return original_compacts(*a, **k)
        finally:
            compacting["s"] += time.perf_counter() - t0

    def failpoint(name: str) -> None:
        if name == "plan":
            snap("planned")  # the last one marks the end of planning
        original_failpoint(name)

    def finalize(*a, **k):
        snap("finalize")
        try:
            return original_finalize(*a, **k)
        finally:
            snap("finalized")

    # the planner's hook after each shard it stages
    planner.failpoint, build.finalize, build.write_compacts = failpoint, finalize, write_compacts
    dataset = f"bench-{args.prompts}"
    cfg = build_config(PreferenceConfig, None, [
        f"output={output}", f"dataset={dataset}", f"prompts.path={prompts}", "prompts.category_column=category",
        "student.backend=fake", f"n={args.n}", f"shard_size={args.shard_size}", "sampling.max_new_tokens=32",
        "student.num_cpus=0.5", "scoring.num_cpus=0.5", f"compact_shards={args.compact_shards}", *NO_SCREEN])
    try:
        snap("start")
        manifest = preference(cfg)
        snap("verify")
        ds = DatasetDir(output, dataset)
        verdict = verify(ds)
        snap("verified")
    finally:
        planner.failpoint, build.finalize, build.write_compacts = original_failpoint, original_finalize, original_compacts
    assert verdict.problems == [] and manifest["status"] == "complete", verdict.problems
    shards = manifest["shards"]["total"]
    phases = {"plan": ("start", "planned"), "build": ("planned", "finalize"), "finalize": ("finalize", "finalized"),
              "verify": ("verify", "verified")}
    out = {"shards": shards, "phases": {}}
    for phase, (a, b) in phases.items():
        (t0, c0), (t1, c1) = marks[a], marks[b]
        out["phases"][phase] = {"s": t1 - t0, "calls": dict(c1 - c0)}
    if ds.local:  # the replicas' writes, one PUT per part (not seen from here)
        parts = sum(manifest["tables"][t]["parts"] for t in ("pairs", "best", "candidates", "quarantine"))
        out["phases"]["build"]["calls"]["PUT"] = out["phases"]["build"]["calls"].get("PUT", 0) + parts
    out["manifest_bytes"] = len(ds.fs.cat(ds._path("_versions", f"manifest-{manifest['version']:06d}.json")))
    out["parts_table_bytes"] = ds.fs.size(ds._path(manifest["parts_table"]))
    out["card_bytes"] = ds.fs.size(ds._path("README.md"))
    out["compact_s"] = compacting["s"]
    out["pairs_parts"] = manifest["tables"]["pairs"]["parts"]
    if ds.local:  # what a reader pays: `datasets` through the card (the compact files), then by every part
        import datasets

        cache = tempfile.mkdtemp(prefix="dafactory-bench-hf-")
        t0 = time.perf_counter()
        n = len(datasets.load_dataset(ds.root, "pairs", split="train", cache_dir=cache + "/card"))
        out["load_card_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = len(datasets.load_dataset("parquet", split="train", cache_dir=cache + "/parts",
                                      data_files=[ds._path(f) for f in ds.files(manifest)["pairs"]]))
        out["load_parts_s"] = time.perf_counter() - t0
        assert n == m == manifest["tables"]["pairs"]["rows"], (n, m)
    return out


def report(label: str, r: dict, scale: float) -> None:
    shards = r["shards"]
    print(f"\n{label}: {shards} shards")
    print(f"  {'phase':<9} {'seconds':>9} {'10M est.':>9}  calls (per shard)")
    for phase, p in r["phases"].items():
        calls = ", ".join(f"{k} {v} ({v / shards:.2f})" for k, v in sorted(p["calls"].items())) or "none"
        print(f"  {phase:<9} {p['s']:9.2f} {p['s'] * scale:9.0f}  {calls}")
    build = r["phases"]["build"]["s"]
    tail = r["phases"]["finalize"]["s"] + r["phases"]["verify"]["s"]
    print(f"  finalize + verify = {tail:.2f} s = {100 * tail / build:.1f}% of the build phase")
    print(f"  manifest {r['manifest_bytes']} bytes; parts table {r['parts_table_bytes']} bytes "
          f"(10M est. {r['parts_table_bytes'] * scale / 2**20:.1f} MB); card {r['card_bytes']} bytes "
          f"(10M est. {r['card_bytes'] * scale / 2**20:.1f} MB)")
    print(f"  compaction (in finalize): {r['compact_s']:.2f} s = {100 * r['compact_s'] / build:.1f}% of the build phase")
    if "load_card_s" in r:
        print(f"  datasets.load_dataset of pairs: through the card {r['load_card_s']:.1f} s, by its "
              f"{r['pairs_parts']} parts {r['load_parts_s']:.1f} s ({r['load_parts_s'] / r['load_card_s']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--store", choices=["local", "s3"], default="local")
    ap.add_argument("--compact-shards", type=int, default=256, help="the config's compact_shards (0: off)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dafactory-bench-commit-"))
    if args.store == "s3":
        start_counting_s3()
        output = "s3://bench/out"
    else:
        count_local_calls()
        output = str(tmp / "out")
    results = []
    for prompts in (args.prompts // 4, args.prompts):  # calls per shard must not grow with the shards
        path = write_prompts(tmp / f"p{prompts}.jsonl", prompts)
        results.append((prompts, run(argparse.Namespace(**vars(args) | {"prompts": prompts}), path, output)))
    for prompts, r in results:
        report(f"{args.store}, {prompts} prompts x N={args.n}, shard_size {args.shard_size}", r,
               10_000_000 / prompts)


if __name__ == "__main__":
    main()
