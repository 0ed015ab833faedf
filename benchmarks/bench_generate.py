"""Generation throughput of each engine of the transformers backend, against plain batched `generate`.

Plain generate (`plain`, defined here, not an engine of the product) is transformers' `model.generate` on a row per
sample, nothing shared: the baseline the issue's figures use. The `generate` engine is that plus each prompt
prefilled once for its samples.

Random weights in the shape of Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab
151936; nothing downloaded), EOS ignored, two loads:
  (a) fixed: `--requests` prompts x `--new-tokens` new tokens, one sample each;
  (b) reasoning-like: `--requests-b` prompts x N = `--n-b` samples, new-token budgets drawn long-tailed between 64
      and `--max-budget` (seeded): a static batch waits for its longest row, continuous batching does not.
Each engine gets the same requests in calls of at most `--batch` sequences, as generate_shard gives them. Prints
tokens/s (tokens within each request's budget), the ratio to plain generate, and the fraction of the memory-bandwidth
limit: at each decode step the weights and the KV cache read once for the whole batch (`--bandwidth-gbs`, by
default from the device name: H100 3350, H200 4800).

`--check` first compares each engine's greedy output with plain generate's (first 32 tokens of each row; the random
lm_head is scaled up so that the argmax is not a near tie that bf16 rounding flips).
Each static engine's occupancy is printed too (generation.occupancy: the share of the time it ran below 90% of its
batch, and of its sequence slots that held a sequence within its budget); `paged` keeps its schedule to itself.
None of these engines streams across calls (tasks/generate/feed.py): the static ones hold a batch until its longest
row ends, and `paged` seeds once per call, so requests of other calls in its loop would change a call's samples.
`--small` shrinks the model and the loads to run on a CPU in under a minute. `--json PATH` writes the results.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=2048)
BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039, "L4": 300}
ENGINES = ["generate", "static", "paged"]
PLAIN = "plain"


def plain_generate(backend, requests, sampling, budgets):
    """The baseline, as an engine: `model.generate` on every sample's row, left-padded, nothing shared."""
    import torch

    from dafactory.tasks.generate.backends.engines import _generate_kwargs, _left_padded, _regroup

    rows = [r.prompt_ids for r in requests for _ in range(r.n)]
    ids, mask = _left_padded(rows, backend.tok.pad_token_id, backend.model.device)
    torch.manual_seed(requests[0].seed)
    with torch.inference_mode():
        out = backend.model.generate(input_ids=ids, attention_mask=mask,
                                     **_generate_kwargs(backend, max(budgets), sampling))
    return _regroup(out[:, ids.shape[1] :].tolist(), requests, budgets)


def register_plain() -> None:
    from dafactory.tasks.generate.backends.engines import ENGINES as REGISTRY

    if PLAIN not in REGISTRY.names():
        REGISTRY.register(PLAIN)(plain_generate)


class NoTokenizer:
    """The benchmark samples token ids; the backend's one decode gives an empty text."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def build(shape: dict, device: str, lm_head_scale: float):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dafactory.tasks.config import ModelConfig
    from dafactory.tasks.generate.backends.hf import HFBackend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.generation_config.eos_token_id = None
    b = HFBackend(ModelConfig(model="random-qwen2"))
    b.model, b.tok, b.eos_ids = model, NoTokenizer(), set()
    return b


def loads(args, rng: random.Random, vocab: int) -> dict:
    def prompt():
        return tuple(rng.randrange(1, vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max)))

    fixed = [(prompt(), 1, args.new_tokens) for _ in range(args.requests)]
    # Long-tailed: Pareto (alpha 1) from 64, cut at max_budget: median ~128, a few rows near the cap.
    lo = min(64, args.max_budget)
    tail = [(prompt(), args.n_b, min(args.max_budget, int(lo / max(1e-9, 1 - rng.random()))))
            for _ in range(args.requests_b)]
    return {"a": fixed, "b": tail}


def calls(load: list, batch: int) -> list[list]:
    """Consecutive requests, at most `batch` sequences a call (a request bigger than that is a call of its own)."""
    out, cur, size = [], [], 0
    for item in load:
        if cur and size + item[1] > batch:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item[1]
    return out + ([cur] if cur else [])


def run(backend, engine: str, load: list, batch: int, sampling, sync, occupancy=None) -> tuple[float, list]:
    """Seconds and samples of the load through `engine`. `occupancy` (a Counter), if given, gets each call's
    occupancy as generate_shard counts it for a static batch (generation.occupancy: a sequence runs until its own
    budget, the call until its longest); not for `paged`, whose schedule transformers keeps to itself."""
    from dafactory.tasks.generate.generation import Request, occupancy as count

    backend.engine = engine
    out = []
    sync()
    t0 = time.perf_counter()
    for seed, chunk in enumerate(calls(load, batch)):
        requests = [Request(p, n, seed, b) for p, n, b in chunk]
        t1 = time.perf_counter()
        out += backend.sample(requests, sampling)
        if occupancy is not None and engine != "paged":
            sync()
            count(occupancy, time.perf_counter() - t1, [b for _, n, b in chunk for _ in range(n)], batch)
    sync()
    return time.perf_counter() - t0, out


def bandwidth_fraction(model, load: list, batch: int, tokens_per_s: float, bandwidth_gbs: float | None) -> float | None:
    """Achieved tokens/s over the bound where each decode step reads the weights and the batch's KV cache once."""
    if not bandwidth_gbs:
        return None
    cfg = model.config
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
    seqs = sum(n for _, n, _ in load)
    context = sum(n * (len(p) + b / 2) for p, n, b in load) / seqs  # mean context over a sequence's decode
    concurrent = min(batch, seqs)
    step_bytes = weights + concurrent * context * kv_per_token
    bound = concurrent * bandwidth_gbs * 1e9 / step_bytes
    return tokens_per_s / bound


