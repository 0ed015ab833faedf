"""Write throughput to a loopback S3 endpoint (moto server) against local disk, same tables, one command.

    python benchmarks/bench_s3.py --shards 20 --rows 4000

Writes the same shard tables (candidates-shaped rows, zstd Parquet) through DatasetDir to a local
folder and to s3:// on a moto server started here, and prints MB/s and rows/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4000)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")

    from dafactory.tasks.io.schemas import CANDIDATES, to_table
    from dafactory.tasks.io.storage import DatasetDir

    rows = [{
        "prompt_id": f"{i:016x}", "sample_idx": i % 4, "prompt": f"question {i} about something " * 3,
        "category": "harm", "response": ("a plausible answer " * 20) + str(i), "finish_reason": "stop",
        "prompt_tokens": 20, "response_tokens": 60, "model": "m", "model_revision": "r", "seed": i, "shard_id": "s",
        "scores": [{"scorer": "refusal_heuristic", "view": "response", "score": 0.0, "label": "compliance",
                    "reason": "no refusal phrase (heuristic)", "heuristic": True, "details": None}],
        "selection_score": 0.0, "is_best": i % 4 == 0, "pair_role": None,
    } for i in range(args.rows)]
    table = to_table(rows, CANDIDATES)

    results = {}
    for name, output in (("local disk", tempfile.mkdtemp(prefix="dafactory-bench-")), ("loopback S3", "s3://bench/x")):
        ds = DatasetDir(output, "d")
        t0 = time.perf_counter()
        for shard in range(args.shards):
            ds.write_part("candidates", f"{shard:04d}@bench", table)  # to its final name, as a run writes them
        dt = time.perf_counter() - t0
        size = sum(ds.fs.size(p) for p in ds.parts("candidates").values())
        results[name] = dt
        print(f"{name:<12} {dt:7.2f} s  {args.shards * args.rows / dt:10.0f} rows/s  {size / dt / 2**20:7.1f} MB/s "
              f"({args.shards} parts, {size / 2**20:.1f} MB)")
    print(f"ratio S3/local time: {results['loopback S3'] / results['local disk']:.2f}x")
    server.stop()


if __name__ == "__main__":
    main()
