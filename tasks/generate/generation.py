"""Generation bookkeeping shared by every backend. Pure: no Prefect, Ray or torch.

A backend renders conversations to token ids (`render`) and samples requests (`sample`: a prompt's
ids, how many samples, a seed); this module decides batches and seeds, quarantines prompts that do not
fit the context or that fail to generate, and builds GENERATED rows.

A sample() call that raises (CUDA out of memory, a tokenizer error on one row, ...) has its list of
requests split in two halves and each is retried, down to a single request; a prompt whose request
fails alone is quarantined with reason `generation_error`, and none of its samples are kept.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.errors import UserError, first_line
from dafactory.tasks.io.prompts import PromptRow, Shard

log = logging.getLogger(__name__)


def messages(prompt: str, system_prompt: str | None) -> list[dict]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": prompt}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    response_tokens: int
    # The ids the model produced, in the generator's own vocabulary: a scorer that shares it reads these
    # rather than re-tokenising `text`, which can split or merge differently at the prompt boundary.
    token_ids: tuple[int, ...]
    # Budget forcing (see BudgetForcing): whether the reasoning was closed for the model, the tokens it reasoned
    # (to and with the token that completed its close, when it closed by itself) and those after the close. The
    # appended close is in neither count but in response_tokens. None and None when budget forcing is off.
    reasoning_forced_close: bool = False
    reasoning_tokens: int | None = None
    answer_tokens: int | None = None


@dataclass(frozen=True)
class BudgetForcing:
    """Budget forcing (s1, Muennighoff et al. 2025): a sample reasons for at most `reasoning` tokens; one that has
    not written `close` by then gets `forced` appended (as tokens) and goes on, in the same sequence, to an answer
    of at most `answer` tokens. One that closes by itself within the budget goes on too: its answer gets `answer`
    tokens counted from its close (those it wrote before the budget ran out included)."""

    reasoning: int
    answer: int
    close: str  # the text that ends the reasoning, looked for in the decoded output
    forced: str  # the text appended to a reasoning that reached its budget open

    @classmethod
    def of(cls, sampling: SamplingConfig, conversation) -> "BudgetForcing | None":
        """From the sampling's budgets and the conversation's `reasoning_close` (and `forced_close`); None if off."""
        if sampling.reasoning_budget is None:
            return None
        close = getattr(conversation, "reasoning_close", None)
        if not close:
            raise UserError("sampling.reasoning_budget needs a conversation that reasons (the distill teacher's)")
        return cls(sampling.reasoning_budget, sampling.answer_budget or sampling.max_new_tokens, close,
                   getattr(conversation, "forced_close", None) or close)


def forcing_codec(tok, forcing: BudgetForcing):
    """What budget forcing needs of a tokenizer: the forced close's ids, a decode that keeps special tokens
    (the close is looked for in it) and the decode of the text."""
    forced_ids = tok(forcing.forced, add_special_tokens=False)["input_ids"]
    return (forced_ids, lambda ids: tok.decode(ids, skip_special_tokens=False),
            lambda ids: tok.decode(ids, skip_special_tokens=True))


def by_request(items: list, requests: list["Request"]) -> list[list]:
    """Items in request-major sample order (request.n of each), back into one list per request."""
    out, i = [], 0
    for r in requests:
        out.append(items[i : i + r.n])
        i += r.n
    return out


def closed_at(ids: list[int], decode, close: str) -> int | None:
    """The least j such that decode(ids[:j]) holds `close` (the tokens up to and with the one that completed
    it), None when the whole does not: a binary search, since a prefix's text is a prefix of the whole's."""
    if close not in decode(ids):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if close in decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class ReasoningPhase:
    """What the first phase of budget forcing left of one sample, and what its answer phase is to do."""

    ids: tuple[int, ...]  # the tokens of the reasoning phase, cut before EOS
    eos: bool  # the sample ended (EOS) within the phase: no answer phase
    close_end: int | None  # it closed by itself: the tokens up to and with its close
    append: tuple[int, ...] | None  # the ids to append before the answer phase (the forced close, or none); None:
    # no answer phase
    answer_budget: int  # tokens the answer phase may generate

    @property
    def forced(self) -> bool:
        return self.close_end is None and self.append is not None


def reasoning_phase(raw: list[int], eos_ids, decode, forcing: BudgetForcing, forced_ids) -> ReasoningPhase:
    """Reads the reasoning phase's new ids (at most forcing.reasoning of them; EOS and what follows included):
    ended at EOS, closed by itself (its answer goes on for what is left of forcing.answer) or open (closed)."""
    stop = next((i for i, t in enumerate(raw) if t in eos_ids), None)
    ids = tuple(raw if stop is None else raw[:stop])
    end = closed_at(list(ids), decode, forcing.close)
    if stop is not None:
        return ReasoningPhase(ids, True, end, None, 0)
    if end is not None:
        left = forcing.answer - (len(ids) - end)
        return ReasoningPhase(ids, False, end, () if left > 0 else None, max(left, 0))
    return ReasoningPhase(ids, False, None, tuple(forced_ids), forcing.answer)


def forced_generation(phase: ReasoningPhase, answer_raw: list[int], eos_ids, decode,
                      prompt_tokens: int) -> Generation:
    """The Generation of one sample from its reasoning phase and the new ids of its answer phase (EOS and what
    follows included; none when it had no answer phase). Finished "stop" when either phase ended at EOS."""
    stop = next((i for i, t in enumerate(answer_raw) if t in eos_ids), None)
    answer = list(answer_raw if stop is None else answer_raw[:stop])
    ids = list(phase.ids) + list(phase.append or ()) + answer
    reasoning = phase.close_end if phase.close_end is not None else len(phase.ids)
    return Generation(
        text=decode(ids),
        finish_reason="stop" if phase.eos or stop is not None else "length",
        prompt_tokens=prompt_tokens,
        response_tokens=len(ids),
        token_ids=tuple(ids),
        reasoning_forced_close=phase.forced,
        reasoning_tokens=reasoning,
        answer_tokens=len(phase.ids) - reasoning + len(answer),
    )


@dataclass(frozen=True)
class Request:
    """One prompt to sample from: the token ids of its rendered conversation (chat template with the
    generation prompt, then the prefill), how many samples, the seed of its samples, and its own bound on
    new tokens (None: the sampling's max_new_tokens; a prompt file's `max_new_tokens_column` sets it)."""

    prompt_ids: tuple[int, ...]
    n: int = 1
    seed: int = 0
    max_new_tokens: int | None = None

    def budget(self, sampling: SamplingConfig) -> int:
        """Most new tokens of each of this request's samples (without budget forcing)."""
        return self.max_new_tokens or sampling.max_new_tokens


