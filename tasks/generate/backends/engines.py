"""How the transformers backend decodes: engines, chosen by `params.engine` of the model config.

- `generate`: plain batched `model.generate`, left padding, each prompt prefilled once per sample.
- `static`: a static KV cache (compiled decoding on CUDA, where `generate` compiles it on its own), each
  prompt prefilled once for all its samples (the prefilled cache is expanded to the samples).
- `paged`: transformers continuous batching (paged attention): rows that finish are replaced at once, and a
  prompt's samples share its prefilled KV blocks (`num_return_sequences` children, transformers >= 5.18).

An engine takes the backend, the requests and the sampling, and returns for each request its samples' raw new
ids (EOS and anything after it included); the backend cuts them at EOS and decodes. `budgets` holds each
request's most new tokens (its own max_new_tokens, or the sampling's): `generate` and `static` decode the call to
the largest and cut each request's samples at its own, `paged` gives each request its own. Imports torch only
inside the engines.
"""

from __future__ import annotations

import logging

from dafactory.tasks.config import SamplingConfig
from dafactory.tasks.generate.generation import (
    BudgetForcing,
    Generation,
    ReasoningPhase,
    Request,
    by_request,
    forced_generation,
    forcing_codec,
    reasoning_phase,
    request_seed,
)
from dafactory.tasks.registry import Registry

log = logging.getLogger(__name__)

ENGINES: Registry = Registry("engine")
PAGE = 256  # tokens per KV page of the paged engine (transformers' default)
AUTO = "auto"  # the default: `generate` on CPU, `paged` on CUDA


def default_engine(device_type: str) -> str:
    """On CPU plain `generate` measured fastest (2 cores, the embedded model). On CUDA `paged` is what we expect to
    be fastest on the long-tailed lengths of reasoning samples: NOT YET MEASURED on a GPU (benchmarks/gpu_check.sh)."""
    return "paged" if device_type == "cuda" else "generate"


def _sampling_kwargs(sampling: SamplingConfig) -> dict:
    if sampling.temperature > 0:
        return dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def _generate_kwargs(backend, budget: int, sampling: SamplingConfig) -> dict:
    kwargs = dict(max_new_tokens=budget, pad_token_id=backend.tok.pad_token_id, **_sampling_kwargs(sampling))
    if backend.eos_ids:
        kwargs["eos_token_id"] = sorted(backend.eos_ids)
    return kwargs


def _left_padded(rows: list[tuple[int, ...]], pad_id: int, device):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _regroup(rows: list[list[int]], requests: list[Request], budgets: list[int]) -> list[list[list[int]]]:
    """Rows in request-major sample order back into per-request lists, each cut to its request's budget."""
    return [[row[:budget] for row in group] for group, budget in zip(by_request(rows, requests), budgets)]


@ENGINES.register("generate")
def generate_engine(backend, requests: list[Request], sampling: SamplingConfig,
                    budgets: list[int]) -> list[list[list[int]]]:
    seqs, mask, _ = _generate_run(backend, requests, sampling, max(budgets))
    return _regroup(seqs[:, mask.shape[1] :].tolist(), requests, budgets)


def _generate_run(backend, requests: list[Request], sampling: SamplingConfig, budget: int):
    """(sequences, the prompts' attention mask, the KV cache) of one batched `generate`, a row per sample. A prompt
    with several samples is prefilled once for all of them (_prefill_once into a dynamic cache), then `generate`
    goes on from there: on the embedded model (2 cores, 16 prompts x 4 samples) the prefill was 3.2 s of 20 s."""
    import torch

    model = backend.model
    ids, mask = _left_padded([r.prompt_ids for r in requests], backend.tok.pad_token_id, model.device)
    shared = {}
    if any(r.n > 1 for r in requests):
        from transformers import DynamicCache

        cache = DynamicCache()
        rows = _prefill_once(model, ids, mask, requests, cache)
        ids, mask, shared = ids[rows], mask[rows], {_cache_kwarg(model): cache}
    torch.manual_seed(requests[0].seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **shared,
                             **_generate_kwargs(backend, budget, sampling))
    # transformers >= 5.2x names the returned cache `cache` (`past_key_values` warns); before, `past_key_values`
    cache = out.get("cache")
    return out.sequences, mask, out.get("past_key_values") if cache is None else cache


