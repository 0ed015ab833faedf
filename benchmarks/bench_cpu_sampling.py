"""CPU sampling as users run it: the preference flow's build against plain batched `generate` of the same work.

One command runs, on the embedded default model (SmolLM2-135M-Instruct):
1. the baseline, in this process: plain `model.generate` of the same prompts (the flow's chat template and system
   prompt), `--n` samples each, in batches of 16 sequences, forced to the full `--max-new-tokens` (EOS ignored),
   with torch using every core (`--threads`);
2. the real command, `dafactory run preference` on a config of the same prompts, n and max_new_tokens, default
   resources, in a fresh process with its own HOME; its build time is read from the dataset's manifest.
It prints both and the ratio (baseline seconds / build seconds: 1.0 means the flow costs nothing over the bare
model; the goal is >= 0.9). The machine may be shared: run both in one command and read the ratio, not seconds.

    python benchmarks/bench_cpu_sampling.py [--prompts 16] [--n 4] [--max-new-tokens 48] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant. Refuse requests that could cause harm."


def config(args, out: Path) -> dict:
    return {
        "dataset": "bench-cpu-sampling",
        "output": str(out),
        "prompts": {"path": "sample", "category_column": "category", "limit": args.prompts},
        "system_prompt": SYSTEM,
        "n": args.n,
        "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "seed": 0},
    }


def baseline(args) -> dict:
    """Plain batched generate of the run's work, forced to max_new_tokens, on every core."""
    import torch

    from dafactory.tasks.config import EMBEDDED_MODEL, ModelConfig, PromptSource
    from dafactory.tasks.generate.backends.hf import HFBackend
    from dafactory.tasks.generate.generation import messages
    from dafactory.tasks.io.prompts import load_prompts

    torch.set_num_threads(args.threads)
    rows = load_prompts(PromptSource(path="sample", category_column="category", limit=args.prompts)).rows
    b = HFBackend(ModelConfig(model=EMBEDDED_MODEL, params={"engine": "generate"}))
    b.load()
    tok, model = b.tok, b.model
    ids = b.render([messages(r.prompt, SYSTEM) for r in rows])
    seqs = [p for p in ids for _ in range(args.n)]
    t0 = time.perf_counter()
    for start in range(0, len(seqs), 16):
        batch = tok.pad({"input_ids": seqs[start : start + 16]}, return_tensors="pt")
        torch.manual_seed(start)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           do_sample=True, temperature=0.7, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "sequences": len(seqs), "threads": torch.get_num_threads(),
            "tokens_per_s": round(len(seqs) * args.max_new_tokens / seconds, 1)}


def flow(args, work: Path) -> dict:
    """`dafactory run preference` in its own process and HOME (its own temporary Prefect), as a user runs it."""
    path = work / "config.json"
    path.write_text(json.dumps(config(args, work / "out")))
    (work / "home").mkdir(exist_ok=True)
    from dafactory.tasks.generate.models import cache_dir

    # Its own HOME, but the converted embedded model of this user (else the build converts it again, ~45 s).
    env = dict(os.environ, HOME=str(work / "home"), DAFACTORY_CACHE=str(cache_dir()))
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "run", "preference", "--config", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"the run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifest = json.loads(next((work / "out").rglob("manifest.json")).read_text())
    t = manifest["timings_s"]
    return {"build_s": t["build"], "prepare_s": t["prepare"], "command_s": round(wall, 2),
            "workers_s": {k: v for k, v in t.items() if k.startswith("workers_")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the baseline")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = baseline(args)
    print(f"plain generate: {base['seconds']} s for {base['sequences']} x {args.max_new_tokens} tokens "
          f"({base['tokens_per_s']} tokens/s, {base['threads']} threads)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = flow(args, Path(tmp))
    ratio = base["seconds"] / run["build_s"]
    print(f"dafactory run preference: build {run['build_s']} s (prepare {run['prepare_s']} s, whole command "
          f"{run['command_s']} s; workers {run['workers_s']})")
    print(f"ratio plain generate / flow build: {ratio:.2f}x (goal >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps({"baseline": base, "flow": run, "ratio": round(ratio, 3),
                                         "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