class Backend:
    """What a generation backend is: `load`, `context_length`, `render` and `sample` are its own (a
    subclass's); counting prompt tokens and plain generation are the same for every backend, in terms of
    those."""

    model_id: str
    revision: str | None
    # An EngineFeed (tasks/generate/feed.py) when sample() may be called from several threads at once and feeds
    # them all to one engine that takes requests between steps; None: one call at a time.
    feed = None

    def __init__(self, cfg: ModelConfig) -> None:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def context_length(self) -> int | None:
        raise NotImplementedError

    def render(self, conversations: list[list[dict]], prefill: str = "") -> list[list[int]]:
        """Each conversation's token ids, up to where the model starts writing."""
        raise NotImplementedError

    def sample(self, requests: list[Request], sampling: SamplingConfig,
               forcing: BudgetForcing | None = None) -> list[list[Generation]]:
        """For each request, `request.n` Generations in sample order; with `forcing`, under budget forcing
        (the two budgets replace max_new_tokens)."""
        raise NotImplementedError

    def count_prompt_tokens(self, conversations: list[list[dict]], prefill: str = "") -> list[int]:
        return [len(ids) for ids in self.render(conversations, prefill)]

    def generate(
        self, conversations: list[list[dict]], sampling: SamplingConfig, seed: int, prefill: str = ""
    ) -> list[Generation]:
        """One sample per conversation: each its own request of n = 1, seeded by request_seed, so equal
        conversations in one call still get different samples."""
        requests = requests_of([(tuple(ids), 1) for ids in self.render(conversations, prefill)], seed)
        return [gens[0] for gens in self.sample(requests, sampling)] if requests else []


def request_seed(seed: int, j: int) -> int:
    """The seed of the j-th request of a call seeded `seed`: the call's own for the first (engines that
    seed once per call use requests[0].seed), a hash of both for the others, so that engines seeding each
    request (vLLM) never give two prompts of a call the same random stream."""
    if j == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:request:{j}".encode()).digest()[:4], "little")


