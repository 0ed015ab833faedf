"""A deterministic fake backend for orchestration tests and benchmarks. Pure Python.

Each sequence's text is a function of (seed, position in batch, prompt): refusals and compliant
answers of varied length, some cut off at max_new_tokens. Tokens are whitespace-separated words, and a
token's id is a hash of its word (the same word, the same id).

params: refusal_rate (0.5), context_length (4096), latency_s (0: seconds slept per batch, to
stand in for a real model in tests of interruption and throughput), fail_on (None: generate() raises
RuntimeError when the last message of any conversation in the batch contains this text, to test
generation faults), pid_file (None: load() appends the process id and a newline to this file, so that
a test can find and kill the Ray worker that holds the backend), exit_on (None: the process exits at
once, as a segfault or a fatal CUDA error would, when a prompt in the batch contains this text).
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.generation import Generation

REFUSAL = "I'm sorry, but I can't help with that request."


class FakeBackend:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model_id = f"fake:{cfg.model}"
        self.revision = "fake-1"
        self.refusal_rate = float(cfg.params.get("refusal_rate", 0.5))
        self.latency_s = float(cfg.params.get("latency_s", 0.0))
        self._context = int(cfg.params.get("context_length", 4096))
        self.fail_on = cfg.params.get("fail_on")
        self.pid_file = cfg.params.get("pid_file")
        self.exit_on = cfg.params.get("exit_on")

    def load(self) -> None:
        if self.pid_file:
            with open(self.pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")

    def context_length(self) -> int | None:
        return self._context

    def count_prompt_tokens(self, conversations: list[list[dict]], prefill: str = "") -> list[int]:
        return [sum(len(m["content"].split()) for m in conv) + len(prefill.split()) for conv in conversations]

    def generate(
        self, conversations: list[list[dict]], sampling: SamplingConfig, seed: int, prefill: str = ""
    ) -> list[Generation]:
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.exit_on is not None and any(self.exit_on in conv[-1]["content"] for conv in conversations):
            os._exit(1)
        if self.fail_on is not None and any(self.fail_on in conv[-1]["content"] for conv in conversations):
            raise RuntimeError(f"injected failure on a prompt containing {self.fail_on}")
        out = []
        prompt_lens = self.count_prompt_tokens(conversations, prefill)
        for i, (conv, plen) in enumerate(zip(conversations, prompt_lens)):
            h = hashlib.blake2b(f"{seed}:{i}:{conv[-1]['content']}".encode(), digest_size=8).digest()
            if h[0] / 256 < self.refusal_rate:
                words = REFUSAL.split()
            else:
                topic = " ".join(conv[-1]["content"].split()[:4])
                words = f"Sure. Here is a detailed answer about {topic}:".split() + ["step"] * (h[1] % 24)
            if prefill:
                # A reasoning trace closed by </think>; one in ten leaves it open, one in ten answers nothing.
                thought = "The request touches the policy. I weigh it and decide.".split()
                words = thought + (
                    [] if h[2] % 10 == 0 else ["</think>"] if h[2] % 10 == 1 else ["</think>"] + words
                )
            finish = "stop"
            if len(words) > sampling.max_new_tokens:
                words, finish = words[: sampling.max_new_tokens], "length"
            out.append(Generation(" ".join(words), finish, plen, len(words), tuple(map(word_id, words))))
        return out


def word_id(word: str) -> int:
    """A word's token id: stable across processes (unlike hash()), and within int32."""
    return zlib.crc32(word.encode()) & 0x7FFFFFFF
