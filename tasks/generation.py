"""Generation bookkeeping shared by every backend. Pure: no Prefect, Ray or torch.

A backend only turns a batch of chat messages into texts; this module decides batches and seeds,
quarantines prompts that do not fit the context, and builds GENERATED rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from tasks.config import ModelConfig, SamplingConfig
from tasks.prompts import PromptRow, Shard
from tasks.selection import messages


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    response_tokens: int


class Backend(Protocol):
    model_id: str
    revision: str | None

    def __init__(self, cfg: ModelConfig) -> None: ...
    def load(self) -> None: ...
    def context_length(self) -> int | None: ...
    def count_prompt_tokens(self, conversations: list[list[dict]], prefill: str = "") -> list[int]: ...
    def generate(
        self, conversations: list[list[dict]], sampling: SamplingConfig, seed: int, prefill: str = ""
    ) -> list[Generation]: ...


@dataclass(frozen=True)
class ChatPrompt:
    """The plain conversation: an optional system message and the request."""

    system_prompt: str | None = None
    prefill: str = ""  # text that opens the assistant turn (the model continues it)

    def __call__(self, row: PromptRow) -> list[dict]:
        return messages(row.prompt, self.system_prompt)


def batch_seed(base: int, shard_id: str, batch_index: int) -> int:
    """Seed of one generate() call, independent of which replica runs it."""
    digest = hashlib.sha256(f"{base}:{shard_id}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generate_shard(
    backend: Backend,
    shard: Shard,
    n: int,
    sampling: SamplingConfig,
    batch_size: int,
    conversation,
) -> tuple[list[dict], list[dict]]:
    """(GENERATED rows, QUARANTINE rows) for one shard; `conversation` turns a PromptRow into messages
    and may open the assistant turn with `conversation.prefill`."""
    prefill = conversation.prefill
    convs = [conversation(r) for r in shard.rows]
    limit = backend.context_length()
    fits, quarantine = [], []
    lengths = backend.count_prompt_tokens(convs, prefill) if limit else [0] * len(convs)
    for row, conv, length in zip(shard.rows, convs, lengths):
        if limit and length + sampling.max_new_tokens > limit:
            quarantine.append(
                {
                    "prompt_id": row.prompt_id,
                    "source_row": row.source_row,
                    "prompt": row.prompt[:200],
                    "reason": "too_long",
                    "detail": f"{length} prompt tokens + max_new_tokens {sampling.max_new_tokens} > context {limit}",
                }
            )
        else:
            fits.append((row, conv))
    # One sequence per (prompt, sample); consecutive so that a prompt's samples share a batch when possible.
    seqs = [(row, conv, k) for row, conv in fits for k in range(n)]
    out = []
    for b, start in enumerate(range(0, len(seqs), batch_size)):
        chunk = seqs[start : start + batch_size]
        seed = batch_seed(sampling.seed, shard.shard_id, b)
        gens = backend.generate([conv for _, conv, _ in chunk], sampling, seed, prefill)
        for (row, _, k), g in zip(chunk, gens):
            out.append(
                {
                    "prompt_id": row.prompt_id,
                    "sample_idx": k,
                    "prompt": row.prompt,
                    "category": row.category,
                    "response": g.text,
                    "finish_reason": g.finish_reason,
                    "prompt_tokens": g.prompt_tokens,
                    "response_tokens": g.response_tokens,
                    "model": backend.model_id,
                    "model_revision": backend.revision,
                    "seed": seed,
                    "shard_id": shard.shard_id,
                }
            )
    return out, quarantine