def check(backend, args, rng: random.Random, sampling_cls) -> dict:
    """Greedy: each engine's first 32 tokens of each row against plain generate's, on prompts of varied lengths."""
    vocab = backend.model.config.vocab_size
    load = [(tuple(rng.randrange(1, vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))), n, 32)
            for n in [1, 2] * (args.check_requests // 2)]
    greedy = sampling_cls(temperature=0, max_new_tokens=32)
    rows = {}
    for engine in [PLAIN, *ENGINES]:
        try:
            _, out = run(backend, engine, load, args.batch, greedy, lambda: None)
            rows[engine] = [g.token_ids[:32] for gens in out for g in gens]
        except Exception as exc:  # one broken engine must not hide the others' results
            rows[engine] = f"{type(exc).__name__}: {str(exc)[:300]}"
    result = {}
    for engine in ENGINES:
        if isinstance(rows[engine], str) or isinstance(rows[PLAIN], str):
            result[engine] = {"error": rows[engine] if isinstance(rows[engine], str) else rows[PLAIN]}
            continue
        same = sum(a == b for a, b in zip(rows[engine], rows[PLAIN])) / len(rows[PLAIN])
        result[engine] = {"rows": len(rows[PLAIN]), "agree_first_32": round(same, 4), "ok": same >= 0.95}
    return result


def save(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny model and loads, for a CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated; plain generate (the baseline) always runs")
    ap.add_argument("--loads", default="a,b")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--requests-b", type=int, default=512)
    ap.add_argument("--n-b", type=int, default=4)
    ap.add_argument("--max-budget", type=int, default=2048)
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=160)
    ap.add_argument("--batch", type=int, default=512, help="sequences per sample() call")
    ap.add_argument("--bandwidth-gbs", type=float, default=None)
    ap.add_argument("--check", action="store_true", help="greedy agreement with plain generate first")
    ap.add_argument("--check-requests", type=int, default=64)
    ap.add_argument("--lm-head-scale", type=float, default=64.0)
    ap.add_argument("--json", type=Path)
    if "--small" in sys.argv:  # smaller defaults; options given on the line still win
        ap.set_defaults(requests=16, new_tokens=16, requests_b=12, n_b=2, max_budget=48, prompt_min=4, prompt_max=16,
                        batch=16, check_requests=8)
    args = ap.parse_args()

    import torch

    from dafactory.tasks.config import SamplingConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    register_plain()
    backend = build(SMALL if args.small else QWEN2_05B, device, args.lm_head_scale)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    import transformers

    results = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
               "bandwidth_gbs": bandwidth, "args": vars(args) | {"json": str(args.json)}, "loads": {}}
    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bandwidth {bandwidth} GB/s", flush=True)
    rng = random.Random(0)
    if args.check:
        results["check"] = check(backend, args, random.Random(1), SamplingConfig)
        print("greedy check (first 32 tokens vs plain generate):", json.dumps(results["check"]), flush=True)
        save(args.json, results)
    work = loads(args, rng, backend.model.config.vocab_size)
    engines = [PLAIN] + [e for e in args.engines.split(",") if e and e != PLAIN]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=max(args.new_tokens, args.max_budget))
    for key in [k for k in args.loads.split(",") if k]:
        load = work[key]
        useful = sum(n * b for _, n, b in load)
        print(f"load ({key}): {len(load)} requests, {sum(n for _, n, _ in load)} sequences, {useful} tokens",
              flush=True)
        # Warm-up on the first call's worth (compile, CUDA graphs, cache allocation), not timed.
        rows = {}
        for engine in engines:
            try:
                run(backend, engine, load[: max(1, min(len(load), args.batch // max(1, load[0][1]) // 4))],
                    args.batch, sampling, sync)
                occ = Counter()
                seconds, _ = run(backend, engine, load, args.batch, sampling, sync, occ)
                tps = useful / seconds
                rows[engine] = {"seconds": round(seconds, 3), "tokens_per_s": round(tps, 1),
                                "bandwidth_fraction": bandwidth_fraction(backend.model, load, args.batch, tps,
                                                                         bandwidth)}
                if occ:
                    rows[engine]["occupancy"] = {"below_90pct_share": round(occ["below_s"] / occ["engine_s"], 3),
                                                 "slot_use": round(occ["slot_steps"] / occ["slot_capacity"], 3)}
            except Exception as exc:  # report and go on with the other engines
                rows[engine] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                if device == "cuda":
                    torch.cuda.empty_cache()
            base = rows.get(PLAIN, {}).get("tokens_per_s")
            r = rows[engine]
            if "tokens_per_s" in r and base:
                r["vs_plain"] = round(r["tokens_per_s"] / base, 2)
            frac, occ = r.get("bandwidth_fraction"), r.get("occupancy")
            print(f"  {engine:9s} " + (f"{r['tokens_per_s']:>10.1f} tokens/s  {r.get('vs_plain', 0):5.2f}x plain"
                                       + (f"  {frac:.2%} of the bandwidth limit" if frac is not None else "")
                                       + (f"  below 90% of its batch {occ['below_90pct_share']:.0%} of the time, "
                                          f"slot use {occ['slot_use']:.0%}" if occ else
                                          "  occupancy not counted (transformers keeps the schedule)"
                                          if engine == "paged" else "")
                                       if "tokens_per_s" in r else r["error"]), flush=True)
            results["loads"][key] = rows
            save(args.json, results)  # after each engine: a step killed by its timeout keeps what it measured
    if "check" in results and not all(c.get("ok") for c in results["check"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