def _prefill_once(model, ids, mask, requests: list[Request], cache):
    """Each request's prompt but its last token through the model once, into `cache`, whose rows are then repeated
    for the request's samples (transformers' documented prompt-cache reuse: `generate` then feeds the last prompt
    token, whose logits give the first new token). Positions as generate gives them under left padding, counted
    from each row's first real token; logits only for the last position, which nothing reads. Returns the sample
    rows' prompt indices."""
    import inspect

    import torch

    rows = torch.arange(len(requests), device=model.device).repeat_interleave(
        torch.tensor([r.n for r in requests], device=model.device))
    if ids.shape[1] > 1:  # one-token prompts: nothing to prefill, the cache stays empty
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True, **{_cache_kwarg(model): cache}, **keep)
            cache.reorder_cache(rows)
        _mark_static(cache)  # reorder_cache made new tensors
    return rows


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); the old name is deprecated, not gone."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@ENGINES.register("static")
def static_engine(backend, requests: list[Request], sampling: SamplingConfig,
                  budgets: list[int]) -> list[list[list[int]]]:
    """Prefill each prompt but its last token once into a static cache, repeat the cache rows for the samples, then
    `generate` from there (transformers' documented prompt-cache reuse): generate feeds the last prompt token, whose
    logits give the first new token. On CUDA, generate compiles decoding because the cache is static."""
    seqs, mask, _ = _static_run(backend, requests, sampling, max(budgets))
    return _regroup(seqs[:, mask.shape[1] :].tolist(), requests, budgets)


