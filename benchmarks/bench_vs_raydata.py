"""The whole `dafactory run preference` against Ray Data by hand, on the same prompts and the same work.

    python benchmarks/bench_vs_raydata.py --prompts 100000 --n 4

Both are timed as whole commands in their own processes, one after the other in this run:
- ours: the CLI (Prefect's temporary server, local Ray, planning by id range, the fake backend sampling N
  per prompt, the refusal heuristic, selection, pairs, Parquet parts written by the last stage's replica,
  manifest and dataset card);
- Ray Data: `from_items(prompts) -> map_batches(actor class: the same fake backend for N samples, then
  the same heuristic) -> write_parquet`, with no selection, pairs, accounting or resume.
Prints candidate rows/s for each and the ratio (ours / Ray Data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NO_SCREEN, arguments, write_prompts

RAY_DATA = r'''
import json, sys, time
import ray
from dafactory.tasks.config import ModelConfig, SamplingConfig, ScorerConfig
from dafactory.tasks.generate.backends.fake import FakeBackend
from dafactory.tasks.score.scorers import SCORERS

src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Generate:
    def __init__(self):
        self.backend = FakeBackend(ModelConfig(backend="fake"))
        self.sampling = SamplingConfig(max_new_tokens=32)
        self.scorer = SCORERS.get("refusal_heuristic")(ScorerConfig(name="refusal_heuristic"))

    def __call__(self, batch):
        convs = [[{"role": "user", "content": p}] for p in batch["prompt"] for _ in range(n)]
        gens = self.backend.generate(convs, self.sampling, seed=0)
        rows = [{"prompt": c[-1]["content"], "category": cat, "sample_idx": k, "response": g.text,
                 "finish_reason": g.finish_reason}
                for (c, g), (cat, k) in zip(zip(convs, gens), [(c, k) for c in batch["category"] for k in range(n)])]
        scores = self.scorer.score(rows)
        return {"prompt": [r["prompt"] for r in rows], "sample_idx": [r["sample_idx"] for r in rows],
                "response": [r["response"] for r in rows], "finish_reason": [r["finish_reason"] for r in rows],
                "score": [s["score"] for s in scores]}


ray.init(include_dashboard=False)
items = [json.loads(line) for line in open(src)]
ds = ray.data.from_items(items).map_batches(Generate, concurrency=1, batch_size=2000, num_cpus=1)
ds.write_parquet(out)
'''


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               PREFECT_LOGGING_LEVEL="WARNING")
    work = Path(tempfile.mkdtemp(prefix="dafactory-vs-raydata-"))
    src = write_prompts(work / "prompts.jsonl", args.prompts)

    exe = Path(sys.executable).with_name("dafactory")
    t0 = time.perf_counter()
    ours = subprocess.run([str(exe), "run", "preference", "--set", f"prompts.path={src}", "--set",
                           "prompts.category_column=category", "--set", f"output={work / 'out'}", "--set",
                           "student.backend=fake", "--set", f"n={args.n}", "--set", f"shard_size={args.shard_size}",
                           "--set", "sampling.max_new_tokens=32", "--set", "student.num_cpus=1", "--set",
                           "scoring.num_cpus=1", *(a for kv in NO_SCREEN for a in ("--set", kv))],
                          env=env, capture_output=True, text=True)
    ours_s = time.perf_counter() - t0
    assert ours.returncode == 0, ours.stderr[-3000:]
    rows = json.loads((work / "out" / "preference" / "manifest.json").read_text())["tables"]["candidates"]["rows"]

    t1 = time.perf_counter()
    theirs = subprocess.run([sys.executable, "-c", RAY_DATA, str(src), str(work / "raydata"), str(args.n)], env=env,
                            capture_output=True, text=True)
    theirs_s = time.perf_counter() - t1
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    import pyarrow.dataset as pads

    theirs_rows = pads.dataset(str(work / "raydata"), format="parquet").count_rows()
    assert theirs_rows == rows == args.prompts * args.n, (rows, theirs_rows)

    print(f"prompts {args.prompts}, n {args.n}, candidate rows {rows} (both)")
    print(f"dafactory run preference : {ours_s:7.1f} s  {rows / ours_s:9.0f} candidate rows/s (whole command)")
    print(f"Ray Data by hand         : {theirs_s:7.1f} s  {rows / theirs_s:9.0f} candidate rows/s (whole command)")
    print(f"ratio ours / Ray Data    : {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