def requests_of(prompts: list[tuple], seed: int) -> list["Request"]:
    """Requests of (prompt ids, n) or (prompt ids, n, max_new_tokens) for one call seeded `seed`."""
    return [Request(ids, n, request_seed(seed, j), *rest) for j, (ids, n, *rest) in enumerate(prompts)]


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


def sub_batch_seed(base: int, shard_id: str, batch_index: int, lo: int, hi: int) -> int:
    """Seed of the retry of sequences lo:hi (offsets in the batch) after the batch was split."""
    digest = hashlib.sha256(f"{base}:{shard_id}:{batch_index}:{lo}:{hi}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def is_cuda_oom(exc: Exception) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a pure module
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available()


CALLS_IN_FLIGHT = 64  # a shard's batches a streaming backend's engine holds queued at once, at most
FULL = 0.9  # occupancy: a step with fewer running sequences than this share of the batch limit is "below"


def occupancy(stats: Counter, seconds: float, lengths: list[int], limit: int) -> None:
    """Add one engine call to `stats`: its seconds (`engine_s`), the seconds it ran below FULL of its
    `limit` sequences (`below_s`), and its sequence-steps used and offered (`slot_steps`, `slot_capacity`).
    Our own count for engines that run a call's sequences together until the longest ends (transformers'
    generate, the fake backend): at decode step k the running sequences are those longer than k, and each
    step of a call takes an equal share of its seconds. A call whose every sequence failed counts as below."""
    stats["engine_s"] += seconds
    steps = max(lengths, default=0)
    if steps == 0:
        stats["below_s"] += seconds
        return
    ordered = sorted(lengths)
    running = [len(ordered) - bisect.bisect_right(ordered, k) for k in range(steps)]
    stats["below_s"] += seconds * sum(r < FULL * limit for r in running) / steps
    stats["slot_steps"] += sum(lengths)
    stats["slot_capacity"] += limit * steps


def _quarantined(row: PromptRow, reason: str, detail: str) -> dict:
    return {
        "prompt_id": row.prompt_id, "source_row": row.source_row, "prompt": row.prompt[:200],
        "reason": reason, "detail": detail,
    }


def generate_shard(
    backend: Backend,
    shard: Shard,
    n: int,
    sampling: SamplingConfig,
    batch_size: int,
    conversation,
    stats: Counter | None = None,
    engine: Counter | None = None,
) -> tuple[list[dict], list[dict]]:
    """(GENERATED rows, QUARANTINE rows) for one shard; `conversation` turns a PromptRow into messages
    and may open the assistant turn with `conversation.prefill`. `stats`, if given, gets the number of
    batch splits ("splits") and of quarantined prompts per reason added to it; `engine`, if given, the
    engine's occupancy (see occupancy()).

    Each prompt is one Request of its samples. Batches hold at most `batch_size` sequences (prompts x
    samples), cut in sequence order, so that a prompt's samples share a call unless a batch boundary falls
    among them; then its first samples are one request of the batch and the rest one of the next."""
    stats = Counter() if stats is None else stats
    forcing = BudgetForcing.of(sampling, conversation)
    # Under budget forcing the close's characters bound its tokens (ASCII: a token holds one or more).
    longest = sampling.max_response_tokens(len(forcing.forced) if forcing else 0)
    ids = backend.render([conversation(r) for r in shard.rows], conversation.prefill)
    limit = backend.context_length()
    fits, quarantine = [], []  # fits: (row, prompt ids, the row's own max_new_tokens or None)
    for row, prompt in zip(shard.rows, ids):
        own = None if forcing else row.max_new_tokens  # preflight refuses a budget column under budget forcing
        if limit and len(prompt) + (own or longest) > limit:
            what = "the response's budgets" if forcing else "the row's max_new_tokens" if own else "max_new_tokens"
            detail = f"{len(prompt)} prompt tokens + {what} {own or longest} > context {limit}"
            quarantine.append(_quarantined(row, "too_long", detail))
        else:
            fits.append((row, tuple(prompt), own))

    counting = threading.Lock()

    def attempt(groups: list, b: int, lo: int, hi: int, seed: int) -> list[tuple]:
        """(the Generations, or the error as text, and the seed) for each of groups[lo:hi], the requests of
        batch b as (prompt index, sample indices, offset of its first sequence in the batch). A call that
        raises is split in halves of its requests, each retried with its own seed, until one fails alone."""
        part = groups[lo:hi]
        requests = requests_of([(fits[i][1], len(ks), fits[i][2]) for i, ks, _ in part], seed)
        try:
            out = backend.sample(requests, sampling, forcing)
            if [len(g) for g in out] != [r.n for r in requests]:
                raise RuntimeError(f"the backend returned {[len(g) for g in out]} samples for requests of "
                                   f"{[r.n for r in requests]}")
            return [(g, seed) for g in out]
        except Exception as exc:  # a KeyboardInterrupt or SystemExit still stops the run
            kind = type(exc).__name__
            error = f"{kind}: {first_line(exc, 200)}"
            oom = is_cuda_oom(exc)
        # Out of the except block, the traceback and the tensors its frames hold are released.
        if oom:
            sys.modules["torch"].cuda.empty_cache()
        if hi - lo == 1:
            return [(error, seed)]
        log.warning("generate() of %d sequences raised %s; retrying in halves", sum(r.n for r in requests), kind)
        with counting:  # batches may run in threads (a streaming backend)
            stats["splits"] += 1
        mid = (lo + hi) // 2
        end = part[-1][2] + len(part[-1][1])  # sequence offsets: the seeds do not depend on how requests group
        sub = partial(sub_batch_seed, sampling.seed, shard.shard_id, b)
        return (attempt(groups, b, lo, mid, sub(groups[lo][2], groups[mid][2]))
                + attempt(groups, b, mid, hi, sub(groups[mid][2], end)))

    # One sequence per (prompt, sample), in order; each batch's consecutive samples of a prompt are one request.
    seqs = [(i, k) for i in range(len(fits)) for k in range(n)]
    batches = []  # each batch's groups: (prompt index, sample indices, offset of its first sequence)
    for start in range(0, len(seqs), batch_size):
        groups = []
        for offset, (i, k) in enumerate(seqs[start : start + batch_size]):
            if groups and groups[-1][0] == i:
                groups[-1][1].append(k)
            else:
                groups.append((i, [k], offset))
        batches.append(groups)

    def call(b: int) -> list[tuple]:
        t0 = time.perf_counter()
        outcome = attempt(batches[b], b, 0, len(batches[b]), batch_seed(sampling.seed, shard.shard_id, b))
        if engine is not None and backend.feed is None:  # a feed counts its engine's steps itself
            occupancy(engine, time.perf_counter() - t0,
                      [g.response_tokens for gens, _ in outcome if not isinstance(gens, str) for g in gens], batch_size)
        return outcome

    if backend.feed is not None and len(batches) > 1:
        # A streaming engine takes every batch of the shard at once (each call from a thread of its own): the
        # engine, not the batch, bounds what runs together. Seeds are per batch, so the rows do not change.
        with ThreadPoolExecutor(min(len(batches), CALLS_IN_FLIGHT), thread_name_prefix="generate") as pool:
            outcomes = list(pool.map(call, range(len(batches))))
    else:
        outcomes = [call(b) for b in range(len(batches))]
    results = []  # (row, sample_idx, Generation or the error, seed), in sequence order
    for groups, outcome in zip(batches, outcomes):
        for (i, ks, _), (gens, seed) in zip(groups, outcome):
            row = fits[i][0]
            results += [(row, k, gens if isinstance(gens, str) else gens[j], seed) for j, k in enumerate(ks)]
    # Every prompt ends in one place: a prompt with any failed sample is quarantined, with none kept.
    failed = {}
    for row, _, g, _ in results:
        if isinstance(g, str) and row.prompt_id not in failed:
            failed[row.prompt_id] = _quarantined(row, "generation_error", g)
    quarantine += failed.values()
    stats.update(q["reason"] for q in quarantine)
    out = [
        {
            "prompt_id": row.prompt_id,
            "sample_idx": k,
            "prompt": row.prompt,
            "category": row.category,
            "response": g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "response_tokens": g.response_tokens,
            "response_token_ids": list(g.token_ids),
            "reasoning_forced_close": g.reasoning_forced_close,
            "reasoning_tokens": g.reasoning_tokens,
            "answer_tokens": g.answer_tokens,
            "model": backend.model_id,
            "model_revision": backend.revision,
            "seed": seed,
            "shard_id": shard.shard_id,
        }
        for row, k, g, seed in results
        if row.prompt_id not in failed
    ]
    return out, quarantine
