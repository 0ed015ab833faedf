"""Judge throughput next to generation throughput, on the embedded default model, in one command.

    python benchmarks/bench_judges.py --rows 32

Generates `--rows` responses with SmolLM2-135M-Instruct (the generation baseline), then times each judge
on exactly those (prompt, response) rows in the same process: the refusal heuristic, the yes/no judge
(one prefill per row), and the Llama-Guard-style and STAR-1 rubric judges decoding with the same model
(verdicts from a 135M model are mostly unparsable: this measures the machinery, not the judgement).
Prints rows/s for each and the ratio to generation.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from dafactory.tasks.config import EMBEDDED_MODEL, ModelConfig, SamplingConfig, ScorerConfig
    from dafactory.tasks.generate.backends.hf import HFBackend
    from dafactory.tasks.io.prompts import PromptSource, load_prompts
    from dafactory.tasks.score.scorers import SCORERS

    prompts = load_prompts(PromptSource(path="sample", category_column="category")).rows
    rows_in = [prompts[i % len(prompts)] for i in range(args.rows)]
    gen = HFBackend(ModelConfig(model=EMBEDDED_MODEL))
    gen.load()
    convs = [[{"role": "user", "content": r.prompt}] for r in rows_in]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7)
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(convs), args.batch_size):
        outs += gen.generate(convs[s : s + args.batch_size], sampling, seed=s)
    gen_s = time.perf_counter() - t0
    tokens = sum(o.response_tokens for o in outs)
    rows = [{"prompt": r.prompt, "response": o.text, "category": r.category} for r, o in zip(rows_in, outs)]
    print(f"rows {len(rows)}, {tokens} generated tokens, batch {args.batch_size}, torch threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"{'generation (baseline)':<28} {gen_s:8.2f} s {len(rows) / gen_s:9.2f} rows/s {tokens / gen_s:8.1f} tok/s  1.00x")

    judges = [
        ScorerConfig(name="refusal_heuristic"),
        ScorerConfig(name="yes_no_judge", model=EMBEDDED_MODEL, batch_size=args.batch_size),
        ScorerConfig(name="llama_guard", model=EMBEDDED_MODEL, batch_size=args.batch_size),
        ScorerConfig(name="rubric_judge", model=EMBEDDED_MODEL, batch_size=args.batch_size,
                     params={"rubric": "star1", "max_new_tokens": 32}),
    ]
    for cfg in judges:
        judge = SCORERS.get(cfg.name)(cfg)
        judge.load()
        t0 = time.perf_counter()
        results = judge.score(rows)
        dt = time.perf_counter() - t0
        parsed = sum(r["score"] is not None for r in results)
        print(f"{cfg.name:<28} {dt:8.2f} s {len(rows) / dt:9.2f} rows/s {'':>14}  {gen_s / dt:5.2f}x"
              f"   ({parsed}/{len(rows)} verdicts parsed)")


if __name__ == "__main__":
    main()