def _mark_static(cache) -> None:
    """New cache tensors marked static again on CUDA, or compiled graphs would copy them per step."""
    import torch

    for layer in cache.layers:
        if layer.keys.device.type == "cuda":
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def _static_run(backend, requests: list[Request], sampling: SamplingConfig, budget: int, more: int = 0):
    """(sequences, the samples' prompt attention mask, the static cache); the cache holds `more` positions beyond
    the budget, for an answer phase to continue in."""
    import torch
    from transformers import StaticCache

    model = backend.model
    ids, mask = _left_padded([r.prompt_ids for r in requests], backend.tok.pad_token_id, model.device)
    # Cache lengths rounded up to a multiple of 256: compiled decoding is specialised to the cache's shape.
    cache = StaticCache(config=model.config, max_cache_len=-(-(ids.shape[1] + budget + more) // 256) * 256)
    rows = _prefill_once(model, ids, mask, requests, cache)
    with torch.inference_mode():
        torch.manual_seed(requests[0].seed)
        out = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **{_cache_kwarg(model): cache},
                             **_generate_kwargs(backend, budget, sampling))
    return out, mask[rows], cache


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def forced_page(reasoning: int) -> int:
    """KV page size of the paged engine under budget forcing. Its answer phase is a new request of prompt +
    reasoning + forced ids, whose complete pages prefix sharing finds cached: with pages of at most reasoning + 1
    tokens every prompt token lies in a complete page, so the prompt is never prefilled again, only the reasoning's
    last partial page (under `page` tokens) and the forced ids. transformers' 256 where the budget allows (its
    CUDA decode path is tuned to it), else the largest power of two that fits (4 at least: transformers' floor)."""
    return PAGE if reasoning + 1 >= PAGE else max(4, 1 << (reasoning + 1).bit_length() - 1)


@ENGINES.register("paged")
def paged_engine(backend, requests: list[Request], sampling: SamplingConfig,
                 budgets: list[int], page: int = PAGE) -> list[list[list[int]]]:
    """One continuous-batching manager per backend, sampling and page size (`page` tokens per KV page), kept
    between calls (on CUDA its warm-up captures graphs once; its complete pages stay cached for prefix sharing).
    The requests are queued while the loop is paused, so that the schedule, and with the seed the samples, do
    not depend on thread timing."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    model = backend.model
    key = (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens,
           tuple(sorted(backend.eos_ids)), page)
    if getattr(backend, "_paged_key", None) != key:
        model.destroy_cached_continuous_batching_manager()
        backend._paged_key = key
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, pad_token_id=backend.tok.pad_token_id,
                              eos_token_id=sorted(backend.eos_ids) or None, **_sampling_kwargs(sampling))
    # The seed only takes effect when the manager is built; a kept manager is seeded below, the same way.
    sizing = dict(seed=requests[0].seed, max_memory_percent=backend.cfg.params.get("kv_cache_memory"), page_size=page)
    if model.device.type != "cuda":
        # Off CUDA transformers would size the cache from free host memory (gigabytes, zeroed on every reuse):
        # enough pages for this call's sequences instead; later calls queue for pages if they need more.
        pages = sum(r.n * -(-(len(r.prompt_ids) + b) // page) for r, b in zip(requests, budgets))
        sizing |= dict(num_blocks=max(16, pages), max_batch_tokens=4096)
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=ContinuousBatchingConfig(**sizing))
    # Children of num_return_sequences come back from 5.18; before, each sample is a request of its own.
    forks = _transformers_at_least("5.18")
    if model.device.type == "cuda" and not manager.warmed_up:
        manager.warmup()
    torch.manual_seed(requests[0].seed)
    manager.start()
    try:
        ids = []  # per request, the ids of its samples' results
        with manager.pause():
            for i, (r, budget) in enumerate(zip(requests, budgets)):
                if forks:
                    manager.num_return_sequences = r.n  # read by add_request: the request's children
                    rid = manager.add_request(list(r.prompt_ids), request_id=f"r{i}", max_new_tokens=budget)
                    ids.append([rid] + [f"{rid}__child#{c}" for c in range(r.n - 1)])
                else:
                    ids.append([manager.add_request(list(r.prompt_ids), request_id=f"r{i}s{c}", max_new_tokens=budget)
                                for c in range(r.n)])
        wanted = {rid for group in ids for rid in group}
        if None in wanted:
            raise RuntimeError("continuous batching refused a request (its loop is stopping)")
        results = {}
        while len(results) < len(wanted):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished() and result.request_id in wanted:
                if result.error is not None:
                    raise RuntimeError(f"continuous batching failed request {result.request_id}: {result.error}")
                results[result.request_id] = result.generated_tokens
            elif result is None and not manager.is_running():
                error = manager.background_thread_status.fatal_error
                raise RuntimeError(f"continuous batching stopped with {len(wanted) - len(results)} requests left"
                                   + (f": {error}" if error else ""))
    finally:
        manager.stop(block=True, keep_for_next_session=True)
    return [[list(results[rid][:budget]) for rid in group] for group, budget in zip(ids, budgets)]


def _cache_rows(cache, rows):
    """A cache of the given rows (a LongTensor of batch indices) of `cache`, which stays as it was: its layers
    copied with their key and value rows selected (a static layer keeps its length, in a tensor of its own)."""
    import copy

    import torch

    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.keys, new.values = layer.keys[rows], layer.values[rows]
        if hasattr(layer, "batch_size"):
            new.batch_size = len(rows)
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            new.cumulative_length = layer.cumulative_length.clone()
        out.layers.append(new)
    _mark_static(out)
    return out


def _answer_phase(backend, seqs, mask, cache, phases: list[ReasoningPhase], sampling: SamplingConfig,
                  seed: int) -> list[list[int]]:
    """The answer phase of budget forcing from the reasoning phase's KV cache: each row that goes on (all ran the
    whole reasoning budget: a row stopped sooner ended at EOS) gets its appended ids, and `generate` continues from
    the cache, so only those ids and the phase's last token are prefilled. Rows that append the same ids (the
    forced close, or nothing) go in one call. The new ids of each row's answer ([] for rows that do not go on)."""
    import torch

    model = backend.model
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(phases):
        if p.append is not None:
            groups.setdefault(p.append, []).append(i)
    answers = [[] for _ in phases]
    for k, (append, idx) in enumerate(sorted(groups.items())):
        rows = torch.tensor(idx, device=model.device)
        tail = torch.tensor([list(append)] * len(idx), dtype=torch.long, device=model.device).reshape(len(idx), -1)
        ids = torch.cat([seqs[rows], tail], dim=1)
        ones = torch.ones((len(idx), ids.shape[1] - mask.shape[1]), dtype=mask.dtype, device=model.device)
        budget = max(phases[i].answer_budget for i in idx)
        torch.manual_seed(request_seed(seed, 1 + k))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.cat([mask[rows], ones], dim=1),
                                 **{_cache_kwarg(model): _cache_rows(cache, rows)},
                                 **_generate_kwargs(backend, budget, sampling))
        for i, row in zip(idx, out[:, ids.shape[1] :].tolist()):
            answers[i] = row[: phases[i].answer_budget]
    return answers


