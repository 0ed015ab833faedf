"""What the orchestration benchmarks share: their arguments and the prompt file they all read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--shard-sizes", type=int, nargs="*", help="bench_orchestration: build at each, compared")
    ap.add_argument("--in-flight", type=int, nargs="*", default=[2], help="with --shard-sizes: shards_in_flight")
    ap.add_argument("--step-s", type=float, default=0.0,
                    help="with --shard-sizes: the fake engine's seconds per decode step (a streaming engine, "
                         "tasks/generate/feed.py, that takes the replica's shards in flight together); 0: off")
    ap.add_argument("--slots", type=int, default=256, help="with --step-s: that engine's sequences at once")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="bench_orchestration --shard-sizes: a config override for every build (repeatable)")
    return ap.parse_args()


# The input screen (embedding decontamination, MinHash dedup) is measured by bench_dedup.py; the orchestration
# and commit benchmarks leave it out, so that they time what they name (their prompts differ only in numbers,
# which MinHash would rightly collapse).
NO_SCREEN = ["decontamination.enabled=false", "dedup.minhash=null"]


def write_prompts(path: Path, count: int) -> Path:
    """`count` distinct prompts, a third of them benign, as JSONL with prompt and category."""
    with path.open("w") as f:
        for i in range(count):
            cat = "benign" if i % 3 == 0 else "harm"
            f.write(json.dumps({"prompt": f"question {i}: how would someone do thing {i % 97}?", "category": cat}) + "\n")
    return path
