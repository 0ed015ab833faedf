"""Latent-attribution scoring throughput, one command, without Prefect or Ray (a guard blocks their import).

    python benchmarks/bench_latent.py                       # CUDA: scorer vs a plain forward, 0.5B Qwen2 shape
    python benchmarks/bench_latent.py --device cpu          # CPU: scorer vs a naive one-pair-at-a-time loop
    python benchmarks/bench_latent.py --device cpu --mode both --pairs 64 --json out.json

Builds two random Qwen2-shaped models (FT and base: one shape, different weights, no download; Llama
modules, as Qwen2 with its q/k/v biases left out, because AutoTokenizer would replace the word-level
tokenizer of a `qwen2` model by Qwen2's BPE) and a word-level tokenizer over their vocabulary, then
times the latent_attribution scorer (token-budget batches of similar length, both models' backbone once
per batch, logits at response positions only, all signals: cos@layer, KL both ways, perplexity,
self-certainty) on random (prompt, response) pairs against
- `forward` (default on CUDA): a plain batched forward of the same two models (`model(ids, mask)`, full
  logits, no signals) over the same padded batches. Goal on the GPU: scorer >= 0.9x the plain forward.
- `naive` (default on CPU): the same signals one pair at a time (no padding), after checking that both
  give the same scores.
Prints tokens/s (real tokens, not pads) and the ratios; `--json PATH` writes the figures.
Defaults on CUDA: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936 (Qwen2-0.5B),
2048 pairs of 256-768 tokens, bf16. On CPU: hidden 256, 4 layers, vocab 2000, 256 pairs of 30-260 tokens.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BLOCKED = ("prefect", "ray")  # the GPU machine has neither: scoring must not need them


class _BlockOrchestration(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any import of Prefect or Ray fails, as if they were not installed where it matters: at import."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"bench_latent: {spec.name} was imported; scoring must run without Prefect and Ray")

    def exec_module(self, module):  # never reached: create_module raises
        raise ImportError(module.__name__)


def build_models(root: Path, a: argparse.Namespace, dtype) -> list[str]:
    """FT and base, saved with a word-level tokenizer whose words are the vocabulary; returns the words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words = [f"w{i}" for i in range(a.vocab - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(1024, a.max_tokens + 64), tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=vocab["<|im_end|>"], bos_token_id=None)
    for name, seed in (("ft", 1), ("base", 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return words


def make_rows(words: list[str], a: argparse.Namespace) -> list[dict]:
    """Pairs of min..max words in all (a quarter of them, at least 8, the prompt)."""
    rng = random.Random(0)
    rows = []
    for _ in range(a.pairs):
        total = rng.randint(a.min_tokens, a.max_tokens)
        prompt = rng.randint(8, max(8, total // 4))
        rows.append({"prompt": " ".join(rng.choices(words, k=prompt)),
                     "response": " ".join(rng.choices(words, k=max(1, total - prompt))), "category": None})
    return rows


def scorer_for(root: Path, a: argparse.Namespace, device: str, dtype, batch_size: int):
    from dafactory.tasks.config import ScorerConfig
    from dafactory.tasks.score.scorers import SCORERS

    params = {"base": str(root / "base"), "layers": [a.score_layer]}
    if a.max_batch_tokens:
        params["max_batch_tokens"] = a.max_batch_tokens
    s = SCORERS.get("latent_attribution")(ScorerConfig(name="latent_attribution", model=str(root / "ft"),
                                                       batch_size=batch_size, params=params))
    s.load()
    s.ft.to(device=device, dtype=dtype)  # the loader's choice is bf16 on CUDA, float32 on CPU
    s.base.to(device=device, dtype=dtype)
    if not a.max_batch_tokens:
        from dafactory.tasks.score.scorers import default_max_batch_tokens

        s.max_batch_tokens = default_max_batch_tokens(device)
    return s


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_scorer(torch, s, rows: list[dict], device: str) -> tuple[float, list]:
    s.score(rows[: min(len(rows), 32)])  # warm-up
    sync(torch, device)
    t0 = time.perf_counter()
    results = s.score(rows)
    sync(torch, device)
    return time.perf_counter() - t0, results


def time_plain_forward(torch, s, rows: list[dict], device: str) -> tuple[float, int]:
    """The same two models, the same padded batches, `model(ids, attention_mask, position_ids)` each."""
    from dafactory.tasks.score.scorers import token_batches

    encoded = [s.encode(r)[0] for r in rows]
    batches = []
    for batch in token_batches([len(e) for e in encoded], s.max_batch_tokens, s.cfg.batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), s.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            off = width - len(encoded[i]) if s.padding_side == "left" else 0
            ids[row, off : off + len(encoded[i])], mask[row, off : off + len(encoded[i])] = torch.tensor(encoded[i]), 1
        batches.append((ids, mask))
    padded = sum(ids.numel() for ids, _ in batches)

    def run(todo) -> None:
        with torch.inference_mode():
            for ids, mask in todo:
                ids, mask = ids.to(device), mask.to(device)
                positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
                for model in (s.ft, s.base):
                    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)

    run(batches[:1])  # warm-up
    sync(torch, device)
    t0 = time.perf_counter()
    run(batches)
    sync(torch, device)
    return time.perf_counter() - t0, padded


def main() -> None:
    sys.meta_path.insert(0, _BlockOrchestration())
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--mode", choices=["forward", "naive", "both"], default=None,
                    help="what the scorer is compared with (default: forward on CUDA, naive on CPU)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--min-tokens", type=int, default=None, help="words per pair (prompt and response), at least")
    ap.add_argument("--max-tokens", type=int, default=None, help="words per pair, at most")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per batch, at most")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="padded tokens per batch (scorer default)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--score-layer", type=int, default=None, help="the layer read (default: half the depth)")
    a = ap.parse_args()
    if a.device == "cuda" and not cuda:
        ap.error("--device cuda: no CUDA device here")
    gpu = a.device == "cuda"
    defaults = (dict(pairs=2048, min_tokens=256, max_tokens=768, batch_size=256, hidden=896, layers=24, heads=14,
                     kv_heads=2, intermediate=4864, vocab=151936) if gpu else
                dict(pairs=256, min_tokens=30, max_tokens=260, batch_size=32, hidden=256, layers=4, heads=4,
                     kv_heads=4, intermediate=1024, vocab=2000))
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.score_layer is None:
        a.score_layer = a.layers // 2
    mode = a.mode or ("forward" if gpu else "naive")
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[a.dtype]

    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dafactory-latent-"))
    try:
        run(a, root, torch, gpu, mode, dtype, t_start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(a: argparse.Namespace, root: Path, torch, gpu: bool, mode: str, dtype, t_start: float) -> None:
    words = build_models(root, a, dtype)
    rows = make_rows(words, a)
    s = scorer_for(root, a, a.device, dtype, a.batch_size)
    tokens = sum(len(s.encode(r)[0]) for r in rows)
    t_setup = time.perf_counter() - t_start
    t_scorer, results = time_scorer(torch, s, rows, a.device)
    scores = [r["score"] for r in results]
    nulls = sum(x is None for x in scores)
    figures = {
        "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "torch_threads": torch.get_num_threads(), "mode": mode, "pairs": len(rows), "tokens": tokens,
        "model": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")},
        "score_layer": a.score_layer, "batch_size": a.batch_size, "max_batch_tokens": s.max_batch_tokens,
        "setup_s": round(t_setup, 2), "scorer_s": round(t_scorer, 3), "scorer_tokens_per_s": round(tokens / t_scorer),
        "null_scores": nulls,
    }
    print(f"{figures['device']} {figures['dtype']}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"pairs {len(rows)}, tokens {tokens}, Qwen2-shaped hidden {a.hidden} x {a.layers} layers, vocab {a.vocab}, "
          f"batch <= {a.batch_size} rows and {s.max_batch_tokens} padded tokens, setup {t_setup:.1f} s")
    print(f"latent scorer (all signals)  : {t_scorer:7.2f} s {len(rows) / t_scorer:9.1f} pairs/s "
          f"{tokens / t_scorer:10.0f} tokens/s, {nulls} null scores")

    if mode in ("forward", "both"):
        t_plain, padded = time_plain_forward(torch, s, rows, a.device)
        figures.update(plain_forward_s=round(t_plain, 3), plain_forward_tokens_per_s=round(tokens / t_plain),
                       padded_tokens=padded, scorer_vs_plain_forward=round(t_plain / t_scorer, 3))
        print(f"plain forward, both models   : {t_plain:7.2f} s {len(rows) / t_plain:9.1f} pairs/s "
              f"{tokens / t_plain:10.0f} tokens/s ({padded} padded tokens, {tokens / padded:.0%} real)")
        print(f"ratio scorer/plain forward   : {t_plain / t_scorer:.2f}x (goal on the GPU: >= 0.9x)")

    if mode in ("naive", "both"):
        naive_scorer = scorer_for(root, a, a.device, dtype, 1)
        sync(torch, a.device)
        t0 = time.perf_counter()
        naive = [naive_scorer.score([r])[0]["score"] for r in rows]
        sync(torch, a.device)
        t_naive = time.perf_counter() - t0
        worst = max(abs(x - y) for x, y in zip(scores, naive) if x is not None and y is not None)
        figures.update(naive_s=round(t_naive, 3), naive_tokens_per_s=round(tokens / t_naive),
                       scorer_vs_naive=round(t_naive / t_scorer, 3), max_abs_diff_vs_naive=worst)
        print(f"naive one pair at a time     : {t_naive:7.2f} s {len(rows) / t_naive:9.1f} pairs/s "
              f"{tokens / t_naive:10.0f} tokens/s, max |score diff| {worst:.2e}")
        print(f"ratio scorer/naive           : {t_naive / t_scorer:.2f}x")

    blocked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not blocked, blocked  # the guard raised on import; nothing got past it
    figures["total_s"] = round(time.perf_counter() - t_start, 2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
