"""A deterministic fake backend for orchestration tests and benchmarks. Pure Python.

Each sequence's text is a function of (seed, position in the call, prompt): refusals and compliant
answers of varied length, some cut off at max_new_tokens. Tokens are whitespace-separated words, and a
token's id is a hash of its word (the same word, the same id). A rendered prompt is its messages' words
then the prefill's, the first word of each message and of the prefill flagged in bits above the hash, so
that sample() can read back the request (the last message, and whether a prefill opens the answer).

params: refusal_rate (0.5), context_length (4096), latency_s (0: seconds slept per batch, to
stand in for a real model in tests of interruption and throughput), fail_on (None: sample() raises
RuntimeError when the last message of any request in the call contains this text, to test
generation faults), pid_file (None: load() appends the process id and a newline to this file, so that
a test can find and kill the Ray worker that holds the backend), exit_on (None: the process exits at
once, as a segfault or a fatal CUDA error would, when a prompt in the batch contains this text), poison_file
(None: the first process to load the backend while this file does not exist creates it, and from its
second call on every call raises as a CUDA device-side assert does: the process lives on, poisoned; a new
process, as Ray's restart of the actor makes, is healthy), step_s (0: off; else sample() runs through a simulated continuous-batching engine, see SimulatedEngine, fed by
every thread of the replica: tasks/generate/feed.py), engine_slots (256: that engine's sequences at once), error_rate (0: sample() raises RuntimeError when
any request in the call is for a prompt drawn to fail: a random fault on that share of prompts, the same
prompts every time, since the draw is a hash of the prompt's text), fail_while (None: a path; fail_on and
error_rate apply only while that file exists, so that a test fixes a fault without changing the config).

Under budget forcing (a teacher's prefilled turn with sampling.reasoning_budget) a trace thinks up to 15 words
longer, so that a budget both closes traces and finds traces closed; see `_forced`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zlib
from collections import deque

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.feed import EngineFeed
from dafactory.tasks.generate.generation import Backend, BudgetForcing, Generation, Request

VOCABULARY = 1 << 17  # words remembered from earlier render() calls, at most
REFUSAL = "I'm sorry, but I can't help with that request."
MESSAGE = 1 << 31  # flags the first word of a message
PREFILL = 1 << 32  # flags the first word of the prefill


class FakeBackend(Backend):
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
        self.error_rate = float(cfg.params.get("error_rate", 0.0))
        self.fail_while = cfg.params.get("fail_while")
        self.poison_file, self.poisoned, self._sampled = cfg.params.get("poison_file"), False, 0
        self.step_s, self.engine_slots = float(cfg.params.get("step_s", 0.0)), int(cfg.params.get("engine_slots", 256))
        # The vocabulary seen by render(), id -> word: the words of recent renders and of those before them.
        self._words: dict[int, str] = {}
        self._older: dict[int, str] = {}
        self._vocabulary = threading.Lock()  # threads of a streaming replica render and read at once

    def load(self) -> None:
        if self.pid_file:
            with open(self.pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        if self.step_s > 0:
            self.feed = EngineFeed(SimulatedEngine(self.engine_slots, self.step_s))

    def context_length(self) -> int | None:
        return self._context

    def render(self, conversations: list[list[dict]], prefill: str = "") -> list[list[int]]:
        with self._vocabulary:
            if len(self._words) > VOCABULARY // 2:
                # A real tokenizer's vocabulary is fixed; this one grows with the words seen, so it forgets the
                # words of all but the latest renders (sample() reads ids rendered since), keeping memory flat.
                self._older, self._words = self._words, {}
            out = []
            for conv in conversations:
                ids = []
                for part, flag in [(m["content"], MESSAGE) for m in conv] + [(prefill, PREFILL)]:
                    words = part.split()
                    self._words.update((word_id(w), w) for w in words)
                    ids += [word_id(w) | (flag if j == 0 else 0) for j, w in enumerate(words)]
                out.append(ids)
            return out

    def _word(self, t: int) -> str:
        t &= MESSAGE - 1
        return self._words[t] if t in self._words else self._older[t]



    def _read(self, ids: tuple[int, ...]) -> tuple[str, bool]:
        """(the last message's words, whether a prefill follows it) of rendered ids."""
        starts = [j for j, t in enumerate(ids) if t & MESSAGE]
        cut = next((j for j, t in enumerate(ids) if t & PREFILL), len(ids))
        first = starts[-1] if starts else 0
        with self._vocabulary:
            return " ".join(self._word(t) for t in ids[first:cut]), cut < len(ids)

    def sample(self, requests: list[Request], sampling: SamplingConfig,
               forcing: BudgetForcing | None = None) -> list[list[Generation]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        self._sampled += 1
        if self.poison_file and self._sampled == 2 and not os.path.exists(self.poison_file):
            open(self.poison_file, "w").close()  # this process only: a restarted one finds the file
            self.poisoned = True
        if self.poisoned:
            raise RuntimeError("CUDA error: device-side assert triggered")
        read = [self._read(r.prompt_ids) for r in requests]
        if self.exit_on is not None and any(self.exit_on in last for last, _ in read):
            os._exit(1)
        faulty = self.fail_while is None or os.path.exists(self.fail_while)
        if faulty and self.fail_on is not None and any(self.fail_on in last for last, _ in read):
            raise RuntimeError(f"injected failure on a prompt containing {self.fail_on}")
        if faulty and self.error_rate and any(_draw(last) < self.error_rate for last, _ in read):
            raise RuntimeError("injected random failure")
        out, i = [], 0  # i: the sequence's position in the call
        seed = requests[0].seed if requests else 0  # seeded once per call, as the batched torch engines are
        for r, (last, prefilled) in zip(requests, read):
            gens = []
            for _ in range(r.n):
                gens.append(self._one(seed, i, last, prefilled, len(r.prompt_ids), r.budget(sampling), forcing))
                i += 1
            out.append(gens)
        return out if self.feed is None else self.feed.run(out)

    def _one(self, seed: int, i: int, last: str, prefilled: bool, plen: int, max_new_tokens: int,
             forcing: BudgetForcing | None = None) -> Generation:
        h = hashlib.blake2b(f"{seed}:{i}:{last}".encode(), digest_size=8).digest()
        if h[0] / 256 < self.refusal_rate:
            words = REFUSAL.split()
        else:
            topic = " ".join(last.split()[:4])
            words = f"Sure. Here is a detailed answer about {topic}:".split() + ["step"] * (h[1] % 24)
        if prefilled:
            # A reasoning trace closed by </think>; one in ten leaves it open, one in ten answers nothing.
            thought = "The request touches the policy. I weigh it and decide.".split()
            if forcing is not None:
                return self._forced(thought + ["more"] * (h[3] % 16), h[2] % 10, words, plen, forcing)
            words = thought + ([] if h[2] % 10 == 0 else ["</think>"] if h[2] % 10 == 1 else ["</think>"] + words)
        finish = "stop"
        if len(words) > max_new_tokens:
            words, finish = words[:max_new_tokens], "length"
        return Generation(" ".join(words), finish, plen, len(words), tuple(map(word_id, words)))

    def _forced(self, thought: list[str], kind: int, answer: list[str], plen: int, f: BudgetForcing) -> Generation:
        """Under budget forcing a trace thinks longer (up to 15 more words), so that a budget closes some traces
        and not others: one that closes within f.reasoning words goes on to its answer; one that reaches it open
        gets f.forced's words and then its answer; one that ends open within the budget stays so."""
        close = f.close.split()
        answer = [] if kind == 1 else answer
        if kind != 0 and len(thought) + len(close) <= f.reasoning:  # closed by itself
            reasoning, appended, forced = thought + close, [], False
        elif kind == 0 and len(thought) < f.reasoning:  # ended (EOS) open, before the budget
            reasoning, appended, forced, answer = thought, [], False, []
        else:
            reasoning, appended, forced = thought[: f.reasoning], f.forced.split(), True
        words = reasoning + appended + answer[: f.answer]
        finish = "length" if len(answer) > f.answer else "stop"
        return Generation(" ".join(words), finish, plen, len(words), tuple(map(word_id, words)),
                          reasoning_forced_close=forced, reasoning_tokens=len(reasoning),
                          answer_tokens=min(len(answer), f.answer))


class SimulatedEngine:
    """The fake backend's engine under `step_s` (an EngineFeed's engine): continuous batching as vLLM's, in time
    only. Up to `limit` sequences decode together, one token per step of `step_s` seconds whatever their number
    (decoding is bound by reading the weights); a sequence takes one step per token of its Generation (at least
    one); one that ends frees its slot for the first waiting one. A request (an item: its Generations, computed
    already) is finished when all its sequences are."""

    def __init__(self, limit: int, step_s: float):
        self.limit, self.step_s = limit, step_s
        self._waiting: deque = deque()  # [key, steps left]
        self._running: list = []
        self._items: dict = {}  # key -> [item, sequences not finished]

    def add(self, key, item: list[Generation]) -> None:
        steps = [max(1, g.response_tokens) for g in item] or [1]  # a request of no samples still takes a step
        self._items[key] = [item, len(steps)]
        self._waiting.extend([key, n] for n in steps)

    def step(self) -> tuple[list, int]:
        while self._waiting and len(self._running) < self.limit:
            self._running.append(self._waiting.popleft())
        time.sleep(self.step_s)
        running, finished = len(self._running), []
        for seq in self._running:
            seq[1] -= 1
            if seq[1] == 0:
                entry = self._items[seq[0]]
                entry[1] -= 1
                if entry[1] == 0:
                    finished.append((seq[0], self._items.pop(seq[0])[0]))
        self._running = [seq for seq in self._running if seq[1] > 0]
        return finished, running

    def reset(self) -> None:
        self._waiting.clear()
        self._running.clear()
        self._items.clear()


def word_id(word: str) -> int:
    """A word's token id: stable across processes (unlike hash()), and within int32."""
    return zlib.crc32(word.encode()) & 0x7FFFFFFF


def _draw(text: str) -> float:
    """A number in [0, 1) fixed by the text: whether a prompt falls under the error_rate knob."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64
