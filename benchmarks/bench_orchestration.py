"""Orchestration throughput: the preference flow on the fake backend against plain pyarrow.

    python benchmarks/bench_orchestration.py --prompts 100000 --n 4
    python benchmarks/bench_orchestration.py --prompts 1000000 --n 4   # RSS stays flat: the input streams
    python benchmarks/bench_orchestration.py --prompts 200000 --n 4 --shard-sizes 2000 64 --in-flight 1 2
    python benchmarks/bench_orchestration.py --prompts 20000 --n 4 --shard-sizes 64 --in-flight 1 2 4 --step-s 0.002

Runs the whole flow (Prefect ephemeral, local Ray, fake generation, refusal heuristic, selection,
Parquet writes) and then, in the same command, the baseline: pyarrow writing the same candidate rows
to zstd Parquet. Prints candidate rows/s for both, their ratio, and peak RSS (driver and Ray workers).
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from common import NO_SCREEN, arguments, write_prompts

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class RayRssSampler(threading.Thread):
    """Peaks of the summed RSS and USS (memory unique to each process, so without the shared object
    store pages that RSS counts in every process touching them) of this run's Ray worker processes, every
    0.5 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.peak_uss, self.stop = 0, 0, threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            rss = uss = 0
            # This run's Ray only (its processes descend from this one): not another Ray on the machine.
            for p in psutil.Process().children(recursive=True):
                try:
                    name, cmd = p.name(), " ".join(p.cmdline())
                    if "ray::" in name or "default_worker.py" in cmd:
                        mem = p.memory_full_info()
                        rss, uss = rss + mem.rss, uss + mem.uss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak, self.peak_uss = max(self.peak, rss), max(self.peak_uss, uss)
            time.sleep(0.5)


def shard_sizes(args, work: Path, src: Path) -> None:
    """The same build at each of --shard-sizes (and --in-flight), one after another in this command: build
    phase, stages' busy seconds, whole command, and each build phase's ratio to the first's. With --step-s the
    fake backend runs its simulated continuous-batching engine (a decode step of --step-s seconds for up to
    --slots sequences): then each line also gives the engine's occupancy from the manifest."""
    from dafactory.flows.preference import preference
    from dafactory.tasks.config import PreferenceConfig, build_config

    first = None
    for size in args.shard_sizes:
        for k in args.in_flight:
            cfg = build_config(
                PreferenceConfig, None,
                [f"output={work / 'out'}", f"dataset=s{size}k{k}", f"prompts.path={src}",
                 "prompts.category_column=category", "student.backend=fake", f"n={args.n}", f"shard_size={size}",
                 "sampling.max_new_tokens=32", "student.num_cpus=1", "scoring.num_cpus=1", f"shards_in_flight={k}",
                 *NO_SCREEN, *([f"student.params.step_s={args.step_s}", f"student.params.engine_slots={args.slots}",
                                f"student.batch_size={args.slots}"] if args.step_s else []), *args.sets],
            )
            t0 = time.perf_counter()
            manifest = preference(cfg)
            wall = time.perf_counter() - t0
            build = manifest["timings_s"]["workers_build_wall"]
            busy = {n: manifest["timings_s"].get(f"workers_{n}", 0.0) for n in ("generate", "score", "select")}
            first = first or build
            gen = manifest["cost"]["stages"]["generate"]["this_run"]
            occ = gen.get("occupancy", {})
            engine = (f"; engine: {gen['generated_tokens'] / occ['engine_s']:,.0f} tokens/s stepping, below 90% of "
                      f"its slots {occ['below_90pct_share']:.0%} of the time, slot use {occ['slot_use']:.0%}"
                      if args.step_s and occ.get("engine_s") else "")
            print(f"shard_size {size:6d} ({manifest['shards']['total']:6d} shards), shards_in_flight {k}: build phase "
                  f"{build:7.1f} s ({build / first:.2f}x the first), stages busy {sum(busy.values()):.1f} s "
                  f"({', '.join(f'{n} {v:.1f}' for n, v in busy.items())}), whole command {wall:.1f} s{engine}",
                  flush=True)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    if args.shard_sizes:
        work = Path(tempfile.mkdtemp(prefix="dafactory-bench-"))
        shard_sizes(args, work, write_prompts(work / "prompts.jsonl", args.prompts))
        return

    import pyarrow.parquet as pq

    from dafactory.flows.preference import preference
    from dafactory.tasks.config import PreferenceConfig, build_config
    from dafactory.tasks.io.storage import DatasetDir

    work = Path(tempfile.mkdtemp(prefix="dafactory-bench-"))
    src = write_prompts(work / "prompts.jsonl", args.prompts)

    cfg = build_config(
        PreferenceConfig, None,
        [f"output={work / 'out'}", "dataset=bench", f"prompts.path={src}", "prompts.category_column=category",
         "student.backend=fake", f"n={args.n}", f"shard_size={args.shard_size}", "sampling.max_new_tokens=32",
         "student.num_cpus=1", "scoring.num_cpus=1", *NO_SCREEN],
    )
    sampler = RayRssSampler()
    sampler.start()
    t0 = time.perf_counter()
    manifest = preference(cfg)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    rows = manifest["tables"]["candidates"]["rows"]
    build = manifest["timings_s"]["workers_build_wall"]
    driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from dafactory.tasks.io.verify import verify

    t2 = time.perf_counter()
    verdict = verify(DatasetDir(cfg.output, cfg.dataset))
    verify_s = time.perf_counter() - t2
    verify_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    table = DatasetDir(cfg.output, cfg.dataset).read_table("candidates")
    t1 = time.perf_counter()
    pq.write_table(table, work / "baseline.parquet", compression="zstd")
    base = time.perf_counter() - t1

    flow_rate, base_rate = rows / build, rows / base
    print(f"prompts {args.prompts}, n {args.n}, shards {manifest['shards']['total']}, candidate rows {rows}")
    print(f"flow, shard build phase : {build:8.2f} s  {flow_rate:10.0f} candidate rows/s")
    print(f"flow, whole command     : {wall:8.2f} s  {rows / wall:10.0f} candidate rows/s "
          f"(includes Prefect server start, prompt load, worker start, manifest)")
    print(f"baseline pyarrow write  : {base:8.2f} s  {base_rate:10.0f} candidate rows/s")
    print(f"ratio flow/baseline     : {flow_rate / base_rate:.3f} (build phase), {rows / wall / base_rate:.3f} (whole)")
    print(f"peak RSS: driver {driver_peak_mb:.0f} MB, Ray workers (sum) {sampler.peak / 2**20:.0f} MB "
          f"(USS, without shared object-store pages: {sampler.peak_uss / 2**20:.0f} MB)")
    print(f"verify: {verify_s:.1f} s, {len(verdict.problems)} problems, accounting {verdict.counts}; "
          f"driver peak RSS after verify {verify_peak_mb:.0f} MB")
    print("stage seconds (summed over shards): "
          + ", ".join(f"{k}={v}" for k, v in manifest["timings_s"].items()))


if __name__ == "__main__":
    main()
