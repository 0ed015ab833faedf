"""Latent-attribution scoring throughput: batched against a naive one-pair-at-a-time loop, one command.

    python benchmarks/bench_latent.py --pairs 256 --batch-size 32

Builds two tiny random Llama models (FT and base, same shape, different weights) and a word-level
tokenizer, then scores the same (prompt, response) pairs twice: with the latent_attribution scorer
(length-sorted, right-padded batches, both models' forward once per batch) and with the naive loop
(the same signals, one pair at a time, no padding): cos@layer, KL both ways, perplexity and
self-certainty in both. Prints pairs/s and tokens/s for both and their ratio, after checking
that both give the same scores. `--hidden` and `--layers` size the models.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_models(root: Path, hidden: int, layers: int):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), max_position_embeddings=1024, pad_token_id=0)
    for name, seed in (("ft", 1), ("base", 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return words


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import torch

    from dafactory.tasks.config import ScorerConfig
    from dafactory.tasks.score.scorers import SCORERS

    root = Path(tempfile.mkdtemp(prefix="dafactory-latent-"))
    words = build_models(root, args.hidden, args.layers)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(10, 60))),
             "response": " ".join(rng.choices(words, k=rng.randint(20, 200))), "category": None}
            for _ in range(args.pairs)]
    layer = min(2, args.layers)
    scorer = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=str(root / "ft"), batch_size=args.batch_size,
        params={"base": str(root / "base"), "layers": [layer]}))
    scorer.load()
    tokens = sum(len(scorer.encode(r)[0]) for r in rows)
    scorer.score(rows[: args.batch_size])  # warm-up

    t0 = time.perf_counter()
    batched = [r["score"] for r in scorer.score(rows)]
    t_batched = time.perf_counter() - t0

    # Naive: the same signals, one pair at a time (no batching, no padding, no length sorting).
    naive_scorer = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=str(root / "ft"), batch_size=1,
        params={"base": str(root / "base"), "layers": [layer]}))
    naive_scorer.load()
    t0 = time.perf_counter()
    naive = [naive_scorer.score([r])[0]["score"] for r in rows]
    t_naive = time.perf_counter() - t0

    worst = max(abs(x - y) for x, y in zip(batched, naive))
    print(f"pairs {len(rows)}, tokens {tokens}, model hidden {args.hidden} x {args.layers} layers, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, max |diff| {worst:.2e}")
    print(f"naive one pair at a time : {t_naive:7.2f} s {len(rows) / t_naive:8.1f} pairs/s {tokens / t_naive:9.0f} tokens/s")
    print(f"batched latent scorer    : {t_batched:7.2f} s {len(rows) / t_batched:8.1f} pairs/s {tokens / t_batched:9.0f} tokens/s"
          " ")
    print(f"ratio batched/naive      : {t_naive / t_batched:.2f}x")


if __name__ == "__main__":
    main()