def forced_sample(backend, requests: list[Request], sampling: SamplingConfig,
                  forcing: BudgetForcing) -> list[list[Generation]]:
    """Budget forcing on the backend's engine: a reasoning phase of forcing.reasoning tokens, then an answer phase
    for the samples that did not end. `generate` and `static` continue from the reasoning phase's KV cache;
    `paged` submits prompt + reasoning + appended ids as new requests, whose complete KV pages its prefix sharing
    finds cached: pages of forced_page(reasoning) tokens hold the whole prompt, so only the reasoning's last
    partial page is prefilled again."""
    eos = backend.eos_ids
    forced_ids, decode_all, decode_text = forcing_codec(backend.tok, forcing)
    prompts = [r.prompt_ids for r in requests for _ in range(r.n)]
    seed = requests[0].seed
    if backend.engine == "paged":
        page = forced_page(forcing.reasoning)
        raw = [ids for group in paged_engine(backend, requests, sampling, [forcing.reasoning] * len(requests), page)
               for ids in group]
        phases = [reasoning_phase(ids, eos, decode_all, forcing, forced_ids) for ids in raw]
        going = [i for i, p in enumerate(phases) if p.append is not None]
        answers = [[] for _ in phases]
        if going:
            more = [Request(prompts[i] + phases[i].ids + phases[i].append, 1, request_seed(seed, 1 + j))
                    for j, i in enumerate(going)]
            out = paged_engine(backend, more, sampling, [phases[i].answer_budget for i in going], page)
            for i, (ids,) in zip(going, out):
                answers[i] = ids
    else:
        if backend.engine == "static":  # its cache is sized up front: room for the forced close and the answer
            seqs, mask, cache = _static_run(backend, requests, sampling, forcing.reasoning,
                                            more=len(forced_ids) + forcing.answer)
        else:  # a dynamic cache grows as the answer phase goes on
            seqs, mask, cache = _generate_run(backend, requests, sampling, forcing.reasoning)
        raw = [row[: forcing.reasoning] for row in seqs[:, mask.shape[1] :].tolist()]
        phases = [reasoning_phase(ids, eos, decode_all, forcing, forced_ids) for ids in raw]
        answers = _answer_phase(backend, seqs, mask, cache, phases, sampling, seed)
    return by_request([forced_generation(p, a, eos, decode_text, len(ids))
                       for p, a, ids in zip(phases, answers, prompts)], requests)
